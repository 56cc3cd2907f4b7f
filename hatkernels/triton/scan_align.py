"""HAT's scan pooling (SPEC 1.2) as fused Triton kernels.

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
the output between its trial runs). The backward is in ``scan_backward``.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch import Tensor

from hatkernels.backends.torch import TorchBackend

from .max_align import _similarities, _tile_of
from .utils import dot_precision, next_pow2, pick_configs, tune_on_slice, zero_padded_float

# SPEC 1.2's constants (kernels read globals only as constexpr).
EPS = tl.constexpr(1e-8)
LEAKY_SLOPE = tl.constexpr(0.1)
# Largest caption size (rounded up to a power of two) whose block-diagonal Gram fits a program.
MAX_WORDS = 128
# Bytes of the float32 copies that the host-side norms and Gram matrices work on at a time.
_HOST_BYTES = 128 << 20
_MAX_IMAGES = 65535

_CONFIGS = pick_configs(
    [
        triton.Config({"BLOCK_R": 64, "BLOCK_W": 64, "BLOCK_D": 64}, num_warps=4, num_stages=3),
        triton.Config({"BLOCK_R": 64, "BLOCK_W": 128, "BLOCK_D": 64}, num_warps=8, num_stages=3),
        triton.Config({"BLOCK_R": 128, "BLOCK_W": 64, "BLOCK_D": 64}, num_warps=8, num_stages=3),
        triton.Config({"BLOCK_R": 32, "BLOCK_W": 128, "BLOCK_D": 64}, num_warps=4, num_stages=4),
    ],
    triton.Config({"BLOCK_R": 16, "BLOCK_W": 32, "BLOCK_D": 16}),
)
_HEURISTICS = {
    "BT": lambda a: max(1, a["BLOCK_W"] // a["NP"]),
    "SINGLE": lambda a: a["M"] <= a["BLOCK_R"],
}


@triton.jit
def _columns(t_len_ptr, j0, Bt, N, NP: tl.constexpr, BT: tl.constexpr):
    """Column layout of a caption block: caption id, word, validity, flat text row."""
    cols = tl.arange(0, BT * NP)
    j = j0 + cols // NP
    w = cols % NP
    jv = j < Bt
    t_len = tl.load(t_len_ptr + j, mask=jv, other=0)
    valid = jv & (w < t_len)
    return j, w, valid, j.to(tl.int64) * N + w


@triton.jit
def _write(where, value, mask, ACCUMULATE: tl.constexpr):
    """Store a program's output block, or add it to what is there (the second direction)."""
    if ACCUMULATE:
        value += tl.load(where, mask=mask, other=0.0)
    tl.store(where, value, mask=mask)


@triton.jit
def _leaky(s):
    return tl.where(s > 0, s, s * LEAKY_SLOPE)


@triton.jit
def _segment_sum(x, R: tl.constexpr, BT: tl.constexpr, NP: tl.constexpr):
    """``[R, BT * NP] -> [R, BT]``: sums over each caption's words."""
    return tl.sum(tl.reshape(x, [R, BT, NP]), axis=2)


