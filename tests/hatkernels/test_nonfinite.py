"""The rule for non-finite tokens, on every backend that runs here: a NaN or Inf in a valid
token makes exactly the scores of its item's pairs NaN, and the gradients of the valid tokens
of both items of each such pair with a nonzero upstream gradient; every other score and
gradient is bit-identical to the run where that token holds its finite value. Also: an
all-zero valid word gets finite scan gradients, and the Triton scan kernel does not leak a
NaN caption into the other captions of its block."""

from __future__ import annotations

import pytest
import torch

from alignment_cases import (
    INTERPRETING,
    TOLERANCE,
    backend_params,
    make_case,
    rel_err,
    zero_padding,
)
from hatkernels import hier_align
from hatkernels.reference import naive_align

INF = float("inf")
# (value, side holding it, levels): single- and two-level calls, NaN, +Inf and -Inf, each side.
COMBOS = [
    (float("nan"), "images", 1),
    (INF, "texts", 2),
    (-INF, "images", 2),
    (float("nan"), "texts", 1),
]
BAD_ITEM, SPARED = 1, 2  # the item holding the bad token; its partner with zero upstream grad


def _case(levels: int):
    case = make_case(21, 4, 5, [(6, 7, 10), (3, 4, 6)][:levels])
    images = [torch.nan_to_num(x).float() for x in case.images]
    texts = [torch.nan_to_num(x).float() for x in case.texts]
    return images, texts, case.image_lengths, case.text_lengths


def _run(images, texts, image_lengths, text_lengths, cotangent, **kwargs):
    images = [x.clone().requires_grad_(True) for x in images]
    texts = [x.clone().requires_grad_(True) for x in texts]
    out = hier_align(images, texts, image_lengths=image_lengths, text_lengths=text_lengths,
                     **kwargs)  # fmt: skip
    return out.detach(), torch.autograd.grad(out, images + texts, cotangent)


