"""hier_topk against the dense hier_align matrix followed by a top-k that breaks ties toward
the lower gallery index, on random ragged multi-level cases with duplicated gallery items."""

from __future__ import annotations

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from alignment_cases import backend_params
from hatkernels import TokenStore, hier_align, hier_topk
from hatkernels.topk import _chunk_keys, _decode

SETTINGS = [(p, d, r) for p in ("max", "scan") for d in ("t2i", "i2t", "both")
            for r in ("mean", "sum")]


def dense_topk(scores: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Rows are queries: order by (NaN last, -value, index), keep k. Built from two stable
    sorts, independently of hier_topk's packed keys."""
    s = scores.float()
    nan = torch.isnan(s)
    by_value = torch.sort(s.masked_fill(nan, -torch.inf), dim=1, descending=True,
                          stable=True).indices
    nan_last = torch.sort(nan.gather(1, by_value).to(torch.int8), dim=1, stable=True).indices
    order = by_value.gather(1, nan_last)
    return s.gather(1, order)[:, :k], order[:, :k]


def random_case(seed: int, n_images: int, n_texts: int, levels: list[tuple[int, int, int]],
                duplicates: int, dtype: torch.dtype = torch.float32):
    gen = torch.Generator().manual_seed(seed)
    images, texts, il, tl = [], [], [], []
    for m, n, d in levels:
        v = torch.nn.functional.normalize(torch.randn(n_images, m, d, generator=gen), dim=-1)
        t = torch.nn.functional.normalize(torch.randn(n_texts, n, d, generator=gen), dim=-1)
        images.append(v)
        texts.append(t)
        il.append(torch.randint(1, m + 1, (n_images,), generator=gen))
        tl.append(torch.randint(1, n + 1, (n_texts,), generator=gen))
    # Duplicate the first items at the end of both sides: equal scores, the tie rule decides.
    images = [torch.cat([v, v[:duplicates]]).to(dtype) for v in images]
    texts = [torch.cat([t, t[:duplicates]]).to(dtype) for t in texts]
    il = [torch.cat([x, x[:duplicates]]) for x in il]
    tl = [torch.cat([x, x[:duplicates]]) for x in tl]
    return images, texts, il, tl


def check(images, texts, il, tl, k, query, backend, chunk, **kw):
    """hier_topk vs the dense matrix. One chunk: bit-identical to the dense top-k. Several
    chunks: each value is its pair's score up to float32 rounding (a backend's rounding may
    depend on the batch it is given), no left-out item beats the k-th by more than that,
    and the result is in (value descending, index ascending) order."""
    got = hier_topk(images, texts, k, query=query, image_lengths=il, text_lengths=tl,
                    backend=backend, chunk=chunk, **kw)
    dense = hier_align(images, texts, image_lengths=il, text_lengths=tl, backend=backend, **kw)
    dense = (dense.t() if query == "texts" else dense).float()
    values, indices = dense_topk(dense, k)
    assert got.values.dtype == torch.float32 and got.indices.dtype == torch.int64
    assert got.values.shape == got.indices.shape == (dense.shape[0], k)
    if chunk is None or chunk >= dense.shape[1]:
        assert torch.equal(got.indices, indices)
        assert torch.equal(got.values, values)
        return got
    tol = 1e-5 * max(1.0, float(dense.abs().max()))
    torch.testing.assert_close(got.values, dense.gather(1, got.indices), atol=tol, rtol=0)
    left_out = dense.scatter(1, got.indices, -torch.inf).amax(1, keepdim=True)
    assert (got.values[:, -1:] >= left_out - tol).all()
    order = torch.sort(got.indices, dim=1).indices  # the result's own items, by index
    v, i = got.values.gather(1, order), got.indices.gather(1, order)
    again = dense_topk(v, k)[1]
    assert torch.equal(i.gather(1, again), got.indices)
    return got


@pytest.mark.parametrize("backend", [p for p in backend_params() if p.id != "triton"])
@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(data=st.data())
def test_topk_equals_dense(backend: str, data) -> None:
    pooling, direction, reduce = data.draw(st.sampled_from(SETTINGS))
    n_levels = data.draw(st.integers(1, 3))
    levels = [(data.draw(st.integers(1, 6)), data.draw(st.integers(1, 7)),
               data.draw(st.integers(2, 9))) for _ in range(n_levels)]
    n_images, n_texts = data.draw(st.integers(1, 12)), data.draw(st.integers(1, 9))
    dup = data.draw(st.integers(0, min(n_images, n_texts)))
    query = data.draw(st.sampled_from(["texts", "images"]))
    gallery = (n_images if query == "texts" else n_texts) + dup
    k = data.draw(st.integers(1, gallery))
    chunk = data.draw(st.one_of(st.none(), st.integers(1, gallery + 2)))
    weights = data.draw(st.one_of(st.none(), st.just([0.5 + l for l in range(n_levels)])))
    case = random_case(data.draw(st.integers(0, 2**16)), n_images, n_texts, levels, dup)
    check(*case, k, query, backend, chunk, pooling=pooling, direction=direction, reduce=reduce,
          weights=weights, lambda_softmax=data.draw(st.sampled_from([1.0, 9.0])))


@pytest.mark.parametrize("backend", [p for p in backend_params() if p.id == "triton"])
@pytest.mark.parametrize("pooling", ["max", "scan"])
@pytest.mark.parametrize("query", ["texts", "images"])
def test_topk_triton_tiny(backend: str, pooling: str, query: str) -> None:
    case = random_case(3, 5, 4, [(3, 4, 8), (2, 3, 16)], duplicates=2)
    check(*case, 3, query, backend, 2, pooling=pooling, direction="i2t", reduce="mean")


def test_ties_go_to_the_lower_index() -> None:
    image = torch.nn.functional.normalize(torch.randn(1, 4, 8), dim=-1)
    images = image.expand(50, 4, 8).contiguous()  # every gallery item scores the same
    texts = torch.nn.functional.normalize(torch.randn(3, 5, 8), dim=-1)
    got = hier_topk(images, texts, 7, chunk=6, backend="torch")
    assert torch.equal(got.indices, torch.arange(7).expand(3, 7))


def test_nan_scores_rank_last() -> None:
    scores = torch.tensor([[1.0, float("nan"), -float("inf"), 0.0, -0.0, 2.0, float("nan")]])
    values, indices = _decode(_chunk_keys(scores, torch.arange(10, 17), 7).topk(7).values)
    assert indices.tolist() == [[15, 10, 13, 14, 12, 11, 16]]
    assert values[0, :5].tolist() == [2.0, 1.0, 0.0, 0.0, -float("inf")]
    assert torch.isnan(values[0, 5:]).all()
    # Through hier_topk: a gallery item with a NaN in a valid token scores NaN.
    images = torch.nn.functional.normalize(torch.randn(6, 3, 4), dim=-1)
    images[1, 0, 0] = float("nan")
    texts = torch.nn.functional.normalize(torch.randn(2, 3, 4), dim=-1)
    got = hier_topk(images, texts, 6, backend="torch", chunk=4)
    assert (got.indices[:, -1] == 1).all() and torch.isnan(got.values[:, -1]).all()


def test_float64_and_float16_inputs() -> None:
    images, texts, il, tl = random_case(7, 9, 6, [(4, 5, 8)], duplicates=2)
    for dtype in (torch.float64, torch.float16):
        backend = "torch" if dtype == torch.float64 else "auto"
        check([v.to(dtype) for v in images], [t.to(dtype) for t in texts], il, tl, 4,
              "texts", backend, 3, pooling="scan", direction="i2t")


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_store_gallery_equals_tensor_gallery(tmp_path, dtype: torch.dtype) -> None:
    images, texts, il, tl = random_case(11, 23, 7, [(5, 6, 8), (2, 3, 4)], duplicates=3)
    store = TokenStore.write(tmp_path / "g", images, il, dtype=dtype, shard_size=6)
    stored = [v.to(dtype).float() for v in images]  # what the store holds, in float32
    for view, a in ((store, 0), (store[4:19], 4)):
        n = len(view)
        got = hier_topk(view, texts, 5, text_lengths=tl, pooling="scan", direction="i2t",
                        chunk=4)
        want = hier_topk([v[a:a + n] for v in stored], texts, 5,
                         image_lengths=[x[a:a + n] for x in il], text_lengths=tl,
                         pooling="scan", direction="i2t")
        assert torch.equal(got.indices, want.indices) and torch.equal(got.values, want.values)
    # The caption side as the stored gallery, images as queries.
    cap = TokenStore.write(tmp_path / "c", texts, tl, dtype=dtype, shard_size=4)
    got = hier_topk(images, cap, 3, query="images", image_lengths=il)
    want = hier_topk(images, [t.to(dtype).float() for t in texts], 3, query="images",
                     image_lengths=il, text_lengths=tl)
    assert torch.equal(got.indices, want.indices) and torch.equal(got.values, want.values)


def test_empty_queries() -> None:
    got = hier_topk(torch.randn(5, 2, 4), torch.randn(0, 3, 4), 2)
    assert got.values.shape == (0, 2) and got.indices.shape == (0, 2)


@pytest.mark.parametrize("k, error, match", [
    (0, ValueError, "^k: expected 1 <= k <= 5"),
    (6, ValueError, "^k: expected 1 <= k <= 5"),
    (True, TypeError, "^k: "),
    (2.0, TypeError, "^k: "),
])
def test_bad_k(k, error, match) -> None:
    with pytest.raises(error, match=match):
        hier_topk(torch.randn(5, 2, 4), torch.randn(3, 3, 4), k)


def test_bad_arguments(tmp_path) -> None:
    images, texts = torch.randn(5, 2, 4), torch.randn(3, 3, 4)
    with pytest.raises(ValueError, match="^query: "):
        hier_topk(images, texts, 1, query="captions")
    with pytest.raises(ValueError, match="^chunk: "):
        hier_topk(images, texts, 1, chunk=0)
    with pytest.raises(ValueError, match="^image_lengths: expected one length per gallery"):
        hier_topk(images, texts, 1, image_lengths=torch.ones(4, dtype=torch.int64))
    with pytest.raises(ValueError, match="^images: every level must hold the same number"):
        hier_topk([images, images[:3]], [texts, texts], 1)
    with pytest.raises(ValueError, match="^images/texts"):  # query and gallery on two devices
        hier_topk(images, texts.to("meta"), 1)
    with pytest.raises(ValueError, match="^pooling: "):  # hier_align's own checks
        hier_topk(images, texts, 1, pooling="mean")
    store = TokenStore.write(tmp_path / "s", [images, images[:, :1, :3]])
    with pytest.raises(ValueError, match=r"^images: the store .* holds 2 levels of dims \[4, 3\]"):
        hier_topk(store, [texts, texts], 1)
    with pytest.raises(ValueError, match="^images: the store"):
        hier_topk(store, texts, 1)
    with pytest.raises(ValueError, match="^image_lengths: a TokenStore gallery carries"):
        hier_topk(store, [texts, texts[..., :3]], 1, image_lengths=torch.ones(5, dtype=int))
    with pytest.raises(ValueError, match="^k: expected 1 <= k <= 2"):
        hier_topk(store[1:3], [texts, texts[..., :3]], 3)
