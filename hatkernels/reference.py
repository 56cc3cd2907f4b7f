"""The naive way, written straight from the operators' definition (``docs/operators.md``): the
float64 reference and the baseline.

For a chunk of images it builds the whole ``[bi, Bt, M, N]`` similarity tensor, masks the
padding and pools it; scan pooling forms the attended context vectors ``c`` explicitly. It
is slow and memory-hungry on purpose: tests compare every backend with it in float64, and
benchmarks time it as "the naive PyTorch way". Autograd flows through plain torch ops; norms
use ``torch.linalg.vector_norm``, whose gradient at a zero vector is 0 (as in every backend),
so an all-zero valid token gets a finite gradient.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from .constants import EPS, LEAKY_SLOPE


def _mask(lengths: Tensor, size: int) -> Tensor:
    return torch.arange(size, device=lengths.device) < lengths[:, None]


def _pool(q: Tensor, mask: Tensor, reduce: str, dim: int) -> Tensor:
    q = torch.where(mask, q, torch.zeros((), dtype=q.dtype, device=q.device))
    total = q.sum(dim)
    return total / mask.sum(dim).to(q.dtype) if reduce == "mean" else total


def _max_pair_scores(s, vm, tm, direction, reduce):
    """s: [bi, bt, M, N] similarities; vm [bi, 1, M, 1], tm [1, bt, 1, N] validity."""
    neg_inf = torch.tensor(float("-inf"), dtype=s.dtype, device=s.device)
    out = 0
    if direction in ("t2i", "both"):
        q = torch.where(vm, s, neg_inf).amax(2)  # [bi, bt, N]: best image token per word
        out = out + _pool(q, tm[:, :, 0, :].expand_as(q), reduce, 2)
    if direction in ("i2t", "both"):
        q = torch.where(tm, s, neg_inf).amax(3)  # [bi, bt, M]: best word per image token
        out = out + _pool(q, vm[:, :, :, 0].expand_as(q), reduce, 2)
    return out


def _cosine(x: Tensor, c: Tensor) -> Tensor:
    num = (x * c).sum(-1)
    return num / torch.clamp(x.norm(dim=-1) * c.norm(dim=-1), min=EPS)


def _scan_pair_scores(s, v, t, vm, tm, direction, reduce, lam):
    """s: [bi, bt, M, N]; v [bi, M, D], t [bt, N, D] zero-padded; masks as in max."""
    valid = vm & tm
    zero = torch.zeros((), dtype=s.dtype, device=s.device)
    neg_inf = torch.tensor(float("-inf"), dtype=s.dtype, device=s.device)
    a = torch.where(valid, F.leaky_relu(s, LEAKY_SLOPE), zero)
    out = 0
    if direction in ("t2i", "both"):
        b = a / (torch.linalg.vector_norm(a, dim=3, keepdim=True) + EPS)  # across words
        alpha = torch.softmax(torch.where(vm, lam * b, neg_inf), dim=2)  # words attend regions
        c = torch.einsum("ijrw,ird->ijwd", alpha, v)  # [bi, bt, N, D]
        q = _cosine(t[None], c)  # [bi, bt, N]
        out = out + _pool(q, tm[:, :, 0, :].expand_as(q), reduce, 2)
    if direction in ("i2t", "both"):
        b = a / (torch.linalg.vector_norm(a, dim=2, keepdim=True) + EPS)  # across regions
        alpha = torch.softmax(torch.where(tm, lam * b, neg_inf), dim=3)  # regions attend words
        c = torch.einsum("ijrw,jwd->ijrd", alpha, t)  # [bi, bt, M, D]
        q = _cosine(v[:, None], c)  # [bi, bt, M]
        out = out + _pool(q, vm[:, :, :, 0].expand_as(q), reduce, 2)
    return out


def naive_align(
    images: Tensor,
    texts: Tensor,
    image_lengths: Tensor,
    text_lengths: Tensor,
    *,
    pooling: str = "max",
    direction: str = "t2i",
    reduce: str = "mean",
    lambda_softmax: float = 9.0,
    chunk: int = 16,
    dtype: torch.dtype | None = None,
) -> Tensor:
    """One level, the naive way: ``[Bi, Bt]`` scores in ``dtype`` (default: the inputs').

    ``images`` ``[Bi, M, D]``, ``texts`` ``[Bt, N, D]``; lengths int tensors ``[Bi]``, ``[Bt]``.
    Padding is zero-filled (through ``torch.where``, so NaN there never propagates, gradients
    included) before the ``[chunk, Bt, M, N]`` similarities are built.
    """
    dtype = dtype or images.dtype
    vm2 = _mask(image_lengths, images.shape[1])
    tm2 = _mask(text_lengths, texts.shape[1])
    v = torch.where(
        vm2[..., None], images.to(dtype), torch.zeros((), dtype=dtype, device=images.device)
    )
    t = torch.where(
        tm2[..., None], texts.to(dtype), torch.zeros((), dtype=dtype, device=images.device)
    )
    tm = tm2[None, :, None, :]
    rows = []
    for i0 in range(0, images.shape[0], chunk):
        vc = v[i0 : i0 + chunk]
        vm = vm2[i0 : i0 + chunk, None, :, None]
        s = torch.einsum("imd,jnd->ijmn", vc, t)
        if pooling == "max":
            rows.append(_max_pair_scores(s, vm, tm, direction, reduce))
        else:
            rows.append(_scan_pair_scores(s, vc, t, vm, tm, direction, reduce, lambda_softmax))
    return torch.cat(rows, 0)


def naive_hier_align(
    images: list[Tensor],
    texts: list[Tensor],
    image_lengths: list[Tensor],
    text_lengths: list[Tensor],
    *,
    weights: list[float] | None = None,
    **kwargs,
) -> Tensor:
    """Several levels the naive way: ``sum_l weight_l * naive_align(level l)``."""
    weights = weights or [1.0] * len(images)
    return sum(
        w * naive_align(v, t, vl, tl, **kwargs)
        for w, v, t, vl, tl in zip(weights, images, texts, image_lengths, text_lengths)
    )