def _same(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Bit-identical, NaN where the other is NaN."""
    return torch.equal(torch.isnan(a), torch.isnan(b)) and torch.equal(
        torch.nan_to_num(a), torch.nan_to_num(b)
    )


def _combos(backend: str):
    return COMBOS[:2] if backend == "triton" else COMBOS


@pytest.mark.parametrize("direction", ["t2i", "i2t", "both"])
@pytest.mark.parametrize("pooling", ["max", "scan"])
@pytest.mark.parametrize("backend", backend_params())
def test_nonfinite_token_poisons_exactly_its_pairs(backend, pooling, direction):
    kwargs = dict(pooling=pooling, direction=direction, reduce="mean", backend=backend)
    for value, side, levels in _combos(backend):
        images, texts, image_lengths, text_lengths = _case(levels)
        cotangent = torch.randn(4, 5, generator=torch.Generator().manual_seed(3))
        if side == "images":
            cotangent[BAD_ITEM, SPARED] = 0
        else:
            cotangent[SPARED, BAD_ITEM] = 0
        ok, ok_grads = _run(images, texts, image_lengths, text_lengths, cotangent, **kwargs)
        bad_images, bad_texts = [x.clone() for x in images], [x.clone() for x in texts]
        (bad_images if side == "images" else bad_texts)[0][BAD_ITEM, 0, 3] = value
        out, grads = _run(bad_images, bad_texts, image_lengths, text_lengths, cotangent,
                          **kwargs)  # fmt: skip

        pairs = torch.zeros(4, 5, dtype=torch.bool)
        if side == "images":
            pairs[BAD_ITEM] = True
        else:
            pairs[:, BAD_ITEM] = True
        assert torch.isnan(out[pairs]).all(), (value, side)
        assert torch.equal(out[~pairs], ok[~pairs]), (value, side)

        hit = pairs & (cotangent != 0)
        poisoned = [hit.any(1), hit.any(0)]  # images, captions with a NaN gradient
        sides = [(grads[:levels], ok_grads[:levels], image_lengths, poisoned[0]),
                 (grads[levels:], ok_grads[levels:], text_lengths, poisoned[1])]  # fmt: skip
        for g_levels, ok_levels, lengths, items in sides:
            for level, (g, g_ok) in enumerate(zip(g_levels, ok_levels)):
                valid = torch.arange(g.shape[1]) < lengths[level][:, None]
                nan_rows = items[:, None] & valid if level == 0 else torch.zeros_like(valid)
                assert torch.isnan(g[nan_rows]).all(), (value, side, level)
                assert _same(g[~nan_rows], g_ok[~nan_rows]), (value, side, level)
                assert not torch.isnan(g_ok).any()


@pytest.mark.parametrize("pooling", ["max", "scan"])
@pytest.mark.parametrize("backend", backend_params())
def test_zero_upstream_gradient_keeps_every_gradient_finite(backend, pooling):
    """No pair of the bad item gets a gradient: its scores are NaN, no gradient is."""
    images, texts, image_lengths, text_lengths = _case(1)
    cotangent = torch.randn(4, 5, generator=torch.Generator().manual_seed(4))
    cotangent[:, BAD_ITEM] = 0
    kwargs = dict(pooling=pooling, direction="both", reduce="sum", backend=backend)
    ok, ok_grads = _run(images, texts, image_lengths, text_lengths, cotangent, **kwargs)
    bad_texts = [texts[0].clone()]
    bad_texts[0][BAD_ITEM, 0, 0] = float("nan")
    out, grads = _run(images, bad_texts, image_lengths, text_lengths, cotangent, **kwargs)
    assert torch.isnan(out[:, BAD_ITEM]).all()
    for g, g_ok in zip(grads, ok_grads):
        assert torch.isfinite(g).all()
        assert torch.equal(g, g_ok)


@pytest.mark.parametrize("direction", ["t2i", "i2t", "both"])
@pytest.mark.parametrize("backend", backend_params())
def test_all_zero_word_has_finite_scan_gradients(backend, direction):
    """A valid word of zeros: its norms vanish and the gradient takes the eps-guarded branch.
    Every gradient is finite; scores and every other token's gradient match the float64
    reference. (The zero word's own i2t gradient is 1/eps times a sum that cancels, which
    float32 cannot resolve: it is checked finite only.)"""
    case = make_case(22, 3, 4, [(6, 5, 8)])
    images, texts = case.images[0].float(), case.texts[0].float()
    texts[1, 0] = 0.0
    lengths = case.image_lengths[0], case.text_lengths[0]
    kwargs = dict(pooling="scan", direction=direction, reduce="mean")
    cotangent = torch.randn(3, 4, generator=torch.Generator().manual_seed(5))
    ref_in = [images.double().requires_grad_(True), texts.double().requires_grad_(True)]
    ref = naive_align(*ref_in, *lengths, **kwargs)
    ref_grads = [zero_padding(g) for g in torch.autograd.grad(ref, ref_in, cotangent.double())]
    test_in = [images.clone().requires_grad_(True), texts.clone().requires_grad_(True)]
    out = hier_align(*test_in, image_lengths=lengths[0], text_lengths=lengths[1],
                     backend=backend, **kwargs)  # fmt: skip
    grads = torch.autograd.grad(out, test_in, cotangent)
    assert rel_err(out, ref) <= TOLERANCE[torch.float32][0]
    assert all(torch.isfinite(g).all() for g in grads)
    grads[1][1, 0] = ref_grads[1][1, 0] = 0  # the zero word's own row
    for g, r in zip(grads, ref_grads):
        assert rel_err(g, r, floor=1e-3) <= TOLERANCE[torch.float32][1]


@pytest.mark.skipif(not INTERPRETING, reason="runs the Triton kernel on CPU: TRITON_INTERPRET=1")
def test_triton_scan_kernel_keeps_a_nan_caption_to_itself():
    """The kernel itself (no op layer): one caption's NaN token leaves the other captions of
    its block bit-identical."""
    from hatkernels.triton.scan_align import scan_align_forward

    images, texts, image_lengths, text_lengths = _case(1)
    ok = scan_align_forward(images[0], texts[0], image_lengths[0], text_lengths[0], "i2t",
                            "mean", 9.0)  # fmt: skip
    bad = texts[0].clone()
    bad[BAD_ITEM, 0, 2] = float("nan")
    out = scan_align_forward(images[0], bad, image_lengths[0], text_lengths[0], "i2t", "mean",
                             9.0)  # fmt: skip
    others = torch.arange(5) != BAD_ITEM
    assert torch.isnan(out[:, BAD_ITEM]).all()
    assert torch.equal(out[:, others], ok[:, others])


@pytest.mark.parametrize("backend", backend_params())
def test_finite_token_whose_row_sum_overflows_is_not_poisoned(backend):
    """A token of huge but finite values (its float32 sum over D overflows) is finite: its
    pairs are scored, not set to NaN."""
    images = torch.full((2, 3, 4), 3e38)
    texts = torch.rand(3, 2, 4, generator=torch.Generator().manual_seed(6)) * 1e-30
    out = hier_align(images, texts, backend=backend)
    assert torch.isfinite(out).all()
    torch.testing.assert_close(out, hier_align(images.double(), texts.double(),
                                               backend="torch").float())  # fmt: skip
