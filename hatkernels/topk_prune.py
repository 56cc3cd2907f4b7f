"""Pruning for ``hier_topk``: which gallery items of a chunk can still enter a query's top k.

For max pooling (``t2i`` or ``i2t``) on the cpu backend, where the CPU screens the max forward
with int8 codes, ``CpuBackend.max_align_bounds`` gives every (image, caption) pair an interval
holding the float32 score, from the int8 GEMM and one pass per image, with no float32 dot
product (``csrc/cpu/max_align_screen.h`` derives the bound). ``hier_topk`` then scores
exactly, per block of queries, only the gallery items whose upper bound reaches the query's
threshold ``T``: the ``k``-th largest of the exact scores it already holds and of the chunk's
lower bounds. An item below ``T`` scores below ``k`` items that score at least ``T``, so the
result holds the unpruned call's items (its values computed in smaller batches).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

from .dispatch import select_backend
from .inputs import AlignInputs
from .ops.common import _nonfinite_items

# Float32 unit roundoff doubled: a generous relative error per float32 operation.
_ROUND = 2.0**-23


def hier_bounds(image_levels: Sequence[Tensor], text_levels: Sequence[Tensor],
                image_lengths: Sequence[Tensor], text_lengths: Sequence[Tensor],
                weights: Sequence[float], *, pooling: str, direction: str, reduce: str,
                lambda_softmax: float, backend: str,
                memory_budget: int) -> tuple[Tensor, Tensor] | None:
    """float64 ``[Bi, Bt]`` lower and upper bounds of ``hier_align``'s float32 scores for
    these levels (lengths as tensors, one per level), or None where there are none: another
    pooling or direction, a level the cpu backend would not run, a non-finite valid token, a
    CPU that cannot screen. The levels' weighted float32 sum adds its rounding to the
    interval."""
    if pooling != "max" or direction not in ("t2i", "i2t"):
        return None
    lower = upper = None
    margin = 0.0
    for w, v, t, vl, tl in zip(weights, image_levels, text_levels, image_lengths, text_lengths):
        if any(x.device.type != "cpu" or x.dtype != torch.float32 for x in (v, t)):
            return None  # the cpu backend's bounds only; hier_align checks the rest
        inp = AlignInputs(v.contiguous(), t.contiguous(), vl, tl, pooling, direction, reduce,
                          float(lambda_softmax), memory_budget)
        chosen = select_backend(inp, backend)
        if chosen.name != "cpu":
            return None
        if _nonfinite_items(v, vl) is not None or _nonfinite_items(t, tl) is not None:
            return None
        level = chosen.max_align_bounds(inp)
        if level is None:
            return None
        lo, hi = (w * level[0], w * level[1]) if w >= 0 else (w * level[1], w * level[0])
        margin = margin + torch.maximum(lo.abs(), hi.abs())
        lower = lo if lower is None else lower + lo
        upper = hi if upper is None else upper + hi
    slack = (len(weights) + 1) * _ROUND * margin + 1e-30
    return lower - slack, upper + slack


def thresholds(kept: Tensor, lower: Tensor, k: int) -> Tensor:
    """Per query (rows), the ``k``-th largest of the exact scores kept so far (``kept``,
    float64, ``-inf`` for an empty slot) and of the chunk's lower bounds: every item whose
    upper bound is below it is out of the top ``k``."""
    both = torch.cat([kept.nan_to_num(nan=-torch.inf), lower], 1)
    if both.shape[1] < k:
        return torch.full((both.shape[0],), -torch.inf, dtype=torch.float64)
    return both.topk(k, dim=1).values[:, -1]


__all__ = ["hier_bounds", "thresholds"]
