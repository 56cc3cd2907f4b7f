"""What every backend declares: its limits as reasons, why it may be unavailable, and four
kernels.

Every kernel method takes one ``AlignInputs`` (``hatkernels.inputs``: the contract, checked
once by ``hatkernels.api``). Forward methods return ``[Bi, Bt]`` float32 scores (float64 for
float64 inputs); backward methods take ``grad`` ``[Bi, Bt]`` (the output's dtype) and return
``(grad_images, grad_texts)`` with the inputs' shapes and dtype, exactly zero on padding.
``align`` and ``align_backward`` are what the custom ops call: by default the pooling's kernel
methods, with nothing kept between forward and backward; a backend may keep an int32 tensor
from its forward for its backward (the cpu backend's max pooling winners).
A backend never hands a call to another backend: what it cannot serve, it reports in
``not_supported_reasons`` and ``hatkernels.dispatch`` picks another one.
"""

from __future__ import annotations

import importlib
from collections.abc import Sequence
from types import ModuleType
from typing import ClassVar

import torch
from torch import Tensor

from ..inputs import AlignInputs


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

    def environment_reasons(
        self, device: torch.device, dtype: torch.dtype, dims: Sequence[int]
    ) -> list[str]:
        """Every reason this backend cannot serve tensors of this device, dtype and sizes D,
        whatever their shapes otherwise."""
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

    def shape_reasons(self, inp: AlignInputs) -> list[str]:
        """Limits on token counts and settings (none by default). A limit of the backward
        only counts when ``inp.needs_grad``, and its reason says so."""
        return []

    def not_supported_reasons(self, inp: AlignInputs) -> list[str]:
        """Every reason this backend cannot serve the call ``inp`` (empty: it can)."""
        return self.environment_reasons(inp.device, inp.dtype, (inp.dim,)) + self.shape_reasons(
            inp
        )

    def align(self, inp: AlignInputs) -> tuple[Tensor, Tensor]:
        """Scores of ``inp`` and what its backward may reuse: an int32 tensor that the custom op
        keeps for ``align_backward`` (empty here: the backward recomputes what it needs)."""
        scores = getattr(self, f"{inp.pooling}_align")(inp)
        return scores, torch.empty(0, dtype=torch.int32, device=inp.device)

    def align_backward(
        self, grad: Tensor, inp: AlignInputs, saved: Tensor
    ) -> tuple[Tensor, Tensor]:
        """Gradients of ``sum(grad * scores)``, given what ``align`` kept for the same inputs."""
        return getattr(self, f"{inp.pooling}_align_backward")(grad, inp)

    def max_align(self, inp: AlignInputs) -> Tensor:
        raise NotImplementedError

    def max_align_backward(self, grad: Tensor, inp: AlignInputs) -> tuple[Tensor, Tensor]:
        raise NotImplementedError

    def scan_align(self, inp: AlignInputs) -> Tensor:
        raise NotImplementedError

    def scan_align_backward(self, grad: Tensor, inp: AlignInputs) -> tuple[Tensor, Tensor]:
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

    def _codes(self, inp: AlignInputs) -> tuple[int, bool]:
        return DIRECTION_CODES[inp.direction], inp.reduce == "mean"

    def max_align(self, inp: AlignInputs) -> Tensor:
        return self.extension.max_align_forward(*inp.tensors, *self._codes(inp))

    def max_align_backward(self, grad: Tensor, inp: AlignInputs) -> tuple[Tensor, Tensor]:
        return tuple(self.extension.max_align_backward(grad, *inp.tensors, *self._codes(inp)))

    def scan_align(self, inp: AlignInputs) -> Tensor:
        lam = float(inp.lambda_softmax)
        return self.extension.scan_align_forward(*inp.tensors, *self._codes(inp), lam)

    def scan_align_backward(self, grad: Tensor, inp: AlignInputs) -> tuple[Tensor, Tensor]:
        lam = float(inp.lambda_softmax)
        return tuple(
            self.extension.scan_align_backward(grad, *inp.tensors, *self._codes(inp), lam)
        )
