"""What the benchmarks run: the named workloads (W1: a training batch against its gallery;
W2: a whole test split at small D; W1's shape with near-tied image tokens; W6: HAT's three
levels at D = 768), their inputs, and the contenders (each backend through ``hier_align``, the
cpu backend with and without its int8 screening, the naive PyTorch way, the packed GEMM).

Every contender is timed on a prefix slice of the workload (its first ``a`` images and first
``b`` captions) and scored by its effective rate on valid-token FLOPs
(``2 * D * sum(m_i) * sum(n_j)``), so a slow baseline can run on a slice and still be compared
with a kernel that runs on the whole workload.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import Tensor

from hatkernels import hier_align
from hatkernels.reference import naive_align, naive_hier_align

SCREEN_ENV = "HATKERNELS_CPU_SCREEN"
# Contenders that run the cpu backend, and the value of HATKERNELS_CPU_SCREEN (read by the
# extension on every call) set around each of their calls: ``cpu`` screens the max forward
# with exact int8 codes, ``cpu-fp32`` runs the float32 kernel alone.
CPU_SCREEN = {"cpu": "1", "cpu-fp32": "0"}


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
    ``(pooling, mode)`` to ``{contender: (images, captions)}`` for contenders timed on a prefix;
    ``tokens``: ``"random"`` or ``"near-tie"`` (every image's tokens are one random unit vector
    plus noise of 1e-4 per component, renormalised: int8 screening cannot tell them apart);
    ``peers``: the optional peer libraries are timed on it too (max t2i forward)."""

    name: str
    n_images: int
    m: int
    n_texts: int
    n: int
    dim: int
    image_len: tuple[int, int]
    text_len: tuple[int, int] = (8, 32)
    slices: dict[tuple[str, str], dict[str, Slice]] = field(default_factory=dict)
    tokens: str = "random"
    peers: bool = False
    check: Slice | None = None  # the common slice, when not the smallest timed one

    def slice_for(self, pooling: str, mode: str, key: str) -> Slice:
        full = (self.n_images, self.n_texts)
        return self.slices.get((pooling, mode), {}).get(key, full)

    def common_slice(self, pooling: str, mode: str) -> Slice:
        """The smallest prefix any contender of ``(pooling, mode)`` is timed on: every
        contender runs on it with the same inputs for the check against float64."""
        if self.check:
            return self.check
        slices = [(self.n_images, self.n_texts), *self.slices.get((pooling, mode), {}).values()]
        return min(s[0] for s in slices), min(s[1] for s in slices)

    @property
    def shape(self) -> str:
        near = ", near-tied image tokens" if self.tokens == "near-tie" else ""
        return (f"{self.n_images}x{self.m} vs {self.n_texts}x{self.text_len[0]}-{self.text_len[1]}"
                f" D={self.dim}{near}")


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
    peers=True,
)
W2 = Workload("W2", 1000, 49, 10000, 32, 32, (49, 49))
# W1's sizes with near-tied image tokens, max t2i forward of the cpu backend with and without
# screening: every token of an image is a candidate, so the screened kernel must fall back.
W1_NEAR_TIE = Workload("W1 near-tie", 256, 49, 1280, 32, 256, (49, 49), tokens="near-tie",
                       check=(32, 1280))
# The smoke run: tiny, ragged on both sides, every contender on the whole workload.
TINY = Workload("tiny", 5, 7, 9, 6, 16, (2, 7), (1, 6), peers=True)
TINY_NEAR_TIE = Workload("tiny near-tie", 5, 7, 9, 6, 16, (2, 7), (1, 6), tokens="near-tie")
TINY_MEMORY = Workload("tiny-W2", 16, 49, 64, 32, 32, (49, 49))


def _sweep(name: str, n_images: int, m: int, n_texts: int, dim: int) -> Workload:
    slow = {"torch": (min(16, n_images), n_texts), "naive": (min(16, n_images), 320)}
    return Workload(f"S {name}", n_images, m, n_texts, 32, dim, (m, m),
                    slices={("max", "fwd"): slow, ("scan", "fwd"): slow}, peers=True)


# Shape sweep around a small base, one size changed at a time (full run only, forward only).
SWEEP = [
    _sweep("base", 64, 49, 320, 256),
    _sweep("Bi=16", 16, 49, 320, 256),
    _sweep("Bt=1280", 64, 49, 1280, 256),
    _sweep("M=144", 64, 144, 320, 256),
    _sweep("D=64", 64, 49, 320, 64),
    _sweep("D=768", 64, 49, 320, 768),
]


@dataclass(frozen=True)
class HatWorkload:
    """HAT's shapes: ``n_images`` images with one token set per level (``image_tokens``, all
    valid) against ``n_texts`` captions per level (``n`` words, ``text_len`` valid), scored
    by one ``hier_align`` call over every level (weights 1). Same interface as ``Workload``
    for the harness; ``pairs_to`` is the number of pairs the per-pair time is extrapolated to."""

    name: str
    n_images: int
    image_tokens: tuple[int, ...]
    n_texts: int
    n: int
    dim: int
    text_len: tuple[int, int] = (8, 32)
    slices: dict[tuple[str, str], dict[str, Slice]] = field(default_factory=dict)
    pairs_to: tuple[str, int] = ("Flickr30K test, 1,000 x 5,000", 5_000_000)
    peers = False
    check = None

    slice_for = Workload.slice_for
    common_slice = Workload.common_slice

    @property
    def shape(self) -> str:
        levels = "/".join(map(str, self.image_tokens))
        return (f"{self.n_images}x{levels} vs {self.n_texts}x{self.text_len[0]}-"
                f"{self.text_len[1]} per level D={self.dim}")


