"""The ``cpu`` backend: fused C++ kernels (``csrc/cpu``), OpenMP over tiles of whole images x
whole captions, GEMM-sized tiles of packed valid tokens pooled while in cache.

Max pooling with gradients keeps every query token's winner from the forward (int32, one per
query token and pair) when they fit the call's ``memory_budget``: the backward then scatters
from them instead of recomputing the similarities (``csrc/cpu/max_align_kernel.h``)."""

from __future__ import annotations

from torch import Tensor

from ..inputs import AlignInputs
from .base import ExtensionBackend, load_extension

# The largest byte count the extension takes (int64).
_MAX_BYTES = (1 << 63) - 1

_EXT, LOAD_ERROR = load_extension(
    "hatkernels._C_cpu", "build it with `pip install --no-build-isolation -e .`"
)


class CpuBackend(ExtensionBackend):
    name = "cpu"
    device_types = ("cpu",)
    extension = _EXT
    load_error = LOAD_ERROR

    def align(self, inp: AlignInputs) -> tuple[Tensor, Tensor]:
        """Max pooling with gradients: scores and the winners, when they fit the budget."""
        if inp.pooling != "max" or not inp.needs_grad:
            return super().align(inp)
        budget = min(inp.memory_budget, _MAX_BYTES)
        return tuple(
            self.extension.max_align_forward_winners(*inp.tensors, *self._codes(inp), budget)
        )

    def max_align_bounds(self, inp: AlignInputs) -> tuple[Tensor, Tensor] | None:
        """float64 ``[Bi, Bt]`` lower and upper bounds of the max-pooling scores this backend
        computes for ``inp``, from int8 codes alone; None where the CPU cannot screen (or for
        ``both``)."""
        lower, upper = self.extension.max_align_bounds(*inp.tensors, *self._codes(inp))
        return (lower, upper) if lower.numel() == inp.images.shape[0] * inp.texts.shape[0] \
            else None

    def align_backward(
        self, grad: Tensor, inp: AlignInputs, saved: Tensor
    ) -> tuple[Tensor, Tensor]:
        """Max pooling from the forward's winners when it kept them, else by recomputing."""
        if inp.pooling != "max" or saved.numel() == 0:
            return super().align_backward(grad, inp, saved)
        return tuple(
            self.extension.max_align_backward(grad, *inp.tensors, *self._codes(inp), saved)
        )
