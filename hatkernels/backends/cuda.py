"""The ``cuda`` backend: ahead-of-time compiled CUDA kernels (``csrc/cuda``), no JIT at the
first call. "auto" prefers ``triton`` on GPUs and falls back to this one when Triton is
missing or cannot serve the call."""

from __future__ import annotations

import importlib
import torch

from .base import Backend
from .cpu import DIRECTION_CODES

try:
    _ext = importlib.import_module("hatkernels._C_cuda")

    LOAD_ERROR: str | None = None
except ImportError as exc:
    _ext = None
    LOAD_ERROR = (
        f"extension hatkernels._C_cuda is not built ({exc}); it builds when torch has CUDA "
        "and nvcc is found"
    )


class CudaBackend(Backend):
    name = "cuda"
    device_types = ("cuda",)

    def unavailable_reason(self) -> str | None:
        return LOAD_ERROR

    def device_unsupported_reason(self, device: torch.device) -> str | None:
        if not torch.cuda.is_available():
            return "CUDA is not available"
        return None

    def max_align(self, images, texts, image_lengths, text_lengths, direction, reduce,
                  memory_budget):
        return _ext.max_align_forward(
            images, texts, image_lengths, text_lengths, DIRECTION_CODES[direction],
            reduce == "mean",
        )

    def max_align_backward(self, grad, images, texts, image_lengths, text_lengths, direction,
                           reduce, memory_budget):
        gi, gt = _ext.max_align_backward(
            grad, images, texts, image_lengths, text_lengths, DIRECTION_CODES[direction],
            reduce == "mean",
        )
        return gi, gt

    def scan_align(self, images, texts, image_lengths, text_lengths, direction, reduce,
                   lambda_softmax, memory_budget):
        return _ext.scan_align_forward(
            images, texts, image_lengths, text_lengths, DIRECTION_CODES[direction],
            reduce == "mean", float(lambda_softmax),
        )

    def scan_align_backward(self, grad, images, texts, image_lengths, text_lengths, direction,
                            reduce, lambda_softmax, memory_budget):
        gi, gt = _ext.scan_align_backward(
            grad, images, texts, image_lengths, text_lengths, DIRECTION_CODES[direction],
            reduce == "mean", float(lambda_softmax),
        )
        return gi, gt
