"""HAT's scan pooling as fused Triton kernels.

A program owns one image ``i`` and a block of ``BT`` captions, laid out as ``BT * NP`` columns
(``NP``: the caption size rounded up to a power of two, so that per-caption reductions are
reshapes). Image tokens stream in tiles of ``BLOCK_R`` rows up to the image's length (padded
tiles are never visited); similarities come from ``tl.dot`` over ``D``. Both normalisations
span the whole ``(r, w)`` block of a pair, so:

- ``i2t`` (HAT's direction): the norm across image tokens per word needs every row first.
  With one row tile (``SINGLE``: ``M <= BLOCK_R``, e.g. 49 tokens) it is computed in place;
  otherwise pass 1 accumulates ``sum_r a^2`` per word over the row tiles and pass 2 recomputes
  the similarities. The softmax over a caption's words fits a tile; ``<V_r, c_r> =
  sum_w alpha S`` and ``|c_r|^2 = alpha_r^T G_j alpha_r`` with the caption Gram matrices
  ``G_j = T_j T_j^T`` (precomputed, block-diagonal ``[W, W]`` per program), so the attended
  context ``c_r`` is never formed.
- ``t2i``: the norm across words per image token fits a tile; the softmax over image tokens is
  online across row tiles (running max, sum and ``sum alpha S``, as in FlashAttention), and
  ``|c_w|^2 = alpha_w^T G_i alpha_w`` with the image Gram ``V_i V_i^T`` computed per pair of
  row tiles (with one row tile: once, from the tile kept in registers; with several, the
  row tiles' attention is recomputed, which costs about ``tiles`` times the similarities:
  HAT's level shapes use ``i2t``).

Programs run in grouped order (``GROUP`` images x every caption block, as tiled GEMMs do), so
that a wave of programs shares a few images and a few caption blocks in the L2 cache instead
of streaming every caption once per image. Each program writes only its ``[1, BT]`` block of
the output (for ``both`` the ``t2i`` kernel adds to the ``i2t`` scores; autotuning restores
the output between its trial runs). Captions of more than ``MAX_WORDS`` tokens (rounded up
to a power of two) do not fit a program: the backend reports them to dispatch. The backward
is in ``scan_backward``.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch import Tensor

from .common import (
    EPS,
    SCAN_CONFIGS,
    SCAN_HEURISTICS,
    caption_grams,
    columns,
    grams,
    i2t_col_sq,
    i2t_tile,
    leaky,
    next_pow2,
    norms,
    precisions,
    similarities,
    tile_of,
    tune_on_slice,
)

_MAX_IMAGES = 65535


@triton.jit
def _write(where, value, mask, ACCUMULATE: tl.constexpr):
    """Store a program's output block, or add it to what is there (the second direction)."""
    if ACCUMULATE:
        value += tl.load(where, mask=mask, other=0.0)
    tl.store(where, value, mask=mask)


@triton.jit
def _program_block(v_len_ptr, t_len_ptr, Bi, Bt, M, N, NP: tl.constexpr, BT: tl.constexpr,
                   GROUP: tl.constexpr):
    """What a forward program (either direction) owns, in grouped order: image ``i``, its
    caption block from ``j0`` laid out by ``columns`` (``j, w``, validity, text rows), the
    image's length and its first row in ``images.view(-1, D)``."""
    i, block = tile_of(tl.program_id(0), Bi, tl.cdiv(Bt, BT), GROUP)
    j0 = block * BT
    j, w, cvalid, t_rows = columns(t_len_ptr, j0, Bt, N, NP, BT)
    return i, j0, j, w, cvalid, t_rows, tl.load(v_len_ptr + i), i.to(tl.int64) * M