@triton.jit
def _caption_grams(gram_ptr, j, w, cvalid, N, NP: tl.constexpr, BT: tl.constexpr):
    """Block-diagonal caption Gram matrices: ``G[c, c'] = <T_j[w], T_j[w']>`` within a caption."""
    cols = tl.arange(0, BT * NP)
    same = (cols[:, None] // NP) == (cols[None, :] // NP)
    g_mask = same & cvalid[:, None] & cvalid[None, :]
    return tl.load(gram_ptr + (j.to(tl.int64) * N * N + w * N)[:, None] + w[None, :],
                   mask=g_mask, other=0.0)


@triton.jit
def _i2t_col_sq(v_ptr, v_row0, m_i, t_ptr, t_rows, cvalid, D,
                BLOCK_R: tl.constexpr, W: tl.constexpr, BLOCK_D: tl.constexpr,
                PRECISION: tl.constexpr):
    """Pass 1 over the row tiles: ``sum_r a[r, w]^2`` per word."""
    col_sq = tl.zeros([W], dtype=tl.float32)
    for r0 in range(0, m_i, BLOCK_R):
        rows = r0 + tl.arange(0, BLOCK_R)
        s = _similarities(v_ptr, v_row0 + rows, rows < m_i, t_ptr, t_rows, cvalid, D,
                          BLOCK_R, W, BLOCK_D, PRECISION)
        a = _leaky(s)
        col_sq += tl.sum(a * a, axis=0)
    return col_sq


@triton.jit
def _i2t_tile(v_ptr, v_row0, rows, rvalid, t_ptr, t_rows, cvalid, gram, col_sq, D, lam,
              SINGLE: tl.constexpr, BLOCK_R: tl.constexpr, BT: tl.constexpr,
              NP: tl.constexpr, BLOCK_D: tl.constexpr, PRECISION: tl.constexpr,
              GRAM_PRECISION: tl.constexpr):
    """One row tile of an i2t pair block: similarities ``s``, ``a``, the norms' sums of
    squares (computed here when ``SINGLE``), attention ``alpha`` ``[R, W]``, ``alpha G``,
    ``<V_r, c_r>`` and ``|c_r|^2`` ``[R, BT]``."""
    W: tl.constexpr = BT * NP
    s = _similarities(v_ptr, v_row0 + rows, rvalid, t_ptr, t_rows, cvalid, D,
                      BLOCK_R, W, BLOCK_D, PRECISION)
    a = _leaky(s)  # padding was loaded as 0, so a (and s) are 0 there
    if SINGLE:
        col_sq = tl.sum(a * a, axis=0)
    x = tl.where(cvalid[None, :], lam * a / (tl.sqrt(col_sq) + EPS)[None, :], float("-inf"))
    x3 = tl.reshape(x, [BLOCK_R, BT, NP])
    top = tl.max(x3, axis=2)
    top = tl.where(top == float("-inf"), 0.0, top)  # captions past the end
    e = tl.exp(x3 - top[:, :, None])
    den = tl.sum(e, axis=2)
    alpha = tl.reshape(e / tl.where(den == 0, 1.0, den)[:, :, None], [BLOCK_R, W])
    num = _segment_sum(alpha * s, BLOCK_R, BT, NP)  # <V_r, c_r>
    alpha_g = tl.dot(alpha, gram, input_precision=GRAM_PRECISION)
    c_sq = _segment_sum(alpha_g * alpha, BLOCK_R, BT, NP)  # |c_r|^2
    return s, a, col_sq, alpha, alpha_g, num, c_sq


@triton.autotune(configs=_CONFIGS, key=["M", "N", "D"])
@triton.heuristics(_HEURISTICS)
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
    i, block = _tile_of(tl.program_id(0), Bi, tl.cdiv(Bt, BT), GROUP)
    j0 = block * BT
    j, w, cvalid, t_rows = _columns(t_len_ptr, j0, Bt, N, NP, BT)
    m_i = tl.load(v_len_ptr + i)
    v_row0 = i.to(tl.int64) * M
    gram = _caption_grams(gram_ptr, j, w, cvalid, N, NP, BT)
    col_sq = tl.zeros([W], dtype=tl.float32)
    if not SINGLE:
        col_sq = _i2t_col_sq(v_ptr, v_row0, m_i, t_ptr, t_rows, cvalid, D,
                             BLOCK_R, W, BLOCK_D, PRECISION)
    total = tl.zeros([BT], dtype=tl.float32)
    for r0 in range(0, m_i, BLOCK_R):
        rows = r0 + tl.arange(0, BLOCK_R)
        rvalid = rows < m_i
        _, _, _, _, _, num, c_sq = _i2t_tile(
            v_ptr, v_row0, rows, rvalid, t_ptr, t_rows, cvalid, gram, col_sq, D, lam,
            SINGLE, BLOCK_R, BT, NP, BLOCK_D, PRECISION, GRAM_PRECISION)
        v_norm = tl.load(v_norm_ptr + v_row0 + rows, mask=rvalid, other=0.0)
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
    s = _similarities(v_ptr, rows, rvalid, t_ptr, t_rows, cvalid, D,
                      BLOCK_R, BT * NP, BLOCK_D, PRECISION)
    a3 = tl.reshape(_leaky(s), [BLOCK_R, BT, NP])
    b3 = a3 / (tl.sqrt(tl.sum(a3 * a3, axis=2)) + EPS)[:, :, None]
    x = tl.where(rvalid[:, None], lam * tl.reshape(b3, [BLOCK_R, BT * NP]), float("-inf"))
    return s, x


@triton.autotune(configs=_CONFIGS, key=["M", "N", "D"], restore_value=["out_ptr"])
@triton.heuristics(_HEURISTICS)
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
    i, block = _tile_of(tl.program_id(0), Bi, tl.cdiv(Bt, BT), GROUP)
    j0 = block * BT
    j, w, cvalid, t_rows = _columns(t_len_ptr, j0, Bt, N, NP, BT)
    m_i = tl.load(v_len_ptr + i)
    v_row0 = i.to(tl.int64) * M

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
        gram = _similarities(v_ptr, v_row0 + rows, rvalid, v_ptr, v_row0 + rows, rvalid, D,
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
                gram = _similarities(v_ptr, v_row0 + rows1, rows1 < m_i, v_ptr, v_row0 + rows2,
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


def _chunks(x: Tensor, lengths: Tensor):
    """Float32 zero-padded copies of ``x`` by chunks of items, ``_HOST_BYTES`` at most each."""
    step = max(1, _HOST_BYTES // (4 * x.shape[1] * x.shape[2]))
    for b0 in range(0, x.shape[0], step):
        yield b0, b0 + step, zero_padded_float(x[b0 : b0 + step], lengths[b0 : b0 + step])


def _norms(x: Tensor, lengths: Tensor) -> Tensor:
    """``[B, L]`` float32 token norms (0 on padding)."""
    out = torch.empty(x.shape[:2], dtype=torch.float32, device=x.device)
    for b0, b1, part in _chunks(x, lengths):
        out[b0:b1] = torch.linalg.vector_norm(part, dim=-1)
    return out


def _grams(x: Tensor, lengths: Tensor) -> Tensor:
    """``[B, L, L]`` float32 Gram matrices ``x_b x_b^T`` of the valid tokens."""
    out = torch.empty(x.shape[0], x.shape[1], x.shape[1], dtype=torch.float32, device=x.device)
    for b0, b1, part in _chunks(x, lengths):
        torch.bmm(part, part.transpose(1, 2), out=out[b0:b1])
    return out


def _precisions(dtype: torch.dtype) -> tuple[str, str]:
    """Similarities: exact for float32 unless TF32 was opted into. Attention x Gram products
    (float32 operands): exact for float32 inputs, TF32 for 16-bit inputs (far below their
    rounding)."""
    sims = dot_precision(dtype)
    return sims, (sims if dtype == torch.float32 else dot_precision(torch.float16))


def supports(texts: Tensor) -> bool:
    """Whether the kernels take this caption size (the block-diagonal Gram fits a program)."""
    return next_pow2(texts.shape[1]) <= MAX_WORDS


def scan_align_forward(images: Tensor, texts: Tensor, image_lengths: Tensor,
                       text_lengths: Tensor, direction: str, reduce: str,
                       lambda_softmax: float) -> Tensor:
    """``[Bi, Bt]`` float32 scan-pooled scores (the backend contract of ``backends/base.py``).

    Captions longer than ``MAX_WORDS`` tokens go to the torch backend's exact blocked path.
    """
    if not supports(texts):
        return TorchBackend().scan_align(images, texts, image_lengths, text_lengths, direction,
                                         reduce, lambda_softmax, 1 << 30)
    tune_on_slice(scan_align_forward, images, texts, image_lengths, text_lengths, direction,
                  reduce, lambda_softmax)
    (n_images, m, dim), (n_texts, n, _) = images.shape, texts.shape
    v_len, t_len = image_lengths.to(torch.int32), text_lengths.to(torch.int32)
    total = torch.empty(n_images, n_texts, dtype=torch.float32, device=images.device)
    precision, gram_precision = _precisions(images.dtype)
    common = dict(IS_MEAN=reduce == "mean", PRECISION=precision,
                  GRAM_PRECISION=gram_precision, NP=next_pow2(n))

    v_norm = _norms(images, image_lengths) if direction in ("i2t", "both") else None
    gram = _grams(texts, text_lengths) if direction in ("i2t", "both") else None
    t_norm = _norms(texts, text_lengths) if direction in ("t2i", "both") else None
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


def scan_align_backward(grad: Tensor, images: Tensor, texts: Tensor, image_lengths: Tensor,
                        text_lengths: Tensor, direction: str, reduce: str,
                        lambda_softmax: float) -> tuple[Tensor, Tensor]:
    """Gradients of ``sum(grad * scores)``, exactly 0 on padding, from ``scan_backward``'s
    kernels. Not yet Triton kernels (they recompute blocks under autograd with the torch
    backend: exact, memory bounded, on the inputs' device): ``t2i`` for images of more than
    ``MAX_T2I_TOKENS`` tokens, and captions of more than ``MAX_WORDS``."""
    from .scan_backward import MAX_T2I_TOKENS, scan_i2t_backward, scan_t2i_backward

    def fallback(one: str) -> tuple[Tensor, Tensor]:
        return TorchBackend().scan_align_backward(grad, images, texts, image_lengths,
                                                  text_lengths, one, reduce, lambda_softmax,
                                                  1 << 30)

    if not supports(texts):
        return fallback(direction)
    d_images = torch.zeros(images.shape, dtype=torch.float32, device=images.device)
    d_texts = torch.zeros(texts.shape, dtype=torch.float32, device=texts.device)
    args = (grad, images, texts, image_lengths, text_lengths, reduce, lambda_softmax)
    if direction in ("i2t", "both"):
        gi, gt = scan_i2t_backward(*args)
        d_images += gi
        d_texts += gt
    if direction in ("t2i", "both"):
        if images.shape[1] <= MAX_T2I_TOKENS:
            gi, gt = scan_t2i_backward(*args)
        else:
            gi, gt = fallback("t2i")
        d_images += gi
        d_texts += gt
    return d_images.to(images.dtype), d_texts.to(texts.dtype)
