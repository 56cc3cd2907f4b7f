"""hier_align's contract beyond the math: argument checking, levels, lengths, weights, empty
batches, non-contiguous inputs, dtypes."""

from __future__ import annotations

import pytest
import torch

from alignment_cases import make_case, rel_err
from hatkernels import hier_align
from hatkernels.reference import naive_hier_align


def _inputs(bi=3, bt=4, m=5, n=6, d=8):
    gen = torch.Generator().manual_seed(0)
    return torch.randn(bi, m, d, generator=gen), torch.randn(bt, n, d, generator=gen)


@pytest.mark.parametrize(
    "kwargs,error,name",
    [
        (dict(pooling="mean"), ValueError, "pooling"),
        (dict(pooling=1), TypeError, "pooling"),
        (dict(direction="x"), ValueError, "direction"),
        (dict(reduce="max"), ValueError, "reduce"),
        (dict(backend="gpu"), ValueError, "backend"),
        (dict(backend="cuda"), ValueError, "backend"),
        (dict(lambda_softmax="9"), TypeError, "lambda_softmax"),
        (dict(lambda_softmax=float("nan")), ValueError, "lambda_softmax"),
        (dict(lambda_softmax=-1.0), ValueError, "lambda_softmax"),
        (dict(lambda_softmax=1e40), ValueError, "lambda_softmax"),
        (dict(lambda_softmax=1e4 * (1 + 1e-9)), ValueError, "lambda_softmax"),
        (dict(image_lengths=torch.tensor([1, 2, 3], device="meta")), ValueError, "image_lengths"),
        (dict(weights=[1.0, 2.0]), ValueError, "weights"),
        (dict(weights="1"), TypeError, "weights"),
        (dict(weights=[float("inf")]), ValueError, "weights"),
        (dict(memory_budget=0), ValueError, "memory_budget"),
        (dict(memory_budget=1.5), TypeError, "memory_budget"),
        (dict(image_lengths=torch.tensor([1, 2])), ValueError, "image_lengths"),
        (dict(image_lengths=torch.tensor([1.0, 2.0, 3.0])), TypeError, "image_lengths"),
        (dict(image_lengths=torch.tensor([1, 0, 3])), ValueError, "image_lengths"),
        (dict(image_lengths=torch.tensor([1, 6, 3])), ValueError, "image_lengths"),
        (dict(text_lengths=torch.tensor([1, 2, 7, 1])), ValueError, "text_lengths"),
        (dict(text_lengths=[None, None]), ValueError, "text_lengths"),
        (dict(text_lengths=[1, 2, 3, 4]), TypeError, "text_lengths"),
        (dict(text_lengths=3), TypeError, "text_lengths"),
    ],
)
def test_bad_arguments_name_the_argument(kwargs, error, name):
    v, t = _inputs()
    with pytest.raises(error, match=name):
        hier_align(v, t, backend=kwargs.pop("backend", "torch"), **kwargs)


@pytest.mark.parametrize(
    "images,texts,error,name",
    [
        (torch.randn(3, 8), torch.randn(4, 6, 8), ValueError, "images"),
        (torch.randn(3, 5, 8), torch.randn(4, 6, 7), ValueError, "texts"),
        (torch.randn(3, 5, 8), torch.randn(4, 6, 8).double(), TypeError, "texts"),
        (torch.randn(3, 5, 8).int(), torch.randn(4, 6, 8), TypeError, "images"),
        ("images", torch.randn(4, 6, 8), TypeError, "images"),
        ([], torch.randn(4, 6, 8), ValueError, "images"),
        ([torch.randn(3, 5, 8)], [torch.randn(4, 6, 8)] * 2, ValueError, "texts"),
        (
            [torch.randn(3, 5, 8), torch.randn(2, 5, 8)],
            [torch.randn(4, 6, 8)] * 2,
            ValueError,
            "images",
        ),
        ([torch.randn(3, 5, 8), [1]], [torch.randn(4, 6, 8)] * 2, TypeError, "images"),
        (torch.randn(3, 0, 8), torch.randn(4, 6, 8), ValueError, "images"),
        (torch.randn(0, 5, 8), torch.randn(4, 0, 8), ValueError, "texts"),
        (torch.randn(0, 5, 0), torch.randn(0, 6, 0), ValueError, "images"),
    ],
)
def test_bad_tensors_name_the_argument(images, texts, error, name):
    with pytest.raises(error, match=name):
        hier_align(images, texts)


@pytest.mark.parametrize("pooling", ["max", "scan"])
@pytest.mark.parametrize("bi,bt", [(0, 4), (3, 0), (0, 0)])
def test_empty_batches_behave_like_any_call(bi, bt, pooling):
    """An empty matrix, connected to the graph (zero gradients), lengths still checked."""
    v = torch.randn(bi, 5, 8, requires_grad=True)
    t = torch.randn(bt, 6, 8, requires_grad=True)
    out = hier_align(v, t, pooling=pooling, text_lengths=torch.full((bt,), 6))
    assert out.shape == (bi, bt) and out.dtype == torch.float32
    assert out.grad_fn is not None
    (out.sum() * 2).backward()
    assert torch.equal(v.grad, torch.zeros_like(v)) and torch.equal(t.grad, torch.zeros_like(t))
    if bt:  # values are checked where there are some
        with pytest.raises(ValueError, match="text_lengths"):
            hier_align(v, t, pooling=pooling, text_lengths=torch.full((bt,), 7))
    with pytest.raises(ValueError, match="image_lengths"):
        hier_align(v, t, pooling=pooling, image_lengths=torch.full((bi + 1,), 1))