@triton.autotune(configs=SCAN_CONFIGS, key=["M", "N", "D"])
@triton.heuristics(SCAN_HEURISTICS)
@triton.jit
def _scan_i2t_kernel(
    v_ptr, v_len_ptr, v_norm_ptr, t_ptr, t_len_ptr, gram_ptr, out_ptr,
    Bi, Bt, M, N, D, lam,
    IS_MEAN: tl.constexpr, ACCUMULATE: tl.constexpr, PRECISION: tl.constexpr,
    GRAM_PRECISION: tl.constexpr, NP: tl.constexpr, BT: tl.constexpr, SINGLE: tl.constexpr,
    BLOCK_R: tl.constexpr, BLOCK_W: tl.constexpr, BLOCK_D: tl.constexpr,
    GROUP: tl.constexpr = 8,
):
    W: tl.constexpr = BT * NP
    i, j0, j, w, cvalid, t_rows, m_i, v_row0 = _program_block(v_len_ptr, t_len_ptr, Bi, Bt, M,
                                                              N, NP, BT, GROUP)
    gram = caption_grams(gram_ptr, j, w, cvalid, N, NP, BT)
    col_sq = tl.zeros([W], dtype=tl.float32)
    if not SINGLE:
        col_sq = i2t_col_sq(v_ptr, v_row0, m_i, t_ptr, t_rows, cvalid, D,
                             BLOCK_R, W, BLOCK_D, PRECISION)
    total = tl.zeros([BT], dtype=tl.float32)
    for r0 in range(0, m_i, BLOCK_R):
        _, rvalid, v_norm, _, _, _, _, _, num, c_sq = i2t_tile(
            v_ptr, v_norm_ptr, v_row0, r0, m_i, t_ptr, t_rows, cvalid, gram, col_sq, D, lam,
            SINGLE, BLOCK_R, BT, NP, BLOCK_D, PRECISION, GRAM_PRECISION)
        q = num / tl.maximum(v_norm[:, None] * tl.sqrt(tl.maximum(c_sq, 0.0)), EPS)
        total += tl.sum(tl.where(rvalid[:, None], q, 0.0), axis=0)
    if IS_MEAN:
        total = total / m_i.to(tl.float32)
    jb = j0 + tl.arange(0, BT)
    _write(out_ptr + i.to(tl.int64) * Bt + jb, total, jb < Bt, ACCUMULATE)


@triton.jit
def _t2i_logits(v_ptr, rows, rvalid, t_ptr, t_rows, cvalid, D, lam,
                BLOCK_R: tl.constexpr, BT: tl.constexpr, NP: tl.constexpr,
                BLOCK_D: tl.constexpr, PRECISION: tl.constexpr):
    """Similarities and the logits ``lam * b`` (normalised across each caption's words)."""
    s = similarities(v_ptr, rows, rvalid, t_ptr, t_rows, cvalid, D,
                      BLOCK_R, BT * NP, BLOCK_D, PRECISION)
    a3 = tl.reshape(leaky(s), [BLOCK_R, BT, NP])
    b3 = a3 / (tl.sqrt(tl.sum(a3 * a3, axis=2)) + EPS)[:, :, None]
    x = tl.where(rvalid[:, None], lam * tl.reshape(b3, [BLOCK_R, BT * NP]), float("-inf"))
    return s, x


