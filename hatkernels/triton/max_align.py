"""Max pooling as fused Triton kernels, forward and backward.

One direction is a *query* side (the tokens that each take their best match: words for
``t2i``, image tokens for ``i2t``) and a *key* side (the other one). Both sides are packed
(``utils.pack``): only valid tokens are gathered and multiplied.

Forward (``_max_kernel``): a program owns a tile of ``BLOCK_Q`` packed query tokens and a
group of consecutive key items. It streams the group's packed key tokens in tiles of
``BLOCK_K`` rows (items may straddle tiles), computes the ``[BLOCK_K, BLOCK_Q]`` similarities
with ``tl.dot`` over ``D`` in ``BLOCK_D`` chunks, keeps each query token's running max for the
current key item, and when an item ends sums the maxima per query item (a one-hot reduction
over at most ``BLOCK_CQ`` items) and atomically adds them to the output (query items may
straddle query tiles). Nothing but the ``[Bi, Bt]`` output is written.

Backward: the same kernel in ``WINNERS`` mode stores the winning packed key row of every
(key item, query token) as int32 (in chunks of key items that fit ``_WINNER_BYTES``); then
``_grad_query_kernel`` forms ``dQ = P^T K`` and ``_grad_key_kernel`` forms ``dK = P Q`` with
``tl.dot``, where ``P[r, w]`` is the gradient of the pair's score when ``r`` is ``w``'s winner
and 0 otherwise. Each output row belongs to one program: no atomics, padding stays 0. Tied
maxima (marked -1) share their gradient among the tied tokens on a small torch path, as
``torch.amax`` and the other backends do.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch import Tensor

from .common import (
    Packed,
    dot_precision,
    items_per_tile,
    mma,
    pack,
    pick_configs,
    similarities,
    tile_of,
    tune_on_slice,
)

_WINNER_BYTES = 256 << 20

_FWD_CONFIGS = pick_configs(
    [
        triton.Config({"BLOCK_K": 128, "BLOCK_Q": 128, "BLOCK_D": 64}, num_warps=8, num_stages=3),
        triton.Config({"BLOCK_K": 128, "BLOCK_Q": 256, "BLOCK_D": 64}, num_warps=8, num_stages=3),
        triton.Config({"BLOCK_K": 64, "BLOCK_Q": 256, "BLOCK_D": 64}, num_warps=8, num_stages=4),
        triton.Config({"BLOCK_K": 64, "BLOCK_Q": 128, "BLOCK_D": 64}, num_warps=4, num_stages=4),
    ],
    triton.Config({"BLOCK_K": 16, "BLOCK_Q": 16, "BLOCK_D": 16}),
)
_GRAD_CONFIGS = pick_configs(
    [
        triton.Config({"BLOCK_K": 64, "BLOCK_Q": 64, "BLOCK_D": 128}, num_warps=4, num_stages=3),
        triton.Config({"BLOCK_K": 128, "BLOCK_Q": 64, "BLOCK_D": 128}, num_warps=8, num_stages=3),
        triton.Config({"BLOCK_K": 64, "BLOCK_Q": 128, "BLOCK_D": 64}, num_warps=4, num_stages=3),
    ],
    triton.Config({"BLOCK_K": 16, "BLOCK_Q": 16, "BLOCK_D": 16}),
)


@triton.autotune(configs=_FWD_CONFIGS, key=["KEY_SIZE", "QUERY_SIZE", "D"],
                 reset_to_zero=["out_ptr"])
@triton.heuristics({"BLOCK_CQ": lambda a: items_per_tile(a["BLOCK_Q"], a["q_min_len"])})
@triton.jit
def _max_kernel(
    q_ptr, q_rows_ptr, q_seg_ptr, q_len_ptr, n_q, q_min_len,
    k_ptr, k_rows_ptr, k_seg_ptr, k_off_ptr, k_item_base, k_items, items_per_group,
    out_ptr, stride_ok, stride_oq, win_ptr,
    D, KEY_SIZE, QUERY_SIZE,
    IS_MEAN: tl.constexpr, WINNERS: tl.constexpr, PRECISION: tl.constexpr,
    BLOCK_K: tl.constexpr, BLOCK_Q: tl.constexpr, BLOCK_D: tl.constexpr,
    BLOCK_CQ: tl.constexpr, GROUP: tl.constexpr = 8,
):
    n_qtiles = tl.cdiv(n_q, BLOCK_Q)
    n_groups = tl.cdiv(k_items, items_per_group)
    pid_q, pid_g = tile_of(tl.program_id(0), n_qtiles, n_groups, GROUP)

    cols = pid_q * BLOCK_Q + tl.arange(0, BLOCK_Q)
    cmask = cols < n_q
    q_rows = tl.load(q_rows_ptr + cols, mask=cmask, other=0).to(tl.int64)
    q_item = tl.load(q_seg_ptr + cols, mask=cmask, other=0)
    item_lo = tl.load(q_seg_ptr + pid_q * BLOCK_Q)
    item_hi = tl.load(q_seg_ptr + tl.minimum(pid_q * BLOCK_Q + BLOCK_Q, n_q) - 1)
    if IS_MEAN:
        q_len = tl.load(q_len_ptr + q_item, mask=cmask, other=1).to(tl.float32)
        weight = tl.where(cmask, 1.0 / q_len, 0.0)
    else:
        weight = tl.where(cmask, 1.0, 0.0)
    cq = tl.arange(0, BLOCK_CQ)
    onehot = ((q_item - item_lo)[None, :] == cq[:, None]) & cmask[None, :]
    out_cols = (item_lo + cq).to(tl.int64) * stride_oq
    cq_mask = cq <= item_hi - item_lo

    item0 = k_item_base + pid_g * items_per_group
    item1 = tl.minimum(item0 + items_per_group, k_item_base + k_items)
    r_start = tl.load(k_off_ptr + item0)
    r_end = tl.load(k_off_ptr + item1)
    best = tl.full([BLOCK_Q], float("-inf"), tl.float32)
    arg = tl.zeros([BLOCK_Q], dtype=tl.int32)
    ties = tl.zeros([BLOCK_Q], dtype=tl.int32)  # rows that reach the running max
    wide = tl.zeros([1], dtype=tl.int64)  # int64 offsets for the loop's scalar item ids
    cur = item0
    for r0 in range(r_start, r_end, BLOCK_K):
        ridx = r0 + tl.arange(0, BLOCK_K)
        rmask = ridx < r_end
        k_rows = tl.load(k_rows_ptr + ridx, mask=rmask, other=0).to(tl.int64)
        k_item = tl.load(k_seg_ptr + ridx, mask=rmask, other=-1)
        s = similarities(k_ptr, k_rows, rmask, q_ptr, q_rows, cmask, D,
                          BLOCK_K, BLOCK_Q, BLOCK_D, PRECISION)
        tile_end = tl.minimum(r0 + BLOCK_K, r_end)
        last = tl.load(k_seg_ptr + tile_end - 1)
        for c in range(cur, last + 1):
            masked = tl.where((k_item == c)[:, None], s, float("-inf"))
            top = tl.max(masked, axis=0)
            if WINNERS:
                at = r0 + tl.argmax(masked, axis=0).to(tl.int32)
                here = tl.sum((masked == top[None, :]).to(tl.int32), axis=0)
                ties = tl.where(top > best, here, tl.where(top == best, ties + here, ties))
                arg = tl.where(top > best, at, arg)
            best = tl.maximum(best, top)
            if tl.load(k_off_ptr + c + 1) <= tile_end:  # item c is complete
                if WINNERS:  # -1: a tie, whose gradient the host shares (_tied_grads)
                    tl.store(win_ptr + (c - k_item_base + wide) * n_q + cols,
                             tl.where(ties > 1, -1, arg), mask=cmask)
                    ties = tl.zeros([BLOCK_Q], dtype=tl.int32)
                else:
                    part = tl.sum(tl.where(onehot, (best * weight)[None, :], 0.0), axis=1)
                    tl.atomic_add(out_ptr + (c + wide) * stride_ok + out_cols, part,
                                  mask=cq_mask)
                best = tl.full([BLOCK_Q], float("-inf"), tl.float32)
        cur = last + (tl.load(k_off_ptr + last + 1) <= tile_end).to(tl.int32)


@triton.jit
def _pair_grads(win_ptr, grad_ptr, stride_gk, stride_gq, ridx, rmask, k_item, k_item_base,
                cols, cmask, q_item, weight, n_q):
    """``P[r, w]``: d score(item(r), item(w)) / d S[r, w] (the gradient where ``r`` wins)."""
    both = rmask[:, None] & cmask[None, :]
    win = tl.load(win_ptr + (k_item - k_item_base).to(tl.int64)[:, None] * n_q + cols[None, :],
                  mask=both, other=-1)
    g = tl.load(grad_ptr + k_item.to(tl.int64)[:, None] * stride_gk
                + q_item.to(tl.int64)[None, :] * stride_gq, mask=both, other=0.0)
    return tl.where(win == ridx[:, None], g * weight[None, :], 0.0)


@triton.jit
def _grad_dot(p, x, acc, PRECISION: tl.constexpr):
    """``acc + p @ x`` for float32 gradients ``p``: bfloat16 and float32 operands in ``x``'s
    dtype; float16 through TF32 instead, since small gradients underflow float16's range."""
    if x.dtype == tl.float16:
        out = mma(p, x.to(tl.float32), acc, "tf32")
    else:
        out = mma(p.to(x.dtype), x, acc, PRECISION)
    return out


