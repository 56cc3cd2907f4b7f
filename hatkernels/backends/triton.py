"""The ``triton`` backend: fused Triton kernels (``hatkernels/triton``) for CUDA GPUs.

With ``TRITON_INTERPRET=1`` the same kernels run on CPU tensors through Triton's
interpreter (slow; how CI tests them). "auto" never picks it on CPU.
"""

from __future__ import annotations

import contextlib
import os

import torch

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

    def max_align(self, images, texts, image_lengths, text_lengths, direction, reduce,
                  memory_budget):
        from hatkernels.triton.max_align import max_align_forward

        with _on(images.device):
            return max_align_forward(images, texts, image_lengths, text_lengths, direction,
                                     reduce)

    def max_align_backward(self, grad, images, texts, image_lengths, text_lengths, direction,
                           reduce, memory_budget):
        from hatkernels.triton.max_align import max_align_backward

        with _on(images.device):
            return max_align_backward(grad, images, texts, image_lengths, text_lengths,
                                      direction, reduce)

    def scan_align(self, images, texts, image_lengths, text_lengths, direction, reduce,
                   lambda_softmax, memory_budget):
        from hatkernels.triton.scan_align import scan_align_forward

        with _on(images.device):
            return scan_align_forward(images, texts, image_lengths, text_lengths, direction,
                                      reduce, lambda_softmax)

    def scan_align_backward(self, grad, images, texts, image_lengths, text_lengths, direction,
                            reduce, lambda_softmax, memory_budget):
        from hatkernels.triton.scan_align import scan_align_backward

        with _on(images.device):
            return scan_align_backward(grad, images, texts, image_lengths, text_lengths,
                                       direction, reduce, lambda_softmax)