# HAT on CPU: 16 images with three levels of 784 / 196 / 49 tokens, 80 captions per level,
# D = 768, scan i2t mean (lambda 9), forward. The naive way and the torch backend run on the
# first image (or two) against every caption.
W6 = HatWorkload(
    "W6 HAT", 16, (784, 196, 49), 80, 32, 768,
    slices={("scan", "fwd"): {"naive": (1, 80), "torch": (2, 80)}},
)
TINY_HAT = HatWorkload("tiny HAT", 3, (7, 5, 3), 6, 6, 16, (1, 6))


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


@dataclass
class Levels:
    """Several levels of inputs (same images and captions, one token set per level), with
    ``Inputs``' interface; ``images``/``texts`` are level 0's (their lengths are the batch)."""

    levels: list[Inputs]

    @property
    def images(self) -> Tensor:
        return self.levels[0].images

    @property
    def texts(self) -> Tensor:
        return self.levels[0].texts

    def head(self, images: int, texts: int) -> Levels:
        return Levels([x.head(images, texts) for x in self.levels])

    def to(self, dtype: torch.dtype) -> Levels:
        return Levels([x.to(dtype) for x in self.levels])

    def valid_flops(self) -> int:
        return sum(x.valid_flops() for x in self.levels)


def _tokens(gen: torch.Generator, batch: int, size: int, dim: int, lengths: tuple[int, int],
            near_tie: bool = False):
    x = F.normalize(torch.randn(batch, size, dim, generator=gen), dim=-1)
    if near_tie:  # one unit vector per item, plus noise of 1e-4 per component
        x = F.normalize(x[:, :1] + 1e-4 * torch.randn(batch, size, dim, generator=gen), dim=-1)
    lens = torch.randint(lengths[0], lengths[1] + 1, (batch,), generator=gen)
    padding = torch.arange(size) >= lens[:, None]
    return x.masked_fill(padding[..., None], float("nan")), lens  # padding must never be read


def make_inputs(w: Workload, seed: int = 0) -> Inputs:
    """L2-normalised random tokens (the float32 kernels' speed does not depend on the values;
    the screened one's does: see ``Workload.tokens``), NaN in every padded position."""
    gen = torch.Generator().manual_seed(seed)
    images, il = _tokens(gen, w.n_images, w.m, w.dim, w.image_len, w.tokens == "near-tie")
    texts, tl = _tokens(gen, w.n_texts, w.n, w.dim, w.text_len)
    return Inputs(images, texts, il, tl)


def make_levels(w: HatWorkload, seed: int = 0) -> Levels:
    """One ``Inputs`` per level of ``w``: every image token valid, caption lengths drawn per
    level; NaN in every padded position."""
    gen = torch.Generator().manual_seed(seed)
    levels = []
    for m in w.image_tokens:
        images, il = _tokens(gen, w.n_images, m, w.dim, (m, m))
        texts, tl = _tokens(gen, w.n_texts, w.n, w.dim, w.text_len)
        levels.append(Inputs(images, texts, il, tl))
    return Levels(levels)


def make_any(w: Workload | HatWorkload) -> Inputs | Levels:
    return make_levels(w) if isinstance(w, HatWorkload) else make_inputs(w)


def gemm_fn(x: Inputs | Levels) -> Callable[[], Tensor]:
    """The machine's GEMM rate through torch: ``torch.mm`` of the packed valid tokens,
    ``[sum m, D] x [D, sum n]``, into a preallocated (pre-faulted) output (one per level)."""
    if isinstance(x, Levels):
        fns = [gemm_fn(level) for level in x.levels]
        return lambda: [fn() for fn in fns]
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


def _screened(flag: str, fn: Callable[..., Tensor]) -> Callable[..., Tensor]:
    """``fn`` with HATKERNELS_CPU_SCREEN set to ``flag`` during each call (then restored)."""

    def run(*args):
        old = os.environ.get(SCREEN_ENV)
        os.environ[SCREEN_ENV] = flag
        try:
            return fn(*args)
        finally:
            if old is None:
                del os.environ[SCREEN_ENV]
            else:
                os.environ[SCREEN_ENV] = old

    return run


def align_fn(x: Inputs | Levels, case: Case, backend: str,
             backward: bool) -> Callable[[], object]:
    """``hier_align`` on one backend (``"naive"``: ``reference.naive_align`` in float32;
    ``"cpu"`` / ``"cpu-fp32"``: the cpu backend with screening on / off). ``Levels``: one call
    over every level (weights 1), forward only."""
    kw = dict(pooling=case.pooling, direction=case.direction, reduce=case.reduce,
              lambda_softmax=case.lambda_softmax)
    name = "cpu" if backend in CPU_SCREEN else backend
    if isinstance(x, Levels):
        assert not backward, "several levels: forward only"
        args = ([lv.images for lv in x.levels], [lv.texts for lv in x.levels],
                [lv.image_lengths for lv in x.levels], [lv.text_lengths for lv in x.levels])
        if backend == "naive":
            return lambda: naive_hier_align(*args, **kw)
        call = lambda: hier_align(args[0], args[1], image_lengths=args[2],  # noqa: E731
                                  text_lengths=args[3], backend=name, **kw)
        return _screened(CPU_SCREEN[backend], call) if backend in CPU_SCREEN else call

    def fn(v: Tensor, t: Tensor) -> Tensor:
        if backend == "naive":
            return naive_align(v, t, x.image_lengths, x.text_lengths, **kw)
        return hier_align(v, t, image_lengths=x.image_lengths, text_lengths=x.text_lengths,
                          backend=name, **kw)

    if backend in CPU_SCREEN:
        fn = _screened(CPU_SCREEN[backend], fn)
    if backward:
        return _with_backward(fn, x, seed=1)
    return lambda: fn(x.images, x.texts)
