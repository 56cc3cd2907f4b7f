"""The fused CPU scan kernel (csrc/cpu/scan_align.cpp) against the float64 naive reference.

Kernel-specific coverage beyond test_pooling_vs_reference.py: every direction x reduce x lambda,
both ways of getting |c|^2 (the Gram identity when the attended side is short, the formed
context when D is the smaller side; the forward's halved Gram matrices of long items), several
tiles and blocks per call (so that gradient rows of one image or caption are accumulated by
different tiles and threads), odd D, one-token items, B = 1, NaN padding, thread-count
independence and bad lengths.
"""

from __future__ import annotations

import pytest
import torch

from alignment_cases import (
    SETTINGS,
    Case,
    check_against_reference,
    cpu_backends,
    make_case,
    rel_err,
)
from hatkernels import hier_align
from hatkernels.reference import naive_align

pytestmark = pytest.mark.skipif(
    "cpu" not in cpu_backends(), reason="hatkernels._C_cpu is not built"
)



def _check(case, direction, reduce, lam=9.0):
    check_against_reference(
        case, "cpu", torch.float32, pooling="scan", direction=direction, reduce=reduce,
        lambda_softmax=lam,
    )


@pytest.mark.parametrize("lam", [4.0, 9.0, 20.0, 60.0])
@pytest.mark.parametrize("reduce", ["mean", "sum"])
@pytest.mark.parametrize("direction", sorted({d for d, _ in SETTINGS}))
def test_modes_gram_path(direction, reduce, lam):
    # D = 13 pads to 16 >= every padded length: |c|^2 through the Gram matrices.
    _check(make_case(1, 5, 7, [(9, 11, 13)]), direction, reduce, lam)


@pytest.mark.parametrize("lam", [9.0, 60.0])
@pytest.mark.parametrize("direction", ["i2t", "t2i", "both"])
def test_rows_and_lanes_layouts(direction, lam):
    """The forward pools a pair with its attending tokens as rows or as vector lanes,
    whichever is estimated cheaper: these lengths take both layouts in each direction, with
    one to five lane vectors and whole and halved Gram matrices."""
    _check(make_case(21, 8, 10, [(80, 40, 64)]), direction, "mean", lam)
    _check(make_case(22, 8, 10, [(40, 100, 48)]), direction, "sum", lam)


@pytest.mark.parametrize("lam", [4.0, 9.0, 60.0])
@pytest.mark.parametrize("reduce", ["mean", "sum"])
@pytest.mark.parametrize("direction", sorted({d for d, _ in SETTINGS}))
def test_half_gram_path(direction, reduce, lam):
    # D = 64 >= the padded lengths 64 and 48: Gram matrices, which the forward keeps as their
    # lower triangles for the items padded to 48 or more, and whole for the shorter ones.
    _check(make_case(3, 5, 8, [(49, 40, 64)]), direction, reduce, lam)
    _check(make_case(4, 6, 5, [(36, 33, 60)], normalise=False), direction, reduce, lam)


@pytest.mark.parametrize("normalise", [True, False], ids=["unit", "raw"])
@pytest.mark.parametrize("direction", sorted({d for d, _ in SETTINGS}))
def test_context_path(direction, normalise):
    # D = 3 pads to 16 < the padded lengths 48 and 32: the contexts c are formed.
    _check(make_case(2, 4, 6, [(40, 20, 3)], normalise=normalise), direction, "mean")


def _one_token_case(seed, d):
    case = make_case(seed, 3, 4, [(5, 6, d)], normalise=False)
    case.image_lengths[0][1] = 1  # a one-token image and a one-word caption
    case.images[0][1, 1:] = float("nan")
    case.text_lengths[0][0] = 1
    case.texts[0][0, 1:] = float("nan")
    return case


@pytest.mark.parametrize("d", [3, 13, 37])
@pytest.mark.parametrize("direction", sorted({d for d, _ in SETTINGS}))
def test_odd_dims_and_one_token_items(direction, d):
    _check(_one_token_case(3 + d, d), direction, "sum", 20.0)


