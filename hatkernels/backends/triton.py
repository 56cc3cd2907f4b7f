"""The ``triton`` backend: fused Triton kernels (``hatkernels/triton``) for CUDA GPUs.

With ``TRITON_INTERPRET=1`` the same kernels run on CPU tensors through Triton's
interpreter (slow; how CI tests them). "auto" never picks it on CPU. Scan pooling's kernels
hold a block of captions (and, in the t2i backward, a whole image) in one program; larger
shapes are reported as reasons, so dispatch picks another backend for them.
"""

from __future__ import annotations

import contextlib
import os

import torch
from torch import Tensor

from ..inputs import AlignInputs
from .base import Backend

try:
    import triton  # noqa: F401

    LOAD_ERROR: str | None = None
except ImportError as exc:
    LOAD_ERROR = f"triton is not importable ({exc})"


def interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def _on(device: torch.device) -> contextlib.AbstractContextManager:
    """Triton launches on the current CUDA device: make it the tensors' one."""
    return torch.cuda.device(device) if device.type == "cuda" else contextlib.nullcontext()


class TritonBackend(Backend):
    name = "triton"
    device_types = ("cuda", "cpu")

    def unavailable_reason(self) -> str | None:
        return LOAD_ERROR

    def device_unsupported_reason(self, device: torch.device) -> str | None:
        if device.type == "cpu" and not interpreting():
            return "CPU tensors need TRITON_INTERPRET=1 (Triton's interpreter)"
        if device.type == "cuda" and not torch.cuda.is_available():
            return "CUDA is not available"
        return None

    def shape_reasons(self, inp: AlignInputs) -> list[str]:
        if inp.pooling != "scan":
            return []
        from hatkernels.triton.common import MAX_T2I_TOKENS, MAX_WORDS, next_pow2

        reasons = []
        if next_pow2(inp.text_tokens) > MAX_WORDS:
            reasons.append(
                f"scan pooling with captions over {MAX_WORDS} tokens ({inp.text_tokens}): a "
                "block of captions' Gram matrices must fit one program"
            )
        if inp.needs_grad and inp.direction != "i2t" and inp.image_tokens > MAX_T2I_TOKENS:
            reasons.append(
                f"scan {inp.direction} backward with over {MAX_T2I_TOKENS} image tokens "
                f"({inp.image_tokens}): the forward could run, but gradients are needed"
            )
        return reasons

    def max_align(self, inp: AlignInputs) -> Tensor:
        from hatkernels.triton.max_align import max_align_forward

        with _on(inp.device):
            return max_align_forward(*inp.tensors, inp.direction, inp.reduce)

    def max_align_backward(self, grad: Tensor, inp: AlignInputs) -> tuple[Tensor, Tensor]:
        from hatkernels.triton.max_align import max_align_backward

        with _on(inp.device):
            return max_align_backward(grad, *inp.tensors, inp.direction, inp.reduce)

    def scan_align(self, inp: AlignInputs) -> Tensor:
        from hatkernels.triton.scan_align import scan_align_forward

        with _on(inp.device):
            return scan_align_forward(*inp.tensors, inp.direction, inp.reduce,
                                      inp.lambda_softmax)

    def scan_align_backward(self, grad: Tensor, inp: AlignInputs) -> tuple[Tensor, Tensor]:
        from hatkernels.triton.scan_backward import scan_align_backward

        with _on(inp.device):
            return scan_align_backward(grad, *inp.tensors, inp.direction, inp.reduce,
                                       inp.lambda_softmax)
