"""The alignment operators, registered as ``torch.library`` custom ops, and ``align``, which
runs one level's ``AlignInputs`` through the op of its pooling."""

from __future__ import annotations

from torch import Tensor

from hatkernels.inputs import AlignInputs

from .max_align import max_align
from .scan_align import scan_align


def align(inp: AlignInputs, backend: str) -> Tensor:
    """``[Bi, Bt]`` scores of one level, differentiable, computed by ``backend`` (the op's
    second output, what the backend keeps for the backward, stays with autograd)."""
    if inp.pooling == "max":
        scores, _ = max_align(*inp.tensors, inp.direction, inp.reduce, backend,
                              inp.memory_budget, inp.needs_grad)  # fmt: skip
        return scores
    scores, _ = scan_align(*inp.tensors, inp.direction, inp.reduce, float(inp.lambda_softmax),
                           backend, inp.memory_budget, inp.needs_grad)  # fmt: skip
    return scores


__all__ = ["align", "max_align", "scan_align"]