def test_largest_lambda_is_accepted_and_finite():
    v, t = _inputs()
    out = hier_align(v, t, pooling="scan", lambda_softmax=1e4, backend="torch")
    assert torch.isfinite(out).all()


def test_lengths_on_another_device_are_moved():
    """CPU lengths serve tokens on any device; here lengths on the tokens' device and as
    int32 give the same scores."""
    v, t = _inputs()
    lengths = torch.tensor([5, 2, 3])
    a = hier_align(v, t, image_lengths=lengths, backend="torch")
    b = hier_align(v, t, image_lengths=lengths.int(), backend="torch")
    assert torch.equal(a, b)
    if torch.cuda.is_available():
        gpu = hier_align(v.cuda(), t.cuda(), image_lengths=lengths, backend="torch")
        torch.testing.assert_close(gpu.cpu(), a)


@pytest.mark.parametrize("pooling", ["max", "scan"])
def test_non_contiguous_inputs(pooling):
    v, t = _inputs(d=16)
    v_nc = v.transpose(1, 2).contiguous().transpose(1, 2)[:, :, ::2]
    t_nc = t[:, :, ::2]
    assert not v_nc.is_contiguous() and not t_nc.is_contiguous()
    out = hier_align(v_nc, t_nc, pooling=pooling, backend="torch")
    ref = hier_align(v_nc.contiguous(), t_nc.contiguous(), pooling=pooling, backend="torch")
    assert torch.equal(out, ref)


def test_lengths_forms_agree():
    """One tensor for all levels == the same tensor per level; None == full lengths."""
    case = make_case(1, 3, 4, [(6, 5, 8), (6, 5, 4)])
    images = [x.float() for x in case.images]
    texts = [torch.nan_to_num(x.float()) for x in case.texts]
    vl = case.image_lengths[0]
    shared = hier_align(
        [torch.nan_to_num(x) for x in images], texts, image_lengths=vl, backend="torch"
    )
    per_level = hier_align(
        [torch.nan_to_num(x) for x in images],
        texts,
        image_lengths=[vl, vl],
        text_lengths=[None, None],
        backend="torch",
    )
    assert torch.equal(shared, per_level)


def test_levels_and_weights_sum():
    case = make_case(2, 3, 4, [(6, 5, 8), (3, 7, 5)])
    images = [x.float() for x in case.images]
    texts = [x.float() for x in case.texts]
    lengths = dict(image_lengths=case.image_lengths, text_lengths=case.text_lengths)
    both = hier_align(images, texts, weights=[0.5, 2.0], backend="torch", **lengths)
    first, second = (
        hier_align(
            images[level],
            texts[level],
            image_lengths=case.image_lengths[level],
            text_lengths=case.text_lengths[level],
            backend="torch",
        )
        for level in range(2)
    )
    torch.testing.assert_close(both, 0.5 * first + 2.0 * second)


def test_float64_runs_on_torch_backend_and_gradchecks():
    case = make_case(4, 2, 3, [(3, 4, 5)])
    v = torch.nan_to_num(case.images[0]).requires_grad_(True)
    t = torch.nan_to_num(case.texts[0]).requires_grad_(True)
    for pooling in ("max", "scan"):

        def f(v, t, pooling=pooling):
            return hier_align(
                v,
                t,
                image_lengths=case.image_lengths[0],
                text_lengths=case.text_lengths[0],
                pooling=pooling,
                direction="both",
                backend="torch",
            )

        assert f(v, t).dtype == torch.float64
        assert torch.autograd.gradcheck(f, (v, t))


def test_default_is_max_t2i_mean():
    v, t = _inputs()
    ref = naive_hier_align(
        [v.double()],
        [t.double()],
        [torch.full((3,), 5)],
        [torch.full((4,), 6)],
        pooling="max",
        direction="t2i",
        reduce="mean",
    )
    assert rel_err(hier_align(v, t), ref) < 1e-6


def test_memory_budget_does_not_change_results():
    case = make_case(8, 9, 11, [(7, 6, 12)])
    kw = dict(
        image_lengths=case.image_lengths[0], text_lengths=case.text_lengths[0], backend="torch"
    )
    v, t = case.images[0].float(), case.texts[0].float()
    for pooling in ("max", "scan"):
        big = hier_align(v, t, pooling=pooling, **kw)
        tiny = hier_align(v, t, pooling=pooling, memory_budget=1, **kw)
        torch.testing.assert_close(big, tiny, rtol=1e-6, atol=1e-6)
