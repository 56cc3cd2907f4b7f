"""The ``cuda`` backend: ahead-of-time compiled CUDA kernels (``csrc/cuda``), no JIT at the
first call. "auto" prefers ``triton`` on GPUs and falls back to this one when Triton is
missing or cannot serve the call; ``backend="cuda"`` or ``HATKERNELS_BACKEND=cuda`` forces it.

Kernels: one CTA per block of whole images x whole captions, similarities 64 x 64 at a time
(tensor-core WMMA with float32 accumulation for float16/bfloat16, exact float32 FMA for
float32), pooled in shared memory; scan pooling uses the Gram identity (SPEC 6). Backward
passes recompute the similarities and add into float32 gradients with atomics. Needs sm_80+.
"""

from __future__ import annotations

import importlib

import torch

from .base import Backend
from .cpu import DIRECTION_CODES

MIN_CAPABILITY = (8, 0)

try:
    _ext = importlib.import_module("hatkernels._C_cuda")

    LOAD_ERROR: str | None = None
except ImportError as exc:
    _ext = None
    LOAD_ERROR = (
        f"extension hatkernels._C_cuda is not built ({exc}); it builds when torch has CUDA "
        "and nvcc is found (unless HATKERNELS_SKIP_CUDA_BUILD=1)"
    )


class CudaBackend(Backend):
    name = "cuda"
    device_types = ("cuda",)

    def unavailable_reason(self) -> str | None:
        return LOAD_ERROR

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

    def max_align(
        self, images, texts, image_lengths, text_lengths, direction, reduce, memory_budget
    ):
        return _ext.max_align_forward(
            images,
            texts,
            image_lengths,
            text_lengths,
            DIRECTION_CODES[direction],
            reduce == "mean",
        )

    def max_align_backward(
        self, grad, images, texts, image_lengths, text_lengths, direction, reduce, memory_budget
    ):
        return _ext.max_align_backward(
            grad,
            images,
            texts,
            image_lengths,
            text_lengths,
            DIRECTION_CODES[direction],
            reduce == "mean",
        )

    def scan_align(
        self,
        images,
        texts,
        image_lengths,
        text_lengths,
        direction,
        reduce,
        lambda_softmax,
        memory_budget,
    ):
        return _ext.scan_align_forward(
            images,
            texts,
            image_lengths,
            text_lengths,
            DIRECTION_CODES[direction],
            reduce == "mean",
            float(lambda_softmax),
        )

    def scan_align_backward(
        self,
        grad,
        images,
        texts,
        image_lengths,
        text_lengths,
        direction,
        reduce,
        lambda_softmax,
        memory_budget,
    ):
        return _ext.scan_align_backward(
            grad,
            images,
            texts,
            image_lengths,
            text_lengths,
            DIRECTION_CODES[direction],
            reduce == "mean",
            float(lambda_softmax),
        )


__all__ = ["CudaBackend", "LOAD_ERROR", "MIN_CAPABILITY"]
