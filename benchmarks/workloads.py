"""What the benchmarks run: the named workloads (W1: a training batch against its gallery;
W2: a whole test split at small D), their inputs, and the contenders (each backend through
``hier_align``, the naive PyTorch way, the packed GEMM).

Every contender is timed on a prefix slice of the workload (its first ``a`` images and first
``b`` captions) and scored by its effective rate on valid-token FLOPs
(``2 * D * sum(m_i) * sum(n_j)``), so a slow baseline can run on a slice and still be compared
with a kernel that runs on the whole workload.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import Tensor

from hatkernels import hier_align
from hatkernels.reference import naive_align


@dataclass(frozen=True)
class Case:
    """One operator setting: pooling, direction, reduction, scan's inverse temperature."""

    pooling: str
    direction: str
    reduce: str = "mean"
    lambda_softmax: float = 9.0

    @property
    def op(self) -> str:
        return f"{self.pooling}_align {self.direction} {self.reduce}"


MAX_T2I = Case("max", "t2i")
SCAN_I2T = Case("scan", "i2t")

Slice = tuple[int, int]


@dataclass(frozen=True)
class Workload:
    """Images ``[n_images, m, dim]`` with lengths in ``image_len`` (inclusive range) and captions
    ``[n_texts, n, dim]`` with lengths in ``text_len``; ``slices`` maps
    ``(pooling, mode)`` to ``{contender: (images, captions)}`` for contenders timed on a prefix."""

    name: str
    n_images: int
    m: int
    n_texts: int
    n: int
    dim: int
    image_len: tuple[int, int]
    text_len: tuple[int, int] = (8, 32)
    slices: dict[tuple[str, str], dict[str, Slice]] = field(default_factory=dict)

    def slice_for(self, pooling: str, mode: str, key: str) -> Slice:
        full = (self.n_images, self.n_texts)
        return self.slices.get((pooling, mode), {}).get(key, full)

    def common_slice(self, pooling: str, mode: str) -> Slice:
        """The smallest prefix any contender of ``(pooling, mode)`` is timed on: every
        contender runs on it with the same inputs for the check against float64."""
        slices = [(self.n_images, self.n_texts), *self.slices.get((pooling, mode), {}).values()]
        return min(s[0] for s in slices), min(s[1] for s in slices)

    @property
    def shape(self) -> str:
        return (f"{self.n_images}x{self.m} vs {self.n_texts}x{self.text_len[0]}-{self.text_len[1]}"
                f" D={self.dim}")


# The naive way and the torch backend are far slower than the kernels (and the torch backend,
# a stream of small parallel ops, slows down most when other processes share the cores); they
# are timed on the image/caption prefixes below. Both scale linearly in images and captions:
# the naive way loops over 16-image chunks, the torch backend over fixed-size blocks of pairs.
W1 = Workload(
    "W1", 256, 49, 1280, 32, 256, (49, 49),
    slices={
        ("max", "fwd"): {"naive": (32, 1280), "torch": (64, 1280)},
        ("scan", "fwd"): {"naive": (16, 640), "torch": (32, 1280)},
        ("max", "fwd+bwd"): {"naive": (16, 320), "torch": (16, 1280)},
        ("scan", "fwd+bwd"): {"naive": (16, 160), "torch": (16, 640)},
    },
)
W2 = Workload("W2", 1000, 49, 10000, 32, 32, (49, 49))
# The smoke run: tiny, ragged on both sides, every contender on the whole workload.
TINY = Workload("tiny", 5, 7, 9, 6, 16, (2, 7), (1, 6))
TINY_MEMORY = Workload("tiny-W2", 16, 49, 64, 32, 32, (49, 49))


def _sweep(name: str, n_images: int, m: int, n_texts: int, dim: int) -> Workload:
    slow = {"torch": (min(16, n_images), n_texts), "naive": (min(16, n_images), 320)}
    return Workload(f"S {name}", n_images, m, n_texts, 32, dim, (m, m),
                    slices={("max", "fwd"): slow, ("scan", "fwd"): slow})


