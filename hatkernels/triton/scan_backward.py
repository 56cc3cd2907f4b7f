"""Backward of HAT's scan pooling, ``i2t`` direction (HAT's), as a Triton kernel + two GEMMs.

For one pair block the kernel recomputes the forward (``scan_align._i2t_tile``) and forms
``dS = dL/dS`` ``[m, n]`` through the cosine, the Gram identity, the softmax over words, the
norm across image tokens and the LeakyReLU. That norm couples every image token of the pair,
so with several row tiles a first pass accumulates ``sum_r a^2``, a second
``sum_r (dL/db) a`` per word, and a third forms ``dS``; with one row tile (``SINGLE``) all
of it happens once, in registers. Besides ``dS`` a pair feeds two small terms: ``|V_r|``
(its gradient summed over captions, atomically, per image token) and the caption Gram
``G_j`` (``sum_r dc2_r alpha_r alpha_r^T``, summed over a group of images in registers, then
atomically per caption).

A program owns a block of ``BT`` captions and a group of images; ``dS`` of a chunk of images
goes to a float32 buffer ``[chunk, M, Bt * N]`` (sized to ``_DS_BYTES``), and then
``dV = dS T`` and ``dT += dS^T V`` are cuBLAS GEMMs over the zero-padded inputs (16-bit inputs:
in their dtype on tensor cores). Last, ``dT += 2 dG T`` and ``dV += d|V| V / |V|``.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch import Tensor

from .scan_align import (
    _CONFIGS,
    _HEURISTICS,
    EPS,
    _caption_grams,
    _columns,
    _grams,
    _i2t_col_sq,
    _i2t_tile,
    _norms,
    _precisions,
)
from .utils import next_pow2

_DS_BYTES = 256 << 20
_IMAGES_PER_GROUP = 8


@triton.jit
def _broadcast(x, R: tl.constexpr, BT: tl.constexpr, NP: tl.constexpr):
    """``[R, BT] -> [R, BT * NP]``: a per-(token, caption) value on each of the caption's words."""
    return tl.reshape(tl.broadcast_to(x[:, :, None], [R, BT, NP]), [R, BT * NP])


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
    d_alpha = _broadcast(d_num, BLOCK_R, BT, NP) * s \
        + 2.0 * _broadcast(d_csq, BLOCK_R, BT, NP) * alpha_g
    inner = tl.sum(tl.reshape(alpha * d_alpha, [BLOCK_R, BT, NP]), axis=2)
    d_b = lam * alpha * (d_alpha - _broadcast(inner, BLOCK_R, BT, NP))
    return d_b, d_num, d_csq, d_vnorm


@triton.autotune(configs=_CONFIGS, key=["M", "N", "D"],
                 restore_value=["dvn_ptr", "dgram_ptr"])