@triton.jit
def _query_weights(q_seg_ptr, q_len_ptr, cols, cmask, IS_MEAN: tl.constexpr):
    q_item = tl.load(q_seg_ptr + cols, mask=cmask, other=0)
    if IS_MEAN:
        q_len = tl.load(q_len_ptr + q_item, mask=cmask, other=1).to(tl.float32)
        return q_item, tl.where(cmask, 1.0 / q_len, 0.0)
    return q_item, tl.where(cmask, 1.0, 0.0)


@triton.autotune(configs=_GRAD_CONFIGS, key=["KEY_SIZE", "QUERY_SIZE", "D"],
                 restore_value=["dq_ptr"])
@triton.jit
def _grad_query_kernel(
    q_rows_ptr, q_seg_ptr, q_len_ptr, n_q, dq_ptr,
    k_ptr, k_rows_ptr, k_seg_ptr, k_off_ptr, k_item_base, k_items,
    grad_ptr, stride_gk, stride_gq, win_ptr,
    D, KEY_SIZE, QUERY_SIZE,
    IS_MEAN: tl.constexpr, PRECISION: tl.constexpr,
    BLOCK_K: tl.constexpr, BLOCK_Q: tl.constexpr, BLOCK_D: tl.constexpr,
):
    """``dQ[w] += sum_r P[r, w] K[r]`` over the chunk's key rows; a program owns a tile of
    query tokens x a chunk of ``D``."""
    cols = tl.program_id(0) * BLOCK_Q + tl.arange(0, BLOCK_Q)
    cmask = cols < n_q
    dd = tl.program_id(1) * BLOCK_D + tl.arange(0, BLOCK_D)
    dmask = dd < D
    q_item, weight = _query_weights(q_seg_ptr, q_len_ptr, cols, cmask, IS_MEAN)
    r_start = tl.load(k_off_ptr + k_item_base)
    r_end = tl.load(k_off_ptr + k_item_base + k_items)
    acc = tl.zeros([BLOCK_Q, BLOCK_D], dtype=tl.float32)
    for r0 in range(r_start, r_end, BLOCK_K):
        ridx = r0 + tl.arange(0, BLOCK_K)
        rmask = ridx < r_end
        k_rows = tl.load(k_rows_ptr + ridx, mask=rmask, other=0).to(tl.int64)
        k_item = tl.load(k_seg_ptr + ridx, mask=rmask, other=0)
        p = _pair_grads(win_ptr, grad_ptr, stride_gk, stride_gq, ridx, rmask, k_item,
                        k_item_base, cols, cmask, q_item, weight, n_q)
        kt = tl.load(k_ptr + k_rows[:, None] * D + dd[None, :],
                     mask=rmask[:, None] & dmask[None, :], other=0.0)
        acc = _grad_dot(tl.trans(p), kt, acc, PRECISION)
    q_rows = tl.load(q_rows_ptr + cols, mask=cmask, other=0).to(tl.int64)
    where = dq_ptr + q_rows[:, None] * D + dd[None, :]
    both = cmask[:, None] & dmask[None, :]
    tl.store(where, tl.load(where, mask=both, other=0.0) + acc, mask=both)