# Shape sweep around a small base, one size changed at a time (full run only, forward only).
SWEEP = [
    _sweep("base", 64, 49, 320, 256),
    _sweep("Bi=16", 16, 49, 320, 256),
    _sweep("Bt=1280", 64, 49, 1280, 256),
    _sweep("M=144", 64, 144, 320, 256),
    _sweep("D=64", 64, 49, 320, 64),
    _sweep("D=768", 64, 49, 320, 768),
]


@dataclass
class Inputs:
    images: Tensor
    texts: Tensor
    image_lengths: Tensor
    text_lengths: Tensor

    def head(self, images: int, texts: int) -> Inputs:
        """The first ``images`` images and ``texts`` captions (contiguous copies)."""
        return Inputs(self.images[:images].contiguous(), self.texts[:texts].contiguous(),
                      self.image_lengths[:images], self.text_lengths[:texts])

    def to(self, dtype: torch.dtype) -> Inputs:
        """The same tokens in ``dtype`` (the float64 reference runs on them)."""
        return Inputs(self.images.to(dtype), self.texts.to(dtype), self.image_lengths,
                      self.text_lengths)

    def valid_flops(self) -> int:
        """FLOPs of the similarities on valid tokens: ``2 * D * sum(m_i) * sum(n_j)``."""
        d = self.images.shape[2]
        return 2 * d * int(self.image_lengths.sum()) * int(self.text_lengths.sum())


def _tokens(gen: torch.Generator, batch: int, size: int, dim: int, lengths: tuple[int, int]):
    x = F.normalize(torch.randn(batch, size, dim, generator=gen), dim=-1)
    lens = torch.randint(lengths[0], lengths[1] + 1, (batch,), generator=gen)
    padding = torch.arange(size) >= lens[:, None]
    return x.masked_fill(padding[..., None], float("nan")), lens  # padding must never be read


def make_inputs(w: Workload, seed: int = 0) -> Inputs:
    """L2-normalised random tokens (the kernels' speed does not depend on the values), NaN in
    every padded position."""
    gen = torch.Generator().manual_seed(seed)
    images, il = _tokens(gen, w.n_images, w.m, w.dim, w.image_len)
    texts, tl = _tokens(gen, w.n_texts, w.n, w.dim, w.text_len)
    return Inputs(images, texts, il, tl)


def gemm_fn(x: Inputs) -> Callable[[], Tensor]:
    """The machine's GEMM rate through torch: ``torch.mm`` of the packed valid tokens,
    ``[sum m, D] x [D, sum n]``, into a preallocated (pre-faulted) output."""
    v = x.images[torch.arange(x.images.shape[1]) < x.image_lengths[:, None]]
    t = x.texts[torch.arange(x.texts.shape[1]) < x.text_lengths[:, None]].t()
    out = torch.zeros(v.shape[0], t.shape[1])
    return lambda: torch.mm(v, t, out=out)


def _with_backward(fn: Callable[..., Tensor], x: Inputs, seed: int) -> Callable[[], tuple]:
    """Forward + backward of ``fn(images, texts)`` against a fixed random output gradient."""
    v = x.images.detach().clone().requires_grad_(True)
    t = x.texts.detach().clone().requires_grad_(True)
    gen = torch.Generator().manual_seed(seed)
    grad = torch.randn(v.shape[0], t.shape[0], generator=gen).to(v.dtype)

    def run() -> tuple[Tensor, Tensor, Tensor]:
        v.grad = t.grad = None
        out = fn(v, t)
        out.backward(grad)
        return out.detach(), v.grad, t.grad

    return run


def align_fn(x: Inputs, case: Case, backend: str, backward: bool) -> Callable[[], object]:
    """``hier_align`` on one backend (``"naive"``: ``reference.naive_align`` in float32)."""
    kw = dict(pooling=case.pooling, direction=case.direction, reduce=case.reduce,
              lambda_softmax=case.lambda_softmax)

    def fn(v: Tensor, t: Tensor) -> Tensor:
        if backend == "naive":
            return naive_align(v, t, x.image_lengths, x.text_lengths, **kw)
        return hier_align(v, t, image_lengths=x.image_lengths, text_lengths=x.text_lengths,
                          backend=backend, **kw)

    if backward:
        return _with_backward(fn, x, seed=1)
    return lambda: fn(x.images, x.texts)
