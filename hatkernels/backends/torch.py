"""The ``torch`` backend: exact, pure PyTorch, any device, memory-bounded, readable.

Not naive:

- max pooling packs the query side's valid tokens (``[sum n, D]`` words for ``t2i``,
  ``[sum m, D]`` image tokens for ``i2t``) and runs one GEMM per block of whole images x whole
  captions into a reused buffer, takes the max over the other side's tokens (padding masked
  to -inf) and sums per caption/image with a segmented ``index_add_``;
- scan pooling works pair-block by pair-block and never forms the attended context: with
  ``alpha`` the attention, ``<x, c> = sum alpha * S`` and ``|c|^2 = alpha^T G alpha`` with the
  Gram matrix ``G`` of the attended side (one per caption or image, not per pair).

Blocks are sized so that their intermediates stay under ``memory_budget`` bytes. The
backward recomputes each block and differentiates it (``torch.func.vjp``, as activation
checkpointing does) and adds its gradients, so it needs no more memory than the forward.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from functools import partial

import torch
import torch.nn.functional as F
from torch import Tensor

from ..constants import EPS, LEAKY_SLOPE
from ..inputs import AlignInputs
from .base import Backend, output_dtype

# Blocks of at most this many similarities on CPU keep the GEMM output close to the caches.
_CPU_BLOCK_ELEMENTS = 1 << 21


def _mask(lengths: Tensor, size: int) -> Tensor:
    return torch.arange(size, device=lengths.device) < lengths[:, None]


def _zero_padding(x: Tensor, lengths: Tensor) -> Tensor:
    """A float32/64 copy of ``x`` with padded tokens set to 0 (``where``: NaN-safe, grads too)."""
    keep = _mask(lengths, x.shape[1])[..., None]
    x = x.to(output_dtype(x.dtype))
    return torch.where(keep, x, torch.zeros((), dtype=x.dtype, device=x.device))


def _blocks(
    n_images: int,
    n_texts: int,
    pair_elements: int,
    bytes_per_element: int,
    budget: int,
    device: torch.device,
) -> tuple[int, int]:
    """Images and captions per block so that a block's intermediates fit the budget."""
    limit = max(1, budget // bytes_per_element)
    if device.type == "cpu":
        limit = min(limit, _CPU_BLOCK_ELEMENTS)
    pairs = max(1, limit // pair_elements)
    bi = min(n_images, max(1, math.isqrt(pairs)))
    bt = min(n_texts, max(1, pairs // bi))
    bi = min(n_images, max(1, pairs // bt))
    return bi, bt


def _max_block(v: Tensor, t: Tensor, vl: Tensor, tl: Tensor, direction: str, reduce: str):
    """Max-pooled scores of a block of whole images ``v`` and whole captions ``t``."""
    v = _zero_padding(v, vl)
    t = _zero_padding(t, tl)
    (bi, m, d), (bt, n, _) = v.shape, t.shape
    out = v.new_zeros(bi, bt)
    if direction in ("t2i", "both"):
        words = t[_mask(tl, n)]  # [sum n, D], captions in order
        owner = torch.repeat_interleave(torch.arange(bt, device=t.device), tl)
        s = (v.reshape(bi * m, d) @ words.T).view(bi, m, -1)
        s = s.masked_fill(~_mask(vl, m)[..., None], float("-inf"))
        q = s.amax(1)  # [bi, sum n]: each word's best image token
        scores = out.new_zeros(bi, bt).index_add(1, owner, q)
        out = out + (scores / tl.to(out.dtype) if reduce == "mean" else scores)
    if direction in ("i2t", "both"):
        regions = v[_mask(vl, m)]  # [sum m, D]
        owner = torch.repeat_interleave(torch.arange(bi, device=v.device), vl)
        s = (regions @ t.reshape(bt * n, d).T).view(-1, bt, n)
        s = s.masked_fill(~_mask(tl, n)[None], float("-inf"))
        q = s.amax(2)  # [sum m, bt]: each image token's best word
        scores = out.new_zeros(bi, bt).index_add(0, owner, q)
        out = out + (scores / vl[:, None].to(out.dtype) if reduce == "mean" else scores)
    return out


def _root(x: Tensor) -> Tensor:
    """``sqrt(max(x, 0))`` whose gradient is 0 where ``x <= 0`` (not ``inf * 0 = NaN``): the
    subgradient the fused kernels take where a norm vanishes (e.g. an all-zero word)."""
    positive = x > 0
    return torch.where(positive, torch.sqrt(torch.where(positive, x, 1.0)), 0.0)


def _cosine_from_gram(num: Tensor, alpha_g_alpha: Tensor, norms: Tensor) -> Tensor:
    """``<x, c> / max(|x| |c|, eps)`` given ``<x, c>``, ``|c|^2`` and ``|x|``."""
    return num / torch.clamp(norms * _root(alpha_g_alpha), min=EPS)


def _scan_block(
    v: Tensor, t: Tensor, vl: Tensor, tl: Tensor, direction: str, reduce: str, lam: float
):
    """Scan-pooled scores of a block of whole images x whole captions (Gram identity)."""
    v = _zero_padding(v, vl)
    t = _zero_padding(t, tl)
    (bi, m, d), (bt, n, _) = v.shape, t.shape
    vm = _mask(vl, m)[:, None, :, None]  # [bi, 1, M, 1]
    tm = _mask(tl, n)[None, :, None, :]  # [1, bt, 1, N]
    s = (v.reshape(bi * m, d) @ t.reshape(bt * n, d).T).view(bi, m, bt, n).transpose(1, 2)
    a = F.leaky_relu(s, LEAKY_SLOPE).masked_fill(~(vm & tm), 0)
    out = v.new_zeros(bi, bt)
    if direction in ("t2i", "both"):
        b = a / (_root((a * a).sum(3, keepdim=True)) + EPS)  # across words, per region
        alpha = torch.softmax((lam * b).masked_fill(~vm, float("-inf")), dim=2)
        num = (alpha * s).sum(2)  # [bi, bt, N]: <T_w, c_w>
        gram = v @ v.transpose(1, 2)  # [bi, M, M]
        c2 = ((gram[:, None] @ alpha) * alpha).sum(2)  # |c_w|^2
        q = _cosine_from_gram(num, c2, t.norm(dim=-1)[None])
        q = q.masked_fill(~tm[:, :, 0, :], 0).sum(2)
        out = out + (q / tl[None].to(q.dtype) if reduce == "mean" else q)
    if direction in ("i2t", "both"):
        b = a / (_root((a * a).sum(2, keepdim=True)) + EPS)  # across regions, per word
        alpha = torch.softmax((lam * b).masked_fill(~tm, float("-inf")), dim=3)
        num = (alpha * s).sum(3)  # [bi, bt, M]: <V_r, c_r>
        gram = t @ t.transpose(1, 2)  # [bt, N, N]
        c2 = ((alpha @ gram[None]) * alpha).sum(3)  # |c_r|^2
        q = _cosine_from_gram(num, c2, v.norm(dim=-1)[:, None])
        q = q.masked_fill(~vm[:, :, :, 0], 0).sum(2)
        out = out + (q / vl[:, None].to(q.dtype) if reduce == "mean" else q)
    return out


BlockFn = Callable[[Tensor, Tensor, Tensor, Tensor], Tensor]


def _forward(block: BlockFn, images, texts, vl, tl, bi: int, bt: int) -> Tensor:
    out = torch.empty(
        images.shape[0], texts.shape[0], dtype=output_dtype(images.dtype), device=images.device
    )
    with torch.no_grad():
        for i0 in range(0, images.shape[0], bi):
            for j0 in range(0, texts.shape[0], bt):
                out[i0 : i0 + bi, j0 : j0 + bt] = block(
                    images[i0 : i0 + bi], texts[j0 : j0 + bt], vl[i0 : i0 + bi], tl[j0 : j0 + bt]
                )
    return out


def _backward(block: BlockFn, grad, images, texts, vl, tl, bi: int, bt: int):
    """Recompute each block and accumulate its input gradients (``torch.func.vjp``: it works
    where the custom op runs, below the autograd dispatch key)."""
    gi = torch.zeros(images.shape, dtype=output_dtype(images.dtype), device=images.device)
    gt = torch.zeros(texts.shape, dtype=output_dtype(texts.dtype), device=texts.device)
    for i0 in range(0, images.shape[0], bi):
        for j0 in range(0, texts.shape[0], bt):
            lengths = vl[i0 : i0 + bi], tl[j0 : j0 + bt]
            _, vjp = torch.func.vjp(lambda v, t, lengths=lengths: block(v, t, *lengths),
                                    images[i0 : i0 + bi], texts[j0 : j0 + bt])  # fmt: skip
            dv, dt = vjp(grad[i0 : i0 + bi, j0 : j0 + bt])
            gi[i0 : i0 + bi] += dv
            gt[j0 : j0 + bt] += dt
    return gi.to(images.dtype), gt.to(texts.dtype)


# Bytes per element of a block's [bi, bt, M, N] similarities, counting the intermediates
# that live at once (forward and the recomputation under autograd).
_MAX_BYTES = 4 * 8
_SCAN_BYTES = 4 * 24


class TorchBackend(Backend):
    """Pure PyTorch on any device; also accepts float64 (for gradcheck and references)."""

    name = "torch"
    device_types = ("cpu", "cuda", "mps", "xpu")
    dtypes = (torch.float32, torch.float16, torch.bfloat16, torch.float64)

    def device_unsupported_reason(self, device: torch.device) -> str | None:
        if device.type == "cuda" and not torch.cuda.is_available():
            return "CUDA is not available"
        return None

    def _run(self, block: BlockFn, bytes_per_element: int, inp: AlignInputs,
             grad: Tensor | None = None):  # fmt: skip
        """The forward (``grad`` None) or the recomputing backward of ``block`` over blocks."""
        images, texts = inp.images, inp.texts
        pair = images.shape[1] * texts.shape[1]
        bi, bt = _blocks(images.shape[0], texts.shape[0], pair, bytes_per_element,
                         inp.memory_budget, images.device)  # fmt: skip
        if grad is None:
            return _forward(block, *inp.tensors, bi, bt)
        return _backward(block, grad, *inp.tensors, bi, bt)

    def max_align(self, inp: AlignInputs) -> Tensor:
        block = partial(_max_block, direction=inp.direction, reduce=inp.reduce)
        return self._run(block, _MAX_BYTES, inp)

    def max_align_backward(self, grad: Tensor, inp: AlignInputs) -> tuple[Tensor, Tensor]:
        block = partial(_max_block, direction=inp.direction, reduce=inp.reduce)
        return self._run(block, _MAX_BYTES, inp, grad)

    def scan_align(self, inp: AlignInputs) -> Tensor:
        return self._run(self._scan(inp), _SCAN_BYTES, inp)

    def scan_align_backward(self, grad: Tensor, inp: AlignInputs) -> tuple[Tensor, Tensor]:
        return self._run(self._scan(inp), _SCAN_BYTES, inp, grad)

    @staticmethod
    def _scan(inp: AlignInputs) -> BlockFn:
        return partial(_scan_block, direction=inp.direction, reduce=inp.reduce,
                       lam=inp.lambda_softmax)  # fmt: skip
