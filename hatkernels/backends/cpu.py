"""The ``cpu`` backend: fused C++ kernels (``csrc/cpu``), OpenMP over tiles of whole images x
whole captions, GEMM-sized tiles of packed valid tokens pooled while in cache."""

from __future__ import annotations

import importlib

from .base import Backend

DIRECTION_CODES = {"t2i": 0, "i2t": 1, "both": 2}

try:
    _ext = importlib.import_module("hatkernels._C_cpu")

    LOAD_ERROR: str | None = None
except ImportError as exc:  # the package still works on the torch backend
    _ext = None
    LOAD_ERROR = (
        f"extension hatkernels._C_cpu is not built ({exc}); build it with "
        "`pip install --no-build-isolation -e .`"
    )


class CpuBackend(Backend):
    name = "cpu"
    device_types = ("cpu",)

    def unavailable_reason(self) -> str | None:
        return LOAD_ERROR

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
        gi, gt = _ext.max_align_backward(
            grad,
            images,
            texts,
            image_lengths,
            text_lengths,
            DIRECTION_CODES[direction],
            reduce == "mean",
        )
        return gi, gt

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
        gi, gt = _ext.scan_align_backward(
            grad,
            images,
            texts,
            image_lengths,
            text_lengths,
            DIRECTION_CODES[direction],
            reduce == "mean",
            float(lambda_softmax),
        )
        return gi, gt


__all__ = ["CpuBackend", "LOAD_ERROR"]
