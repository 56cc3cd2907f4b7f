"""What the Triton kernels share: constants and shape limits, jit helpers (gathered
similarities, program order, scan pooling's tile of attention), packing valid tokens, dot
precision and autotune configs. Kernel modules import from here, never from each other.

Packing: the valid tokens of a ``[B, L, D]`` side are addressed through an int32 list of their
row indices in the flat ``[B * L, D]`` tensor (item by item, in order), with each token's item
id and each item's start offset. Kernels gather rows through it, so padding is never loaded
(it may hold NaN) and never multiplied.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass

import torch
import triton
import triton.language as tl
from torch import Tensor

from .. import constants

# The operators' constants (jit functions read globals only as constexpr).
EPS = tl.constexpr(constants.EPS)
LEAKY_SLOPE = tl.constexpr(constants.LEAKY_SLOPE)
# Scan pooling keeps the Gram matrices of a block of captions in one program: captions of at
# most this many tokens (rounded up to a power of two).
MAX_WORDS = 128
# The scan t2i backward keeps all of an image's tokens in one tile: at most this many.
MAX_T2I_TOKENS = 128
# Bytes of the float32 copies that the host-side norms and Gram matrices work on at a time.
_HOST_BYTES = 128 << 20


def interpreting() -> bool:
    """True under ``TRITON_INTERPRET=1`` (kernels run on CPU tensors through numpy)."""
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


# Whether the kernels run in Triton's interpreter: fixed at import, as ``triton.jit`` does. The
# interpreter multiplies 16-bit floats through numpy, which has no bfloat16, so operands are
# widened to float32 there (exact: the GPU's tensor cores form the same products in float32).
_WIDEN = tl.constexpr(os.environ.get("TRITON_INTERPRET", "0") == "1")


@triton.jit
def mma(a, b, acc, PRECISION: tl.constexpr):
    """``acc + a @ b`` with ``tl.dot`` (float32 accumulation)."""
    if _WIDEN:
        out = tl.dot(a.to(tl.float32), b.to(tl.float32), acc, input_precision=PRECISION)
    else:
        out = tl.dot(a, b, acc, input_precision=PRECISION)
    return out


def dot_precision(dtype: torch.dtype) -> str:
    """``tl.dot`` precision for float32 operands: exact ("ieee") unless the caller opted into
    TF32 with ``torch.backends.cuda.matmul.allow_tf32``; 16-bit inputs ignore it."""
    if dtype == torch.float32 and tf32_allowed() and not interpreting():
        return "tf32"
    return "ieee"


def tf32_allowed() -> bool:
    """Whether float32 matmuls may use TF32: ``allow_tf32 = True`` sets the newer
    ``fp32_precision`` to "tf32", so that is read when it exists (mixing reads of the two
    APIs raises in recent torch)."""
    matmul = torch.backends.cuda.matmul
    precision = getattr(matmul, "fp32_precision", None)
    return precision == "tf32" if precision is not None else bool(matmul.allow_tf32)


def pick_configs(gpu: list[triton.Config], interpreter: triton.Config) -> list[triton.Config]:
    """The autotune list: every GPU config, or the single small one under the interpreter
    (autotuning there would time numpy, and small tiles exercise the multi-tile paths)."""
    return [interpreter] if interpreting() else gpu


def next_pow2(n: int, low: int = 16) -> int:
    return max(low, triton.next_power_of_2(max(1, int(n))))


@dataclass
class Packed:
    """One side's valid tokens: ``rows`` (int32 row ids into ``x.view(-1, D)``), ``seg`` (int32
    item id per token), ``offsets`` (int32 ``[B + 1]`` item starts), ``lengths`` (int32 ``[B]``)."""

    x: Tensor
    rows: Tensor
    seg: Tensor
    offsets: Tensor
    lengths: Tensor
    total: int
    min_len: int

    @property
    def items(self) -> int:
        return self.x.shape[0]

    @property
    def size(self) -> int:
        return self.x.shape[1]


def pack(x: Tensor, lengths: Tensor) -> Packed:
    """Index the valid tokens of ``x`` ``[B, L, D]`` whose item ``b`` has ``lengths[b]`` tokens."""
    n_items, size = x.shape[0], x.shape[1]
    valid = torch.arange(size, device=x.device) < lengths[:, None]
    rows = valid.reshape(-1).nonzero().squeeze(1)
    offsets = torch.zeros(n_items + 1, dtype=torch.int32, device=x.device)
    offsets[1:] = torch.cumsum(lengths, 0).to(torch.int32)
    return Packed(
        x=x,
        rows=rows.to(torch.int32),
        seg=(rows // size).to(torch.int32),
        offsets=offsets,
        lengths=lengths.to(torch.int32),
        total=rows.numel(),
        min_len=int(lengths.min()),
    )


def items_per_tile(block: int, min_len: int) -> int:
    """A bound on the items that a run of ``block`` consecutive packed tokens can touch: a
    partial item at each end, whole items of at least ``min_len`` tokens between."""
    if block <= 2:
        return block
    return next_pow2(min(block, (block - 2) // max(1, min_len) + 2), low=1)


def zero_padded_float(x: Tensor, lengths: Tensor) -> Tensor:
    """A float32 copy of ``x`` with padding zeroed (``where``: NaN there never leaks)."""
    valid = torch.arange(x.shape[1], device=x.device) < lengths[:, None]
    return torch.where(valid[..., None], x.float(), torch.zeros((), device=x.device))


_TUNED: set[tuple] = set()
TUNE_IMAGES, TUNE_TEXTS = 64, 2048


def tune_on_slice(op: Callable[..., object], images: Tensor, texts: Tensor,
                  image_lengths: Tensor, text_lengths: Tensor, *rest: object) -> None:
    """Let autotuning see a slice of a large call first.

    The autotuner times every config several times on the first call with a new key (M, N, D,
    dtype: not the batch sizes); on a COCO-5K-sized call that takes minutes and clones the
    output. So the first large call of each shape runs ``op`` once on at most ``TUNE_IMAGES``
    images x ``TUNE_TEXTS`` captions, which picks and caches the configs.
    """
    if interpreting():
        return
    key = (op.__name__, images.device, images.dtype, *images.shape[1:], texts.shape[1], *rest)
    if key in _TUNED:
        return
    _TUNED.add(key)
    if images.shape[0] > TUNE_IMAGES or texts.shape[0] > TUNE_TEXTS:
        op(images[:TUNE_IMAGES], texts[:TUNE_TEXTS], image_lengths[:TUNE_IMAGES],
           text_lengths[:TUNE_TEXTS], *rest)


@triton.jit
def similarities(a_ptr, a_rows, a_mask, b_ptr, b_rows, b_mask, D,
                  BLOCK_A: tl.constexpr, BLOCK_B: tl.constexpr, BLOCK_D: tl.constexpr,
                  PRECISION: tl.constexpr):
    """``[BLOCK_A, BLOCK_B]`` float32 dot products of gathered rows (masked rows are 0)."""
    acc = tl.zeros([BLOCK_A, BLOCK_B], dtype=tl.float32)
    for d0 in range(0, D, BLOCK_D):
        dd = d0 + tl.arange(0, BLOCK_D)
        dmask = dd < D
        a = tl.load(a_ptr + a_rows[:, None] * D + dd[None, :],
                    mask=a_mask[:, None] & dmask[None, :], other=0.0)
        b = tl.load(b_ptr + b_rows[None, :] * D + dd[:, None],
                    mask=b_mask[None, :] & dmask[:, None], other=0.0)
        acc = mma(a, b, acc, PRECISION)
    return acc


@triton.jit
def tile_of(pid, n_first, n_second, GROUP: tl.constexpr):
    """Grouped program order (as in tiled GEMMs) so that a wave's tiles share the L2 cache."""
    per_group = GROUP * n_second
    group = pid // per_group
    first0 = group * GROUP
    size = tl.minimum(n_first - first0, GROUP)
    return first0 + (pid % per_group) % size, (pid % per_group) // size