@triton.heuristics(_HEURISTICS)
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
    j, w, cvalid, t_rows = _columns(t_len_ptr, j0, Bt, N, NP, BT)
    gram = _caption_grams(gram_ptr, j, w, cvalid, N, NP, BT)
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
            col_sq = _i2t_col_sq(v_ptr, v_row0, m_i, t_ptr, t_rows, cvalid, D,
                                 BLOCK_R, W, BLOCK_D, PRECISION)
            for r0 in range(0, m_i, BLOCK_R):
                rows = r0 + tl.arange(0, BLOCK_R)
                rvalid = rows < m_i
                s, a, col_sq, alpha, alpha_g, num, c_sq = _i2t_tile(
                    v_ptr, v_row0, rows, rvalid, t_ptr, t_rows, cvalid, gram, col_sq, D, lam,
                    SINGLE, BLOCK_R, BT, NP, BLOCK_D, PRECISION, GRAM_PRECISION)
                v_norm = tl.load(v_norm_ptr + v_row0 + rows, mask=rvalid, other=0.0)
                d_b, _, _, _ = _i2t_tile_grads(s, a, alpha, alpha_g, num, c_sq, v_norm, g,
                                               rvalid, lam, BLOCK_R, BT, NP)
                col_db_a += tl.sum(d_b * a, axis=0)
        for r0 in range(0, m_i, BLOCK_R):
            rows = r0 + tl.arange(0, BLOCK_R)
            rvalid = rows < m_i
            s, a, col_sq, alpha, alpha_g, num, c_sq = _i2t_tile(
                v_ptr, v_row0, rows, rvalid, t_ptr, t_rows, cvalid, gram, col_sq, D, lam,
                SINGLE, BLOCK_R, BT, NP, BLOCK_D, PRECISION, GRAM_PRECISION)
            v_norm = tl.load(v_norm_ptr + v_row0 + rows, mask=rvalid, other=0.0)
            d_b, d_num, d_csq, d_vnorm = _i2t_tile_grads(s, a, alpha, alpha_g, num, c_sq,
                                                         v_norm, g, rvalid, lam, BLOCK_R, BT, NP)
            if SINGLE:
                col_db_a = tl.sum(d_b * a, axis=0)
            root = tl.sqrt(col_sq)
            norm = root + EPS
            # b = a / (sqrt(sum_r a^2) + eps): the direct term and the one through the norm.
            safe = tl.where(root > 0, root, 1.0)
            through_norm = tl.where(root > 0, -col_db_a / (norm * norm * safe), 0.0)
            d_a = d_b / norm[None, :] + a * through_norm[None, :]
            d_s = d_a * tl.where(s > 0, 1.0, 0.1) + _broadcast(d_num, BLOCK_R, BT, NP) * alpha
            both = rvalid[:, None] & cvalid[None, :]
            ds_rows = ((i - image_base) * M + rows).to(tl.int64) * (Bt * N)
            tl.store(ds_ptr + ds_rows[:, None] + ds_cols[None, :], d_s, mask=both)
            tl.atomic_add(dvn_ptr + v_row0 + rows, d_vnorm, mask=rvalid)
            weighted = alpha * _broadcast(d_csq, BLOCK_R, BT, NP)
            d_gram += tl.dot(tl.trans(weighted), alpha, input_precision=GRAM_PRECISION)
    cols = tl.arange(0, W)
    same = (cols[:, None] // NP) == (cols[None, :] // NP)
    tl.atomic_add(dgram_ptr + (j.to(tl.int64) * N * N + w * N)[:, None] + w[None, :], d_gram,
                  mask=same & cvalid[:, None] & cvalid[None, :])


def _zero_padded(x: Tensor, lengths: Tensor, dtype: torch.dtype) -> Tensor:
    valid = torch.arange(x.shape[1], device=x.device) < lengths[:, None]
    return torch.where(valid[..., None], x.to(dtype), torch.zeros((), dtype=dtype,
                                                                   device=x.device))


def scan_i2t_backward(grad: Tensor, images: Tensor, texts: Tensor, image_lengths: Tensor,
                      text_lengths: Tensor, reduce: str, lambda_softmax: float
                      ) -> tuple[Tensor, Tensor]:
    """float32 gradients of ``sum(grad * scores_i2t)`` w.r.t. images and texts (0 on padding)."""
    (n_images, m, dim), (n_texts, n, _) = images.shape, texts.shape
    device = images.device
    gemm_dtype = images.dtype  # float32 stays exact (unless TF32 was opted into)
    v0 = _zero_padded(images, image_lengths, gemm_dtype)
    t0 = _zero_padded(texts, text_lengths, gemm_dtype).reshape(n_texts * n, dim)
    v_norm = _norms(images, image_lengths)
    gram = _grams(texts, text_lengths)
    d_vnorm = torch.zeros(n_images, m, dtype=torch.float32, device=device)
    d_gram = torch.zeros_like(gram)
    d_images = torch.empty(n_images, m, dim, dtype=torch.float32, device=device)
    d_texts = torch.zeros(n_texts * n, dim, dtype=torch.float32, device=device)
    chunk = max(1, min(n_images, _DS_BYTES // (4 * m * n_texts * n)))
    d_s = torch.empty(chunk, m, n_texts * n, dtype=torch.float32, device=device)
    precision, gram_precision = _precisions(images.dtype)
    grad = grad.to(torch.float32).contiguous()
    v_len, t_len = image_lengths.to(torch.int32), text_lengths.to(torch.int32)
    for base in range(0, n_images, chunk):
        count = min(chunk, n_images - base)
        d_s.zero_()

        def grid(meta, count=count):
            return (triton.cdiv(n_texts, max(1, meta["BLOCK_W"] // meta["NP"])),
                    triton.cdiv(count, _IMAGES_PER_GROUP))

        _scan_i2t_backward_kernel[grid](
            images, v_len, v_norm, texts, t_len, gram, grad,
            d_s, d_vnorm, d_gram, base, count, _IMAGES_PER_GROUP,
            n_texts, m, n, dim, float(lambda_softmax),
            IS_MEAN=reduce == "mean", PRECISION=precision, GRAM_PRECISION=gram_precision,
            NP=next_pow2(n),
        )
        block = d_s[:count].to(gemm_dtype)
        d_images[base : base + count] = torch.matmul(block, t0).float()
        rows = v0[base : base + count].reshape(-1, dim)
        d_texts += (block.reshape(count * m, -1).T @ rows).float()
    d_texts = d_texts.view(n_texts, n, dim)
    d_texts += 2.0 * torch.bmm(d_gram, _zero_padded(texts, text_lengths, torch.float32))
    unit = _zero_padded(images, image_lengths, torch.float32) / v_norm.clamp_min(1e-30)[..., None]
    d_images += d_vnorm[..., None] * unit
    return d_images, d_texts
