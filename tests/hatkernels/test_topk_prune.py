"""hier_topk's pruning by score bounds (max pooling, cpu backend, CPUs that screen with int8).

The bounds must hold every float32 score the kernels compute (random, near-tied, huge and
tiny tokens, ragged, several levels with negative weights); hier_topk must return the items
it returns without pruning, while scoring fewer pairs where the data lets it."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st

import hatkernels
import hatkernels.topk as topk_module
from hatkernels import hier_align, hier_topk
from hatkernels.topk_prune import hier_bounds

pytestmark = pytest.mark.skipif(
    "cpu" not in hatkernels.available_backends("cpu"), reason="hatkernels._C_cpu is not built"
)

SETTINGS = dict(pooling="max", reduce="mean", lambda_softmax=9.0, backend="cpu",
                memory_budget=1 << 30)


def _tokens(gen, batch, size, dim, scale=1.0):
    x = F.normalize(torch.randn(batch, size, dim, generator=gen), dim=-1) * scale
    lengths = torch.randint(1, size + 1, (batch,), generator=gen)
    return x, lengths


def _bounds(images, texts, il, tl, direction, reduce="mean", weights=(1.0,)):
    kw = dict(SETTINGS, direction=direction, reduce=reduce)
    return hier_bounds(images, texts, il, tl, list(weights), **kw)


def _screening_or_skip(bounds):
    if bounds is None:
        pytest.skip("this CPU (or level) does not screen with int8 codes: no bounds")
    return bounds


@pytest.mark.parametrize("direction", ["t2i", "i2t"])
@pytest.mark.parametrize("reduce", ["mean", "sum"])
@pytest.mark.parametrize("kind", ["random", "near-tie", "huge", "tiny"])
def test_bounds_hold_every_score(direction, reduce, kind):
    gen = torch.Generator().manual_seed(3)
    scale = {"huge": 1e3, "tiny": 1e-3}.get(kind, 1.0)
    v, il = _tokens(gen, 23, 17, 100, scale)
    t, tl = _tokens(gen, 41, 9, 100)
    if kind == "near-tie":  # every image's tokens one direction plus 1e-4 noise
        v = F.normalize(v[:, :1] + 1e-4 * torch.randn(v.shape, generator=gen), dim=-1)
    lo, hi = _screening_or_skip(_bounds([v], [t], [il], [tl], direction, reduce))
    s = hier_align(v, t, image_lengths=il, text_lengths=tl, direction=direction, reduce=reduce,
                   pooling="max", backend="cpu").double()
    assert lo.shape == hi.shape == s.shape
    assert (lo <= s).all() and (s <= hi).all()
    if kind == "random":  # and tight: a few 1e-2 per query token for unit tokens at D = 100
        per_token = tl.double()[None, :] if direction == "t2i" else il.double()[:, None]
        width = (hi - lo) / (per_token if reduce == "sum" else 1.0)
        assert float(width.max()) < 0.1


@settings(max_examples=25, deadline=None)
@given(seed=st.integers(0, 2**31 - 1), levels=st.integers(1, 3), dim=st.integers(1, 70),
       direction=st.sampled_from(["t2i", "i2t"]))
def test_bounds_hold_over_levels_and_weights(seed, levels, dim, direction):
    gen = torch.Generator().manual_seed(seed)
    vs, ils, ts, tls = [], [], [], []
    for _ in range(levels):
        v, il = _tokens(gen, 7, 6, dim, float(torch.rand(1, generator=gen)) * 3)
        t, tl = _tokens(gen, 5, 8, dim)
        vs, ils, ts, tls = vs + [v], ils + [il], ts + [t], tls + [tl]
    weights = (torch.randn(levels, generator=gen) * 2).tolist()
    bounds = _screening_or_skip(_bounds(vs, ts, ils, tls, direction, weights=weights))
    s = hier_align(vs, ts, image_lengths=ils, text_lengths=tls, direction=direction,
                   weights=weights, pooling="max", backend="cpu").double()
    assert (bounds[0] <= s).all() and (s <= bounds[1]).all()


def test_no_bounds_where_they_do_not_apply():
    gen = torch.Generator().manual_seed(4)
    v, il = _tokens(gen, 3, 4, 16)
    t, tl = _tokens(gen, 2, 5, 16)
    assert _bounds([v], [t], [il], [tl], "both") is None
    assert _bounds([v.double()], [t.double()], [il], [tl], "t2i") is None
    assert hier_bounds([v], [t], [il], [tl], [1.0], **dict(SETTINGS, pooling="scan",
                                                           direction="t2i")) is None
    assert hier_bounds([v], [t], [il], [tl], [1.0], **dict(SETTINGS, backend="torch",
                                                           direction="t2i")) is None
    v[1, 0, 0] = float("nan")
    assert _bounds([v], [t], [il], [tl], "t2i") is None


def _gallery_and_queries(seed: int, clusters: int = 400, size: int = 5, n_queries: int = 70,
                         dim: int = 96):
    """Images in clusters of near-duplicates, and captions each made of one image's tokens
    plus noise: a caption's cluster stands out from the rest of the gallery, as in real
    retrieval, so that the bounds rule most items out."""
    gen = torch.Generator().manual_seed(seed)
    centers, il = _tokens(gen, clusters, 12, dim)
    noise = 0.1 * torch.randn(clusters, size, 12, dim, generator=gen) / dim**0.5
    images = F.normalize(centers[:, None] + noise, dim=-1).flatten(0, 1)
    il = il.repeat_interleave(size)
    match = torch.randint(0, clusters * size, (n_queries,), generator=gen)
    words = torch.randint(0, 12, (n_queries, 9), generator=gen) % il[match, None]
    texts = F.normalize(images[match[:, None], words] + 0.3 * torch.randn(
        n_queries, 9, dim, generator=gen) / dim**0.5, dim=-1)
    tl = torch.randint(3, 10, (n_queries,), generator=gen)
    return images, il, texts, tl


def _scored_pairs(monkeypatch) -> list[int]:
    """The number of (query, item) pairs each hier_align call of hier_topk scores."""
    counts: list[int] = []
    real = topk_module.hier_align

    def spy(*args, **kwargs):
        out = real(*args, **kwargs)
        counts.append(out.numel())
        return out

    monkeypatch.setattr(topk_module, "hier_align", spy)
    return counts


@pytest.mark.parametrize("chunk", [None, 700])
@pytest.mark.parametrize("query", ["texts", "images"])
@pytest.mark.parametrize("direction", ["t2i", "i2t"])
def test_pruned_topk_is_the_exact_topk(query, direction, chunk, monkeypatch):
    """One chunk (its thresholds from the whole gallery's bounds: most pairs skipped) and three
    (the first has no exact scores to go by yet, and here the second's query blocks still
    reach too many items: both scored whole, which ends pruning; the result is the same)."""
    images, il, texts, tl = _gallery_and_queries(5)
    if query == "images":  # the clustered side is the gallery either way
        images, il, texts, tl = texts, tl, images, il
    kw = dict(query=query, image_lengths=il, text_lengths=tl, pooling="max",
              direction=direction, backend="cpu", chunk=chunk)
    want = hier_topk(images, texts, 4, prune=False, **kw)
    counts = _scored_pairs(monkeypatch)
    got = hier_topk(images, texts, 4, **kw)
    assert torch.equal(got.indices, want.indices)
    # Values computed in other batches: float32 rounding may differ in the last bits.
    torch.testing.assert_close(got.values, want.values, rtol=1e-6, atol=1e-7)
    if _bounds([images], [texts], [il], [tl], direction) is None:
        pytest.skip("this CPU does not screen: nothing pruned")
    if chunk is None:  # pruning ran and paid
        assert sum(counts) < 0.35 * images.shape[0] * texts.shape[0]


def test_pruning_stops_where_bounds_are_too_loose(monkeypatch):
    """Random tokens and k = 15 of chunks of 20: the first chunk keeps most of its pairs, so
    the whole gallery is scored, as without pruning; the result is unchanged."""
    gen = torch.Generator().manual_seed(6)
    images, il = _tokens(gen, 60, 10, 64)
    texts, tl = _tokens(gen, 30, 8, 64)
    kw = dict(image_lengths=il, text_lengths=tl, pooling="max", backend="cpu", chunk=20)
    want = hier_topk(images, texts, 15, prune=False, **kw)
    counts = _scored_pairs(monkeypatch)
    got = hier_topk(images, texts, 15, **kw)
    assert torch.equal(got.indices, want.indices) and torch.equal(got.values, want.values)
    assert sum(counts) == 60 * 30


def test_nan_tokens_are_scored_without_pruning():
    images, il, texts, tl = _gallery_and_queries(7)
    images[3, 0, 0] = float("nan")
    kw = dict(image_lengths=il, text_lengths=tl, pooling="max", backend="cpu", chunk=1000)
    n = images.shape[0]
    got, want = hier_topk(images, texts, n, **kw), hier_topk(images, texts, n, prune=False, **kw)
    assert torch.equal(got.indices, want.indices)
    assert torch.equal(got.values.isnan(), want.values.isnan())
    assert (got.indices[:, -1] == 3).all()


def test_prune_must_be_a_bool():
    images, texts = torch.randn(3, 2, 4), torch.randn(2, 3, 4)
    with pytest.raises(TypeError, match="^prune: "):
        hier_topk(images, texts, 1, prune=1)