@pytest.mark.parametrize("direction", sorted({d for d, _ in SETTINGS}))
def test_d1(direction):
    # At D = 1 every q is +-1, so the exact gradients are 0 and a float32 run can only show
    # rounding noise from cancelling terms: scores to 1e-5, gradients small in absolute terms.
    case = _one_token_case(4, 1)
    v, t = case.images[0].float().requires_grad_(True), case.texts[0].float().requires_grad_(True)
    kwargs = dict(pooling="scan", direction=direction, reduce="sum", lambda_softmax=20.0)
    lengths = dict(image_lengths=case.image_lengths[0], text_lengths=case.text_lengths[0])
    ref = naive_align(case.images[0], case.texts[0], *lengths.values(), **kwargs)
    out = hier_align(v, t, **lengths, backend="cpu", **kwargs)
    assert rel_err(out, ref) <= 1e-5
    cotangent = torch.randn(out.shape, generator=torch.Generator().manual_seed(7))
    for g, x in zip(torch.autograd.grad(out, (v, t), cotangent), (v, t)):
        assert bool((g[x.isnan()] == 0).all())
        assert float(g.norm()) <= 1e-5 * float(cotangent.norm())


@pytest.mark.parametrize("direction", ["t2i", "i2t"])
def test_one_row_normalisation_is_exact(direction):
    """One-word captions in t2i (one-token images in i2t) normalise a single row, whose
    derivative eps / (|a| + eps)^2 is tiny. Formed as the difference of two large terms it
    left their rounding error: seed 153065 gave 2.2e-4 in t2i, 7x the naive float32 error.
    Now it must meet the plain tolerance."""
    case = make_case(153065, 1, 1, [(7, 1, 4)], normalise=False)
    if direction == "i2t":  # the same case with the sides swapped: a one-token image
        case = Case(case.texts, case.images, case.text_lengths, case.image_lengths)
    check_against_reference(case, "cpu", torch.float32, pooling="scan", direction=direction,
                            reduce="mean", naive_bar=False)


@pytest.mark.parametrize("direction", sorted({d for d, _ in SETTINGS}))
def test_single_pair(direction):
    _check(make_case(4, 1, 1, [(7, 5, 37)]), direction, "mean", 4.0)


@pytest.mark.parametrize("direction", sorted({d for d, _ in SETTINGS}))
def test_many_tiles(direction):
    # 12 x 49 image tokens and 40 captions of up to 32 words: several image blocks x caption
    # blocks, so both gradients are accumulated across tiles (and threads).
    case = make_case(5, 12, 40, [(49, 32, 8)])
    case.image_lengths[0][:] = 49
    case.images[0] = torch.nan_to_num(case.images[0], nan=0.5)
    _check(case, direction, "sum")


def test_thread_count_does_not_change_scores():
    case = make_case(6, 12, 40, [(49, 32, 16)])
    args = (case.images[0].float(), case.texts[0].float())
    kwargs = dict(
        image_lengths=case.image_lengths[0], text_lengths=case.text_lengths[0],
        pooling="scan", direction="both", backend="cpu",
    )
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one = hier_align(*args, **kwargs)
        torch.set_num_threads(2)
        two = hier_align(*args, **kwargs)
    finally:
        torch.set_num_threads(threads)
    assert torch.equal(one, two)


@pytest.mark.parametrize("bad", [0, 6])
def test_bad_lengths_raise(bad):
    from hatkernels import _C_cpu

    v, t = torch.randn(2, 5, 4), torch.randn(3, 4, 4)
    lengths = torch.tensor([bad, 5])
    with pytest.raises(ValueError, match="image_lengths"):
        _C_cpu.scan_align_forward(v, t, lengths, torch.tensor([1, 2, 4]), 1, True, 9.0)
    with pytest.raises(ValueError, match="image_lengths"):
        _C_cpu.scan_align_backward(
            torch.ones(2, 3), v, t, lengths, torch.tensor([1, 2, 4]), 1, True, 9.0
        )
