"""The ``cuda`` backend: ahead-of-time compiled CUDA kernels (``csrc/cuda``), no JIT at the
first call. "auto" prefers ``triton`` on GPUs and falls back to this one when Triton is
missing or cannot serve the call; ``backend="cuda"`` or ``HATKERNELS_BACKEND=cuda`` forces it.

Kernels: one CTA per block of whole images x whole captions, similarities 64 x 64 at a time
(tensor-core WMMA with float32 accumulation for float16/bfloat16, exact float32 FMA for
float32), pooled in shared memory; scan pooling uses the Gram identity (docs/operators.md).
Backward passes recompute the similarities and add into float32 gradients with atomics.
Needs sm_80+.
"""

from __future__ import annotations

import torch

from ..inputs import AlignInputs
from .base import ExtensionBackend, load_extension

MIN_CAPABILITY = (8, 0)
# Tokens per item that the kernels' index arithmetic allows.
MAX_TOKENS = 1 << 20

_EXT, LOAD_ERROR = load_extension(
    "hatkernels._C_cuda",
    "it builds when torch has CUDA and nvcc is found (unless HATKERNELS_SKIP_CUDA_BUILD=1)",
)


class CudaBackend(ExtensionBackend):
    name = "cuda"
    device_types = ("cuda",)
    extension = _EXT
    load_error = LOAD_ERROR

    def device_unsupported_reason(self, device: torch.device) -> str | None:
        if not torch.cuda.is_available():
            return "CUDA is not available"
        index = device.index if device.index is not None else torch.cuda.current_device()
        capability = torch.cuda.get_device_capability(index)
        if capability < MIN_CAPABILITY:
            return (
                f"GPU compute capability {capability[0]}.{capability[1]} < "
                f"{MIN_CAPABILITY[0]}.{MIN_CAPABILITY[1]} (the kernels are built for sm_80+)"
            )
        return None

    def shape_reasons(self, inp: AlignInputs) -> list[str]:
        if max(inp.image_tokens, inp.text_tokens) > MAX_TOKENS:
            return [f"over {MAX_TOKENS} tokens per item"]
        return []


__all__ = ["CudaBackend", "LOAD_ERROR", "MIN_CAPABILITY"]
