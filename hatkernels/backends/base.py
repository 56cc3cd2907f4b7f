"""What every backend declares: its limits, why it may be unavailable, and four kernels.

The kernel contract (the same for every backend, checked once by ``hatkernels.api``):

- ``images`` ``[Bi, M, D]`` and ``texts`` ``[Bt, N, D]``: contiguous, one dtype, one device,
  ``Bi, Bt, M, N, D >= 1``;
- ``image_lengths`` ``[Bi]`` and ``text_lengths`` ``[Bt]``: int64 on the same device, values in
  ``[1, M]`` and ``[1, N]``; tokens past them are padding and may hold anything, NaN included;
- ``direction`` in ``{"t2i", "i2t", "both"}``, ``reduce`` in ``{"mean", "sum"}``;
- forward returns ``[Bi, Bt]`` float32 (float64 for float64 inputs);
- backward takes ``grad`` ``[Bi, Bt]`` (the output's dtype) and returns ``(grad_images,
  grad_texts)`` with the inputs' shapes and dtype, exactly zero on padding;
- ``memory_budget``: bytes of working memory the call may use (backends with fixed tiles
  may ignore it).
"""

from __future__ import annotations

import importlib
from collections.abc import Sequence
from types import ModuleType
from typing import ClassVar

import torch
from torch import Tensor


def output_dtype(dtype: torch.dtype) -> torch.dtype:
    """The dtype of scores (and of the kernels' accumulation): float64 for float64 inputs,
    else float32."""
    return torch.float64 if dtype == torch.float64 else torch.float32


class Backend:
    """Base class: limits as class attributes, availability and reasons, kernel methods."""

    name: ClassVar[str]
    device_types: ClassVar[tuple[str, ...]]
    dtypes: ClassVar[tuple[torch.dtype, ...]] = (torch.float32, torch.float16, torch.bfloat16)
    max_dim: ClassVar[int | None] = None

    def unavailable_reason(self) -> str | None:
        """Why this backend cannot run at all here (not built, not importable), else None."""
        return None

    def device_unsupported_reason(self, device: torch.device) -> str | None:
        """Why this backend cannot run on ``device`` (beyond its device type), else None."""
        return None

    def not_supported_reasons(
        self, device: torch.device, dtype: torch.dtype, dims: Sequence[int]
    ) -> list[str]:
        """Every reason this backend cannot serve tensors of this device, dtype and sizes D."""
        reasons = []
        missing = self.unavailable_reason()
        if missing:
            reasons.append(missing)
        if device.type not in self.device_types:
            reasons.append(f"device type {device.type!r} not in {self.device_types}")
        else:
            why = self.device_unsupported_reason(device)
            if why:
                reasons.append(why)
        if dtype not in self.dtypes:
            names = ", ".join(str(d).removeprefix("torch.") for d in self.dtypes)
            reasons.append(f"dtype {str(dtype).removeprefix('torch.')} not in ({names})")
        if self.max_dim is not None and any(d > self.max_dim for d in dims):
            reasons.append(f"feature size {max(dims)} > {self.max_dim}")
        return reasons

    def max_align(
        self,
        images: Tensor,
        texts: Tensor,
        image_lengths: Tensor,
        text_lengths: Tensor,
        direction: str,
        reduce: str,
        memory_budget: int,
    ) -> Tensor:
        raise NotImplementedError

    def max_align_backward(
        self,
        grad: Tensor,
        images: Tensor,
        texts: Tensor,
        image_lengths: Tensor,
        text_lengths: Tensor,
        direction: str,
        reduce: str,
        memory_budget: int,
    ) -> tuple[Tensor, Tensor]:
        raise NotImplementedError

    def scan_align(
        self,
        images: Tensor,
        texts: Tensor,
        image_lengths: Tensor,
        text_lengths: Tensor,
        direction: str,
        reduce: str,
        lambda_softmax: float,
        memory_budget: int,
    ) -> Tensor:
        raise NotImplementedError

    def scan_align_backward(
        self,
        grad: Tensor,
        images: Tensor,
        texts: Tensor,
        image_lengths: Tensor,
        text_lengths: Tensor,
        direction: str,
        reduce: str,
        lambda_softmax: float,
        memory_budget: int,
    ) -> tuple[Tensor, Tensor]:
        raise NotImplementedError


DIRECTION_CODES = {"t2i": 0, "i2t": 1, "both": 2}


def load_extension(module: str, hint: str) -> tuple[ModuleType | None, str | None]:
    """Import a compiled extension; on failure return ``(None, why)`` instead of raising."""
    try:
        return importlib.import_module(module), None
    except ImportError as exc:
        return None, f"extension {module} is not built ({exc}); {hint}"


class ExtensionBackend(Backend):
    """A backend whose kernels live in a compiled extension with the binding signatures of
    ``csrc/bindings``: ``{op}_forward(images, texts, image_lengths, text_lengths,
    direction_code, mean[, lambda_softmax])`` and ``{op}_backward(grad, ...)``."""

    extension: ClassVar[ModuleType | None]
    load_error: ClassVar[str | None]

    def unavailable_reason(self) -> str | None:
        return self.load_error

    def max_align(
        self, images, texts, image_lengths, text_lengths, direction, reduce, memory_budget
    ):
        code, mean = DIRECTION_CODES[direction], reduce == "mean"
        return self.extension.max_align_forward(
            images, texts, image_lengths, text_lengths, code, mean
        )

    def max_align_backward(
        self, grad, images, texts, image_lengths, text_lengths, direction, reduce, memory_budget
    ):
        code, mean = DIRECTION_CODES[direction], reduce == "mean"
        return tuple(
            self.extension.max_align_backward(
                grad, images, texts, image_lengths, text_lengths, code, mean
            )
        )

    def scan_align(
        self, images, texts, image_lengths, text_lengths, direction, reduce, lambda_softmax,
        memory_budget,
    ):  # fmt: skip
        code, mean = DIRECTION_CODES[direction], reduce == "mean"
        return self.extension.scan_align_forward(
            images, texts, image_lengths, text_lengths, code, mean, float(lambda_softmax)
        )

    def scan_align_backward(
        self, grad, images, texts, image_lengths, text_lengths, direction, reduce,
        lambda_softmax, memory_budget,
    ):  # fmt: skip
        code, mean = DIRECTION_CODES[direction], reduce == "mean"
        return tuple(
            self.extension.scan_align_backward(
                grad,
                images,
                texts,
                image_lengths,
                text_lengths,
                code,
                mean,
                float(lambda_softmax),
            )  # fmt: skip
        )
