"""Backward of HAT's scan pooling as Triton kernels that form ``dS = dL/dS`` + two GEMMs.

For a pair block a kernel recomputes the forward and forms ``dS`` ``[m, n]`` through the
cosine, the Gram identity, the softmax, the norm and the LeakyReLU. ``dS`` of a chunk of
images goes to a float32 buffer ``[chunk, M, Bt * N]`` (sized to ``_DS_BYTES``), then
``dV = dS T`` and ``dT += dS^T V`` are cuBLAS GEMMs over zero-padded inputs (16-bit inputs in
their dtype, on tensor cores). Besides ``dS`` a pair feeds two small terms, accumulated in
registers over a group and then atomically: the gradient of the attended side's Gram matrix
(``dG = sum dc2 alpha alpha^T``, applied last as ``2 dG X``) and of the query side's token
norms (applied as ``d|x| x / |x|``).

- ``i2t`` (HAT's direction; ``_scan_i2t_backward_kernel``): a program owns a block of
  captions and a group of images. The norm across image tokens couples the whole pair, so
  with several row tiles one pass accumulates ``sum_r a^2``, a second ``sum_r (dL/db) a`` per
  word and a third forms ``dS``; with one row tile (``SINGLE``) it is one pass in registers.
- ``t2i`` (``_scan_t2i_backward_kernel``): a program owns one image, all its tokens in one
  tile (at most ``common.MAX_T2I_TOKENS``), and a group of caption blocks; the softmax over image
  tokens and the image Gram ``V_i V_i^T`` then stay in registers.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import triton
import triton.language as tl
from torch import Tensor

from .common import (
    EPS,
    LEAKY_SLOPE,
    SCAN_CONFIGS,
    SCAN_HEURISTICS,
    caption_grams,
    columns,
    expand_words,
    grams,
    i2t_col_sq,
    i2t_tile,
    leaky,
    next_pow2,
    norms,
    pick_configs,
    precisions,
    similarities,
)

_DS_BYTES = 256 << 20
_IMAGES_PER_GROUP = 8
_BLOCKS_PER_GROUP = 8
_T2I_CONFIGS = pick_configs(
    [
        triton.Config({"BLOCK_W": 64, "BLOCK_D": 64}, num_warps=4, num_stages=3),
        triton.Config({"BLOCK_W": 128, "BLOCK_D": 64}, num_warps=8, num_stages=3),
        triton.Config({"BLOCK_W": 32, "BLOCK_D": 64}, num_warps=4, num_stages=3),
    ],
    triton.Config({"BLOCK_W": 32, "BLOCK_D": 16}),
)


@triton.jit
def _i2t_tile_grads(s, a, alpha, alpha_g, num, c_sq, v_norm, g, rvalid, lam,
                    BLOCK_R: tl.constexpr, BT: tl.constexpr, NP: tl.constexpr):
    """Per row tile: ``dL/db`` ``[R, W]``, ``dL/dnum`` and ``dL/d|c|^2`` ``[R, BT]``, and
    ``dL/d|V_r|`` ``[R]``, given the upstream ``g`` ``[BT]`` (mean's 1/m included)."""
    c_norm = tl.sqrt(tl.maximum(c_sq, 0.0))
    prod = v_norm[:, None] * c_norm
    den = tl.maximum(prod, EPS)
    dq = tl.where(rvalid[:, None], g[None, :], 0.0)
    d_num = dq / den
    d_den = tl.where(prod > EPS, -dq * num / (den * den), 0.0)
    d_vnorm = tl.sum(d_den * c_norm, axis=1)
    safe = tl.where(c_norm > 0, c_norm, 1.0)  # no 0/0 even in the branch not taken
    d_csq = tl.where(c_norm > 0, d_den * v_norm[:, None] / (2.0 * safe), 0.0)
    d_alpha = expand_words(d_num, BLOCK_R, BT, NP) * s \
        + 2.0 * expand_words(d_csq, BLOCK_R, BT, NP) * alpha_g
    inner = tl.sum(tl.reshape(alpha * d_alpha, [BLOCK_R, BT, NP]), axis=2)
    d_b = lam * alpha * (d_alpha - expand_words(inner, BLOCK_R, BT, NP))
    return d_b, d_num, d_csq, d_vnorm


@triton.autotune(configs=SCAN_CONFIGS, key=["M", "N", "D"],
                 restore_value=["dvn_ptr", "dgram_ptr"])
@triton.heuristics(SCAN_HEURISTICS)
@triton.jit
def _scan_i2t_backward_kernel(
    v_ptr, v_len_ptr, v_norm_ptr, t_ptr, t_len_ptr, gram_ptr, grad_ptr,
    ds_ptr, dvn_ptr, dgram_ptr, image_base, n_images, images_per_group,
    Bt, M, N, D, lam,
    IS_MEAN: tl.constexpr, PRECISION: tl.constexpr, GRAM_PRECISION: tl.constexpr,
    NP: tl.constexpr, BT: tl.constexpr, SINGLE: tl.constexpr,
    BLOCK_R: tl.constexpr, BLOCK_W: tl.constexpr, BLOCK_D: tl.constexpr,
):
    W: tl.constexpr = BT * NP
    j0 = tl.program_id(0) * BT
    j, w, cvalid, t_rows = columns(t_len_ptr, j0, Bt, N, NP, BT)
    gram = caption_grams(gram_ptr, j, w, cvalid, N, NP, BT)
    jb = j0 + tl.arange(0, BT)
    ds_cols = j.to(tl.int64) * N + w
    d_gram = tl.zeros([W, W], dtype=tl.float32)
    first = image_base + tl.program_id(1) * images_per_group
    last = tl.minimum(first + images_per_group, image_base + n_images)
    for i in range(first, last):
        m_i = tl.load(v_len_ptr + i)
        v_row0 = i * M + tl.zeros([1], dtype=tl.int64)
        g = tl.load(grad_ptr + v_row0 // M * Bt + jb, mask=jb < Bt, other=0.0)
        if IS_MEAN:
            g = g / m_i.to(tl.float32)
        col_sq = tl.zeros([W], dtype=tl.float32)
        col_db_a = tl.zeros([W], dtype=tl.float32)  # sum_r dL/db[r, w] * a[r, w]
        if not SINGLE:
            col_sq = i2t_col_sq(v_ptr, v_row0, m_i, t_ptr, t_rows, cvalid, D,
                                 BLOCK_R, W, BLOCK_D, PRECISION)
            for r0 in range(0, m_i, BLOCK_R):
                _, rvalid, v_norm, s, a, col_sq, alpha, alpha_g, num, c_sq = i2t_tile(
                    v_ptr, v_norm_ptr, v_row0, r0, m_i, t_ptr, t_rows, cvalid, gram, col_sq,
                    D, lam, SINGLE, BLOCK_R, BT, NP, BLOCK_D, PRECISION, GRAM_PRECISION)
                d_b, _, _, _ = _i2t_tile_grads(s, a, alpha, alpha_g, num, c_sq, v_norm, g,
                                               rvalid, lam, BLOCK_R, BT, NP)
                col_db_a += tl.sum(d_b * a, axis=0)
        for r0 in range(0, m_i, BLOCK_R):
            rows, rvalid, v_norm, s, a, col_sq, alpha, alpha_g, num, c_sq = i2t_tile(
                v_ptr, v_norm_ptr, v_row0, r0, m_i, t_ptr, t_rows, cvalid, gram, col_sq, D,
                lam, SINGLE, BLOCK_R, BT, NP, BLOCK_D, PRECISION, GRAM_PRECISION)
            d_b, d_num, d_csq, d_vnorm = _i2t_tile_grads(s, a, alpha, alpha_g, num, c_sq,
                                                         v_norm, g, rvalid, lam, BLOCK_R, BT, NP)
            if SINGLE:
                col_db_a = tl.sum(d_b * a, axis=0)
            root = tl.sqrt(col_sq)
            norm = root + EPS
            # b = a / (sqrt(sum_r a^2) + eps): the direct term and the one through the norm.
            safe = tl.where(root > 0, root, 1.0)
            through_norm = tl.where(root > 0, -col_db_a / (norm * norm * safe), 0.0)
            # One image token: the two terms cancel to exactly d_b * eps / norm^2 (computed
            # as the difference, float32 would keep only its rounding error).
            d_a = tl.where(m_i == 1, d_b * EPS / (norm * norm)[None, :],
                           d_b / norm[None, :] + a * through_norm[None, :])
            d_s = d_a * tl.where(s > 0, 1.0, LEAKY_SLOPE) \
                + expand_words(d_num, BLOCK_R, BT, NP) * alpha
            both = rvalid[:, None] & cvalid[None, :]
            ds_rows = ((i - image_base) * M + rows).to(tl.int64) * (Bt * N)
            tl.store(ds_ptr + ds_rows[:, None] + ds_cols[None, :], d_s, mask=both)
            tl.atomic_add(dvn_ptr + v_row0 + rows, d_vnorm, mask=rvalid)
            weighted = alpha * expand_words(d_csq, BLOCK_R, BT, NP)
            d_gram += tl.dot(tl.trans(weighted), alpha, input_precision=GRAM_PRECISION)
    cols = tl.arange(0, W)
    same = (cols[:, None] // NP) == (cols[None, :] // NP)
    tl.atomic_add(dgram_ptr + (j.to(tl.int64) * N * N + w * N)[:, None] + w[None, :], d_gram,
                  mask=same & cvalid[:, None] & cvalid[None, :])


@triton.jit
def _t2i_tile(v_ptr, v_row0, rows, rvalid, t_ptr, t_rows, cvalid, gram, D, lam,
              R: tl.constexpr, BT: tl.constexpr, NP: tl.constexpr, BLOCK_D: tl.constexpr,
              PRECISION: tl.constexpr, GRAM_PRECISION: tl.constexpr):
    """A t2i pair block held in one row tile: ``s``, ``a``, attention ``alpha`` over image
    tokens ``[R, W]``, ``G_i alpha``, ``<T_w, c_w>`` and ``|c_w|^2`` ``[W]``."""
    s = similarities(v_ptr, v_row0 + rows, rvalid, t_ptr, t_rows, cvalid, D,
                      R, BT * NP, BLOCK_D, PRECISION)
    a = leaky(s)
    a3 = tl.reshape(a, [R, BT, NP])
    norm = tl.sqrt(tl.sum(a3 * a3, axis=2)) + EPS
    x = tl.where(rvalid[:, None], lam * a / expand_words(norm, R, BT, NP), float("-inf"))
    e = tl.exp(x - tl.max(x, axis=0)[None, :])
    alpha = e / tl.sum(e, axis=0)[None, :]
    num = tl.sum(alpha * s, axis=0)
    gram_alpha = tl.dot(gram, alpha, input_precision=GRAM_PRECISION)
    c_sq = tl.sum(alpha * gram_alpha, axis=0)
    return s, a, alpha, gram_alpha, num, c_sq


@triton.autotune(configs=_T2I_CONFIGS, key=["M", "N", "D"],
                 restore_value=["dtn_ptr", "dgram_ptr"])
@triton.heuristics({"BT": lambda a: max(1, a["BLOCK_W"] // a["NP"])})
@triton.jit
def _scan_t2i_backward_kernel(
    v_ptr, v_len_ptr, t_ptr, t_len_ptr, t_norm_ptr, grad_ptr,
    ds_ptr, dtn_ptr, dgram_ptr, image_base, blocks_per_group,
    Bt, M, N, D, lam,
    IS_MEAN: tl.constexpr, PRECISION: tl.constexpr, GRAM_PRECISION: tl.constexpr,
    NP: tl.constexpr, BT: tl.constexpr, R: tl.constexpr,
    BLOCK_W: tl.constexpr, BLOCK_D: tl.constexpr,
):
    """One image (all its tokens in one ``R``-row tile) x a group of caption blocks."""
    i = image_base + tl.program_id(1)
    m_i = tl.load(v_len_ptr + i)
    v_row0 = i.to(tl.int64) * M
    rows = tl.arange(0, R)
    rvalid = rows < m_i
    gram = similarities(v_ptr, v_row0 + rows, rvalid, v_ptr, v_row0 + rows, rvalid, D,
                         R, R, BLOCK_D, PRECISION)  # G_i = V_i V_i^T
    d_gram = tl.zeros([R, R], dtype=tl.float32)
    ds_rows = (tl.program_id(1) * M + rows).to(tl.int64) * (Bt * N)
    n_blocks = tl.cdiv(Bt, BT)
    first = tl.program_id(0) * blocks_per_group
    for block in range(first, tl.minimum(first + blocks_per_group, n_blocks)):
        j, w, cvalid, t_rows = columns(t_len_ptr, block * BT, Bt, N, NP, BT)
        s, a, alpha, gram_alpha, num, c_sq = _t2i_tile(
            v_ptr, v_row0, rows, rvalid, t_ptr, t_rows, cvalid, gram, D, lam,
            R, BT, NP, BLOCK_D, PRECISION, GRAM_PRECISION)
        g = tl.load(grad_ptr + i.to(tl.int64) * Bt + j, mask=cvalid, other=0.0)
        if IS_MEAN:
            g = g / tl.load(t_len_ptr + j, mask=cvalid, other=1).to(tl.float32)
        t_norm = tl.load(t_norm_ptr + t_rows, mask=cvalid, other=0.0)
        c_norm = tl.sqrt(tl.maximum(c_sq, 0.0))
        prod = t_norm * c_norm
        den = tl.maximum(prod, EPS)
        d_num = g / den
        d_den = tl.where(prod > EPS, -g * num / (den * den), 0.0)
        tl.atomic_add(dtn_ptr + t_rows, d_den * c_norm, mask=cvalid)
        safe = tl.where(c_norm > 0, c_norm, 1.0)
        d_csq = tl.where(c_norm > 0, d_den * t_norm / (2.0 * safe), 0.0)
        d_alpha = d_num[None, :] * s + 2.0 * d_csq[None, :] * gram_alpha
        d_b = lam * alpha * (d_alpha - tl.sum(alpha * d_alpha, axis=0)[None, :])
        # b = a / (sqrt(sum_w a^2) + eps) per image token and caption.
        a3 = tl.reshape(a, [R, BT, NP])
        root = tl.sqrt(tl.sum(a3 * a3, axis=2))
        norm = root + EPS
        inner = tl.sum(tl.reshape(d_b * a, [R, BT, NP]), axis=2)
        through = tl.where(root > 0, -inner / (norm * norm * tl.where(root > 0, root, 1.0)),
                           0.0)
        # A one-word caption: the two terms cancel to exactly d_b * eps / norm^2.
        jb = block * BT + tl.arange(0, BT)
        n_words = tl.load(t_len_ptr + jb, mask=jb < Bt, other=2)
        one_word = tl.where((n_words == 1)[None, :], 1.0 / (norm * norm) * EPS, 0.0)
        d_a = tl.where(expand_words(one_word, R, BT, NP) > 0,
                       d_b * expand_words(one_word, R, BT, NP),
                       d_b / expand_words(norm, R, BT, NP) + a * expand_words(through, R, BT, NP))
        d_s = d_a * tl.where(s > 0, 1.0, LEAKY_SLOPE) + d_num[None, :] * alpha
        both = rvalid[:, None] & cvalid[None, :]
        tl.store(ds_ptr + ds_rows[:, None] + (j.to(tl.int64) * N + w)[None, :], d_s, mask=both)
        d_gram += tl.dot(alpha * d_csq[None, :], tl.trans(alpha), input_precision=GRAM_PRECISION)
    tl.atomic_add(dgram_ptr + (i.to(tl.int64) * M + rows)[:, None] * M + rows[None, :], d_gram,
                  mask=rvalid[:, None] & rvalid[None, :])


def _zero_padded(x: Tensor, lengths: Tensor, dtype: torch.dtype) -> Tensor:
    valid = torch.arange(x.shape[1], device=x.device) < lengths[:, None]
    return torch.where(valid[..., None], x.to(dtype), torch.zeros((), dtype=dtype,
                                                                   device=x.device))


def _apply_ds(images: Tensor, texts: Tensor, image_lengths: Tensor, text_lengths: Tensor,
              launch: Callable[[Tensor, int, int], None]) -> tuple[Tensor, Tensor]:
    """``dV = dS T`` and ``dT = dS^T V`` (float32) with ``dS`` produced by ``launch(d_s, base,
    count)`` for chunks of images. The GEMMs run over zero-padded copies (padding gets exactly
    0) in the inputs' dtype: float32 stays exact unless TF32 was opted into; float16 inputs use
    bfloat16 instead, whose range holds small gradients and large sums alike."""
    (n_images, m, dim), (n_texts, n, _) = images.shape, texts.shape
    dtype = torch.bfloat16 if images.dtype == torch.float16 else images.dtype
    v0 = _zero_padded(images, image_lengths, dtype)
    t0 = _zero_padded(texts, text_lengths, dtype).reshape(n_texts * n, dim)
    d_images = torch.empty(n_images, m, dim, dtype=torch.float32, device=images.device)
    d_texts = torch.zeros(n_texts * n, dim, dtype=torch.float32, device=images.device)
    chunk = max(1, min(n_images, _DS_BYTES // (4 * m * n_texts * n)))
    d_s = torch.empty(chunk, m, n_texts * n, dtype=torch.float32, device=images.device)
    for base in range(0, n_images, chunk):
        count = min(chunk, n_images - base)
        d_s.zero_()
        launch(d_s, base, count)
        block = d_s[:count].to(dtype)
        d_images[base : base + count] = torch.matmul(block, t0).float()
        rows = v0[base : base + count].reshape(-1, dim)
        d_texts += (block.reshape(count * m, -1).T @ rows).float()
    return d_images, d_texts.view(n_texts, n, dim)


def _unit(x: Tensor, lengths: Tensor, norms: Tensor) -> Tensor:
    """``x / |x|`` per valid token, 0 on padding and for zero tokens."""
    return _zero_padded(x, lengths, torch.float32) / norms.clamp_min(1e-30)[..., None]


def _launch_args(images: Tensor, texts: Tensor, reduce: str, lambda_softmax: float) -> dict:
    precision, gram_precision = precisions(images.dtype)
    return dict(IS_MEAN=reduce == "mean", PRECISION=precision, GRAM_PRECISION=gram_precision,
                NP=next_pow2(texts.shape[1]))


def scan_i2t_backward(grad: Tensor, images: Tensor, texts: Tensor, image_lengths: Tensor,
                      text_lengths: Tensor, reduce: str, lambda_softmax: float
                      ) -> tuple[Tensor, Tensor]:
    """float32 gradients of ``sum(grad * scores_i2t)`` w.r.t. images and texts (0 on padding)."""
    (n_images, m, dim), (n_texts, n, _) = images.shape, texts.shape
    v_norm = norms(images, image_lengths)
    gram = grams(texts, text_lengths)
    d_vnorm = torch.zeros(n_images, m, dtype=torch.float32, device=images.device)
    d_gram = torch.zeros_like(gram)
    grad = grad.to(torch.float32).contiguous()
    v_len, t_len = image_lengths.to(torch.int32), text_lengths.to(torch.int32)
    meta = _launch_args(images, texts, reduce, lambda_softmax)

    def launch(d_s: Tensor, base: int, count: int) -> None:
        def grid(m):
            return (triton.cdiv(n_texts, max(1, m["BLOCK_W"] // m["NP"])),
                    triton.cdiv(count, _IMAGES_PER_GROUP))

        _scan_i2t_backward_kernel[grid](
            images, v_len, v_norm, texts, t_len, gram, grad,
            d_s, d_vnorm, d_gram, base, count, _IMAGES_PER_GROUP,
            n_texts, m, n, dim, float(lambda_softmax), **meta,
        )

    d_images, d_texts = _apply_ds(images, texts, image_lengths, text_lengths, launch)
    d_texts += 2.0 * torch.bmm(d_gram, _zero_padded(texts, text_lengths, torch.float32))
    d_images += d_vnorm[..., None] * _unit(images, image_lengths, v_norm)
    return d_images, d_texts


def scan_t2i_backward(grad: Tensor, images: Tensor, texts: Tensor, image_lengths: Tensor,
                      text_lengths: Tensor, reduce: str, lambda_softmax: float
                      ) -> tuple[Tensor, Tensor]:
    """float32 gradients of ``sum(grad * scores_t2i)``; images of at most ``MAX_T2I_TOKENS``
    tokens (one row tile per image)."""
    (n_images, m, dim), (n_texts, n, _) = images.shape, texts.shape
    t_norm = norms(texts, text_lengths)
    d_tnorm = torch.zeros(n_texts, n, dtype=torch.float32, device=images.device)
    d_gram = torch.zeros(n_images, m, m, dtype=torch.float32, device=images.device)
    grad = grad.to(torch.float32).contiguous()
    v_len, t_len = image_lengths.to(torch.int32), text_lengths.to(torch.int32)
    meta = _launch_args(images, texts, reduce, lambda_softmax)

    def launch(d_s: Tensor, base: int, count: int) -> None:
        def grid(m):
            blocks = triton.cdiv(n_texts, max(1, m["BLOCK_W"] // m["NP"]))
            return (triton.cdiv(blocks, _BLOCKS_PER_GROUP), count)

        _scan_t2i_backward_kernel[grid](
            images, v_len, texts, t_len, t_norm, grad,
            d_s, d_tnorm, d_gram, base, _BLOCKS_PER_GROUP,
            n_texts, m, n, dim, float(lambda_softmax), R=next_pow2(m), **meta,
        )

    d_images, d_texts = _apply_ds(images, texts, image_lengths, text_lengths, launch)
    d_images += 2.0 * torch.bmm(d_gram, _zero_padded(images, image_lengths, torch.float32))
    d_texts += d_tnorm[..., None] * _unit(texts, text_lengths, t_norm)
    return d_images, d_texts


def scan_align_backward(grad: Tensor, images: Tensor, texts: Tensor, image_lengths: Tensor,
                        text_lengths: Tensor, direction: str, reduce: str,
                        lambda_softmax: float) -> tuple[Tensor, Tensor]:
    """Gradients of ``sum(grad * scores)``, exactly 0 on padding, for captions of at most
    ``MAX_WORDS`` tokens and, with ``t2i``, images of at most ``MAX_T2I_TOKENS`` (the backend
    reports other shapes as unsupported, so dispatch picks another backend)."""
    d_images = torch.zeros(images.shape, dtype=torch.float32, device=images.device)
    d_texts = torch.zeros(texts.shape, dtype=torch.float32, device=texts.device)
    args = (grad, images, texts, image_lengths, text_lengths, reduce, lambda_softmax)
    for one, backward in (("i2t", scan_i2t_backward), ("t2i", scan_t2i_backward)):
        if direction in (one, "both"):
            gi, gt = backward(*args)
            d_images += gi
            d_texts += gt
    return d_images.to(images.dtype), d_texts.to(texts.dtype)