@triton.autotune(configs=_GRAD_CONFIGS, key=["KEY_SIZE", "QUERY_SIZE", "D"],
                 restore_value=["dk_ptr"])
@triton.jit
def _grad_key_kernel(
    q_ptr, q_rows_ptr, q_seg_ptr, q_len_ptr, n_q,
    k_rows_ptr, k_seg_ptr, k_off_ptr, k_item_base, k_items, dk_ptr,
    grad_ptr, stride_gk, stride_gq, win_ptr,
    D, KEY_SIZE, QUERY_SIZE,
    IS_MEAN: tl.constexpr, PRECISION: tl.constexpr,
    BLOCK_K: tl.constexpr, BLOCK_Q: tl.constexpr, BLOCK_D: tl.constexpr,
):
    """``dK[r] += sum_w P[r, w] Q[w]`` over all query tokens; a program owns a tile of the
    chunk's key rows x a chunk of ``D``."""
    r_start = tl.load(k_off_ptr + k_item_base)
    r_end = tl.load(k_off_ptr + k_item_base + k_items)
    ridx = r_start + tl.program_id(0) * BLOCK_K + tl.arange(0, BLOCK_K)
    rmask = ridx < r_end
    dd = tl.program_id(1) * BLOCK_D + tl.arange(0, BLOCK_D)
    dmask = dd < D
    k_item = tl.load(k_seg_ptr + ridx, mask=rmask, other=0)
    acc = tl.zeros([BLOCK_K, BLOCK_D], dtype=tl.float32)
    for c0 in range(0, n_q, BLOCK_Q):
        cols = c0 + tl.arange(0, BLOCK_Q)
        cmask = cols < n_q
        q_item, weight = _query_weights(q_seg_ptr, q_len_ptr, cols, cmask, IS_MEAN)
        p = _pair_grads(win_ptr, grad_ptr, stride_gk, stride_gq, ridx, rmask, k_item,
                        k_item_base, cols, cmask, q_item, weight, n_q)
        q_rows = tl.load(q_rows_ptr + cols, mask=cmask, other=0).to(tl.int64)
        qt = tl.load(q_ptr + q_rows[:, None] * D + dd[None, :],
                     mask=cmask[:, None] & dmask[None, :], other=0.0)
        acc = _grad_dot(p, qt, acc, PRECISION)
    k_rows = tl.load(k_rows_ptr + ridx, mask=rmask, other=0).to(tl.int64)
    where = dk_ptr + k_rows[:, None] * D + dd[None, :]
    both = rmask[:, None] & dmask[None, :]
    tl.store(where, tl.load(where, mask=both, other=0.0) + acc, mask=both)