SCAN_CONFIGS = pick_configs(
    [
        triton.Config({"BLOCK_R": 64, "BLOCK_W": 64, "BLOCK_D": 64}, num_warps=4, num_stages=3),
        triton.Config({"BLOCK_R": 64, "BLOCK_W": 128, "BLOCK_D": 64}, num_warps=8, num_stages=3),
        triton.Config({"BLOCK_R": 128, "BLOCK_W": 64, "BLOCK_D": 64}, num_warps=8, num_stages=3),
        triton.Config({"BLOCK_R": 32, "BLOCK_W": 128, "BLOCK_D": 64}, num_warps=4, num_stages=4),
    ],
    triton.Config({"BLOCK_R": 16, "BLOCK_W": 32, "BLOCK_D": 16}),
)


SCAN_HEURISTICS = {
    "BT": lambda a: max(1, a["BLOCK_W"] // a["NP"]),
    "SINGLE": lambda a: a["M"] <= a["BLOCK_R"],
}


@triton.jit
def columns(t_len_ptr, j0, Bt, N, NP: tl.constexpr, BT: tl.constexpr):
    """Column layout of a caption block: caption id, word, validity, flat text row."""
    cols = tl.arange(0, BT * NP)
    j = j0 + cols // NP
    w = cols % NP
    jv = j < Bt
    t_len = tl.load(t_len_ptr + j, mask=jv, other=0)
    valid = jv & (w < t_len)
    return j, w, valid, j.to(tl.int64) * N + w


@triton.jit
def leaky(s):
    return tl.where(s > 0, s, s * LEAKY_SLOPE)


@triton.jit
def segment_sum(x, R: tl.constexpr, BT: tl.constexpr, NP: tl.constexpr):
    """``[R, BT * NP] -> [R, BT]``: sums over each caption's words."""
    return tl.sum(tl.reshape(x, [R, BT, NP]), axis=2)


@triton.jit
def caption_grams(gram_ptr, j, w, cvalid, N, NP: tl.constexpr, BT: tl.constexpr):
    """Block-diagonal caption Gram matrices: ``G[c, c'] = <T_j[w], T_j[w']>`` within a caption."""
    cols = tl.arange(0, BT * NP)
    same = (cols[:, None] // NP) == (cols[None, :] // NP)
    g_mask = same & cvalid[:, None] & cvalid[None, :]
    return tl.load(gram_ptr + (j.to(tl.int64) * N * N + w * N)[:, None] + w[None, :],
                   mask=g_mask, other=0.0)


@triton.jit
def i2t_col_sq(v_ptr, v_row0, m_i, t_ptr, t_rows, cvalid, D,
                BLOCK_R: tl.constexpr, W: tl.constexpr, BLOCK_D: tl.constexpr,
                PRECISION: tl.constexpr):
    """Pass 1 over the row tiles: ``sum_r a[r, w]^2`` per word."""
    col_sq = tl.zeros([W], dtype=tl.float32)
    for r0 in range(0, m_i, BLOCK_R):
        rows = r0 + tl.arange(0, BLOCK_R)
        s = similarities(v_ptr, v_row0 + rows, rows < m_i, t_ptr, t_rows, cvalid, D,
                          BLOCK_R, W, BLOCK_D, PRECISION)
        a = leaky(s)
        col_sq += tl.sum(a * a, axis=0)
    return col_sq


@triton.jit
def i2t_tile(v_ptr, v_norm_ptr, v_row0, r0, m_i, t_ptr, t_rows, cvalid, gram, col_sq, D, lam,
             SINGLE: tl.constexpr, BLOCK_R: tl.constexpr, BT: tl.constexpr,
             NP: tl.constexpr, BLOCK_D: tl.constexpr, PRECISION: tl.constexpr,
             GRAM_PRECISION: tl.constexpr):
    """The row tile from ``r0`` of an i2t pair block (image of ``m_i`` tokens from row
    ``v_row0``): its ``rows``, their validity and the tokens' norms ``[R]``, similarities
    ``s``, ``a``, the norms' sums of squares (computed here when ``SINGLE``), attention
    ``alpha`` ``[R, W]``, ``alpha G``, ``<V_r, c_r>`` and ``|c_r|^2`` ``[R, BT]``; the
    forward and both backward passes read a row tile through it."""
    W: tl.constexpr = BT * NP
    rows = r0 + tl.arange(0, BLOCK_R)
    rvalid = rows < m_i
    v_norm = tl.load(v_norm_ptr + v_row0 + rows, mask=rvalid, other=0.0)
    s = similarities(v_ptr, v_row0 + rows, rvalid, t_ptr, t_rows, cvalid, D,
                      BLOCK_R, W, BLOCK_D, PRECISION)
    a = leaky(s)  # padding was loaded as 0, so a (and s) are 0 there
    if SINGLE:
        col_sq = tl.sum(a * a, axis=0)
    x = tl.where(cvalid[None, :], lam * a / (tl.sqrt(col_sq) + EPS)[None, :], float("-inf"))
    x3 = tl.reshape(x, [BLOCK_R, BT, NP])
    top = tl.max(x3, axis=2)
    top = tl.where(top == float("-inf"), 0.0, top)  # captions past the end
    e = tl.exp(x3 - top[:, :, None])
    den = tl.sum(e, axis=2)
    alpha = tl.reshape(e / tl.where(den == 0, 1.0, den)[:, :, None], [BLOCK_R, W])
    num = segment_sum(alpha * s, BLOCK_R, BT, NP)  # <V_r, c_r>
    # The block-diagonal product must not mix captions: a NaN attention (from a non-finite
    # token) times another caption's zero Gram block would be NaN. Zeroed here, it still
    # reaches its own caption's score through ``num``.
    alpha_g = tl.dot(tl.where(alpha == alpha, alpha, 0.0), gram, input_precision=GRAM_PRECISION)
    c_sq = segment_sum(alpha_g * alpha, BLOCK_R, BT, NP)  # |c_r|^2
    return rows, rvalid, v_norm, s, a, col_sq, alpha, alpha_g, num, c_sq


def _chunks(x: Tensor, lengths: Tensor):
    """Float32 zero-padded copies of ``x`` by chunks of items, ``_HOST_BYTES`` at most each."""
    step = max(1, _HOST_BYTES // (4 * x.shape[1] * x.shape[2]))
    for b0 in range(0, x.shape[0], step):
        yield b0, b0 + step, zero_padded_float(x[b0 : b0 + step], lengths[b0 : b0 + step])


def norms(x: Tensor, lengths: Tensor) -> Tensor:
    """``[B, L]`` float32 token norms (0 on padding)."""
    out = torch.empty(x.shape[:2], dtype=torch.float32, device=x.device)
    for b0, b1, part in _chunks(x, lengths):
        out[b0:b1] = torch.linalg.vector_norm(part, dim=-1)
    return out


def grams(x: Tensor, lengths: Tensor) -> Tensor:
    """``[B, L, L]`` float32 Gram matrices ``x_b x_b^T`` of the valid tokens."""
    out = torch.empty(x.shape[0], x.shape[1], x.shape[1], dtype=torch.float32, device=x.device)
    for b0, b1, part in _chunks(x, lengths):
        torch.bmm(part, part.transpose(1, 2), out=out[b0:b1])
    return out


def precisions(dtype: torch.dtype) -> tuple[str, str]:
    """Similarities: exact for float32 unless TF32 was opted into. Attention x Gram products
    (float32 operands): exact for float32 inputs, TF32 for 16-bit inputs (far below their
    rounding)."""
    sims = dot_precision(dtype)
    return sims, (sims if dtype == torch.float32 else dot_precision(torch.float16))


@triton.jit
def expand_words(x, R: tl.constexpr, BT: tl.constexpr, NP: tl.constexpr):
    """``[R, BT] -> [R, BT * NP]``: a per-(token, caption) value on each of the caption's words."""
    return tl.reshape(tl.broadcast_to(x[:, :, None], [R, BT, NP]), [R, BT * NP])
