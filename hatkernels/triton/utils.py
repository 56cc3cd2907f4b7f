"""Shared chores of the Triton kernels: packing valid tokens, dot precision, autotune configs.

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