def _sides(images: Packed, texts: Packed, direction: str, n_texts: int):
    """(query, key, stride of the output along key items, along query items) per direction."""
    if direction == "t2i":
        return texts, images, n_texts, 1
    return images, texts, 1, n_texts


def _directions(direction: str) -> tuple[str, ...]:
    return ("t2i", "i2t") if direction == "both" else (direction,)


def _items_per_group(key: Packed) -> int:
    """Key items per program: about 256 packed key rows, so a group spans a few row tiles."""
    return max(1, 256 // max(1, key.total // key.items))


def _launch_max(query: Packed, key: Packed, out: Tensor, stride_ok: int, stride_oq: int,
                is_mean: bool, win: Tensor | None, item_base: int, n_items: int) -> None:
    """Scores atomically added into ``out`` or, given ``win``, winners of the key items
    ``[item_base, item_base + n_items)`` stored there (``out`` is then only a placeholder
    that autotuning may zero)."""
    target = out if win is None else win
    per_group = _items_per_group(key)
    n_groups = triton.cdiv(n_items, per_group)

    def grid(meta):
        return (triton.cdiv(query.total, meta["BLOCK_Q"]) * n_groups,)

    _max_kernel[grid](
        query.x, query.rows, query.seg, query.lengths, query.total, query.min_len,
        key.x, key.rows, key.seg, key.offsets, item_base, n_items, per_group,
        target, stride_ok, stride_oq, target,
        query.x.shape[2], key.size, query.size,
        IS_MEAN=is_mean, WINNERS=win is not None, PRECISION=dot_precision(query.x.dtype),
    )


def max_align_forward(images: Tensor, texts: Tensor, image_lengths: Tensor,
                      text_lengths: Tensor, direction: str, reduce: str) -> Tensor:
    """``[Bi, Bt]`` float32 max-pooled scores (the backend contract of ``backends/base.py``)."""
    tune_on_slice(max_align_forward, images, texts, image_lengths, text_lengths, direction,
                  reduce)
    v, t = pack(images, image_lengths), pack(texts, text_lengths)
    total = torch.zeros(images.shape[0], texts.shape[0], dtype=torch.float32,
                        device=images.device)
    for k, one in enumerate(_directions(direction)):
        query, key, stride_ok, stride_oq = _sides(v, t, one, texts.shape[0])
        # Autotuning zeroes the kernel's output between trials: the second direction of
        # "both" gets its own buffer.
        out = total if k == 0 else torch.zeros_like(total)
        _launch_max(query, key, out, stride_ok, stride_oq, reduce == "mean", None, 0, key.items)
        if k:
            total += out
    return total


def _tied_grads(query: Packed, key: Packed, grad: Tensor, stride_gk: int, stride_gq: int,
                is_mean: bool, tied: Tensor, base: int, d_query: Tensor, d_key: Tensor,
                per_step: int = 4096) -> None:
    """Gradient of tied maxima, shared evenly among the tied key tokens (as ``torch.amax``
    does, and the other backends): the kernels skip the (key item, query token) entries that
    the winners kernel marked -1; here they are recomputed in float32 with torch. Ties are
    measure-zero for real data, so this is the rare path."""
    dim, size = query.x.shape[2], key.size
    q_flat, dq_flat, dk_flat = query.x.view(-1, dim), d_query.view(-1, dim), d_key.view(-1, dim)
    for e0 in range(0, tied.shape[0], max(1, per_step // size)):
        item = tied[e0 : e0 + max(1, per_step // size), 0].long() + base
        token = tied[e0 : e0 + max(1, per_step // size), 1].long()
        q_rows, q_item = query.rows[token].long(), query.seg[token].long()
        q = q_flat[q_rows].float()
        g = grad.view(-1)[item * stride_gk + q_item * stride_gq]
        if is_mean:
            g = g / query.lengths[q_item].float()
        valid = torch.arange(size, device=q.device) < key.lengths[item].long()[:, None]
        k = torch.where(valid[..., None], key.x[item].float(), torch.zeros((), device=q.device))
        s = torch.einsum("erd,ed->er", k, q).masked_fill(~valid, float("-inf"))
        winners = (s == s.amax(1, keepdim=True)) & valid
        share = winners * (g / winners.sum(1))[:, None]
        dq_flat.index_add_(0, q_rows, torch.einsum("er,erd->ed", share, k))
        k_rows = (item[:, None] * size + torch.arange(size, device=q.device)).reshape(-1)
        dk_flat.index_add_(0, k_rows, (share[..., None] * q[:, None, :]).reshape(-1, dim))


def _grads_of_chunk(query: Packed, key: Packed, grad: Tensor, stride_gk: int, stride_gq: int,
                    is_mean: bool, win: Tensor, base: int, n_items: int, d_query: Tensor,
                    d_key: Tensor) -> None:
    """Winners of key items ``[base, base + n_items)``, then their terms of dQ and dK."""
    _launch_max(query, key, grad, stride_gk, stride_gq, is_mean, win, base, n_items)
    n_rows = int(key.offsets[base + n_items] - key.offsets[base])
    dim = query.x.shape[2]
    sizes = (dim, key.size, query.size)
    precision = dot_precision(query.x.dtype)
    _grad_query_kernel[lambda m: (triton.cdiv(query.total, m["BLOCK_Q"]),
                                  triton.cdiv(dim, m["BLOCK_D"]))](
        query.rows, query.seg, query.lengths, query.total, d_query,
        key.x, key.rows, key.seg, key.offsets, base, n_items,
        grad, stride_gk, stride_gq, win, *sizes,
        IS_MEAN=is_mean, PRECISION=precision,
    )
    _grad_key_kernel[lambda m: (triton.cdiv(n_rows, m["BLOCK_K"]),
                                triton.cdiv(dim, m["BLOCK_D"]))](
        query.x, query.rows, query.seg, query.lengths, query.total,
        key.rows, key.seg, key.offsets, base, n_items, d_key,
        grad, stride_gk, stride_gq, win, *sizes,
        IS_MEAN=is_mean, PRECISION=precision,
    )
    tied = (win[: n_items * query.total].view(n_items, query.total) < 0).nonzero()
    if tied.numel():
        _tied_grads(query, key, grad, stride_gk, stride_gq, is_mean, tied, base, d_query,
                    d_key)


def max_align_backward(grad: Tensor, images: Tensor, texts: Tensor, image_lengths: Tensor,
                       text_lengths: Tensor, direction: str, reduce: str) -> tuple[Tensor, Tensor]:
    """Gradients of ``sum(grad * scores)`` w.r.t. images and texts, exactly 0 on padding."""
    v, t = pack(images, image_lengths), pack(texts, text_lengths)
    grad = grad.to(torch.float32).contiguous()
    d_images = torch.zeros(images.shape, dtype=torch.float32, device=images.device)
    d_texts = torch.zeros(texts.shape, dtype=torch.float32, device=texts.device)
    for one in _directions(direction):
        query, key, stride_gk, stride_gq = _sides(v, t, one, texts.shape[0])
        d_query, d_key = (d_texts, d_images) if one == "t2i" else (d_images, d_texts)
        chunk = max(1, min(key.items, _WINNER_BYTES // (4 * max(1, query.total))))
        win = torch.empty(chunk * query.total, dtype=torch.int32, device=images.device)
        for base in range(0, key.items, chunk):
            _grads_of_chunk(query, key, grad, stride_gk, stride_gq, reduce == "mean", win, base,
                            min(chunk, key.items - base), d_query, d_key)
    return d_images.to(images.dtype), d_texts.to(texts.dtype)