@triton.autotune(configs=SCAN_CONFIGS, key=["M", "N", "D"], restore_value=["out_ptr"])
@triton.heuristics(SCAN_HEURISTICS)
@triton.jit
def _scan_t2i_kernel(
    v_ptr, v_len_ptr, t_ptr, t_len_ptr, t_norm_ptr, out_ptr,
    Bi, Bt, M, N, D, lam,
    IS_MEAN: tl.constexpr, ACCUMULATE: tl.constexpr, PRECISION: tl.constexpr,
    GRAM_PRECISION: tl.constexpr, NP: tl.constexpr, BT: tl.constexpr, SINGLE: tl.constexpr,
    BLOCK_R: tl.constexpr, BLOCK_W: tl.constexpr, BLOCK_D: tl.constexpr,
    GROUP: tl.constexpr = 8,
):
    W: tl.constexpr = BT * NP
    i, j0, j, w, cvalid, t_rows, m_i, v_row0 = _program_block(v_len_ptr, t_len_ptr, Bi, Bt, M,
                                                              N, NP, BT, GROUP)

    # Online softmax over image tokens, per word: running max, sum, and sum of p * S.
    top = tl.full([W], float("-inf"), tl.float32)
    den = tl.zeros([W], dtype=tl.float32)
    num = tl.zeros([W], dtype=tl.float32)
    p = tl.zeros([BLOCK_R, W], dtype=tl.float32)
    for r0 in range(0, m_i, BLOCK_R):
        rows = r0 + tl.arange(0, BLOCK_R)
        s, x = _t2i_logits(v_ptr, v_row0 + rows, rows < m_i, t_ptr, t_rows, cvalid, D, lam,
                           BLOCK_R, BT, NP, BLOCK_D, PRECISION)
        new_top = tl.maximum(top, tl.max(x, axis=0))
        scale = tl.exp(top - new_top)
        p = tl.exp(x - new_top[None, :])
        den = den * scale + tl.sum(p, axis=0)
        num = num * scale + tl.sum(p * s, axis=0)
        top = new_top

    # |c_w|^2 = alpha_w^T (V V^T) alpha_w over pairs of row tiles.
    if SINGLE:
        rows = tl.arange(0, BLOCK_R)
        rvalid = rows < m_i
        gram = similarities(v_ptr, v_row0 + rows, rvalid, v_ptr, v_row0 + rows, rvalid, D,
                             BLOCK_R, BLOCK_R, BLOCK_D, PRECISION)
        alpha = p / den[None, :]
        c_sq = tl.sum(alpha * tl.dot(gram, alpha, input_precision=GRAM_PRECISION), axis=0)
    else:
        c_sq = tl.zeros([W], dtype=tl.float32)
        for r1 in range(0, m_i, BLOCK_R):
            rows1 = r1 + tl.arange(0, BLOCK_R)
            _, x1 = _t2i_logits(v_ptr, v_row0 + rows1, rows1 < m_i, t_ptr, t_rows, cvalid, D,
                                lam, BLOCK_R, BT, NP, BLOCK_D, PRECISION)
            alpha1 = tl.exp(x1 - top[None, :]) / den[None, :]
            for r2 in range(0, m_i, BLOCK_R):
                rows2 = r2 + tl.arange(0, BLOCK_R)
                _, x2 = _t2i_logits(v_ptr, v_row0 + rows2, rows2 < m_i, t_ptr, t_rows, cvalid,
                                    D, lam, BLOCK_R, BT, NP, BLOCK_D, PRECISION)
                alpha2 = tl.exp(x2 - top[None, :]) / den[None, :]
                gram = similarities(v_ptr, v_row0 + rows1, rows1 < m_i, v_ptr, v_row0 + rows2,
                                     rows2 < m_i, D, BLOCK_R, BLOCK_R, BLOCK_D, PRECISION)
                c_sq += tl.sum(alpha1 * tl.dot(gram, alpha2, input_precision=GRAM_PRECISION),
                               axis=0)

    t_norm = tl.load(t_norm_ptr + t_rows, mask=cvalid, other=0.0)
    q = (num / den) / tl.maximum(t_norm * tl.sqrt(tl.maximum(c_sq, 0.0)), EPS)
    total = tl.sum(tl.reshape(tl.where(cvalid, q, 0.0), [BT, NP]), axis=1)
    jb = j0 + tl.arange(0, BT)
    if IS_MEAN:
        t_len = tl.load(t_len_ptr + jb, mask=jb < Bt, other=1).to(tl.float32)
        total = total / t_len
    _write(out_ptr + i.to(tl.int64) * Bt + jb, total, jb < Bt, ACCUMULATE)


def scan_align_forward(images: Tensor, texts: Tensor, image_lengths: Tensor,
                       text_lengths: Tensor, direction: str, reduce: str,
                       lambda_softmax: float) -> Tensor:
    """``[Bi, Bt]`` float32 scan-pooled scores for captions of at most ``MAX_WORDS`` tokens
    (the backend reports longer ones as unsupported, so dispatch picks another backend)."""
    tune_on_slice(scan_align_forward, images, texts, image_lengths, text_lengths, direction,
                  reduce, lambda_softmax)
    (n_images, m, dim), (n_texts, n, _) = images.shape, texts.shape
    v_len, t_len = image_lengths.to(torch.int32), text_lengths.to(torch.int32)
    total = torch.empty(n_images, n_texts, dtype=torch.float32, device=images.device)
    precision, gram_precision = precisions(images.dtype)
    common = dict(IS_MEAN=reduce == "mean", PRECISION=precision,
                  GRAM_PRECISION=gram_precision, NP=next_pow2(n))

    v_norm = norms(images, image_lengths) if direction in ("i2t", "both") else None
    gram = grams(texts, text_lengths) if direction in ("i2t", "both") else None
    t_norm = norms(texts, text_lengths) if direction in ("t2i", "both") else None
    for b0 in range(0, n_images, _MAX_IMAGES):  # bounds the (1D) grid
        b1 = min(n_images, b0 + _MAX_IMAGES)

        def grid(meta, count=b1 - b0):
            return (triton.cdiv(n_texts, max(1, meta["BLOCK_W"] // meta["NP"])) * count,)

        if direction in ("i2t", "both"):
            _scan_i2t_kernel[grid](
                images[b0:b1], v_len[b0:b1], v_norm[b0:b1], texts, t_len, gram, total[b0:b1],
                b1 - b0, n_texts, m, n, dim, float(lambda_softmax), ACCUMULATE=False,
                **common,
            )
        if direction in ("t2i", "both"):
            _scan_t2i_kernel[grid](
                images[b0:b1], v_len[b0:b1], texts, t_len, t_norm, total[b0:b1],
                b1 - b0, n_texts, m, n, dim, float(lambda_softmax),
                ACCUMULATE=direction == "both",
                **common,
            )
    return total
