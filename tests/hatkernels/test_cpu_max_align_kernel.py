"""Edge cases of the fused C++ CPU max-pooling kernel (csrc/cpu/max_align.cpp).

Shapes are chosen to reach the kernel's own paths: several tiles along both sides (whole-item
groups of ~200-400 tokens), each backward ownership mode (images parallel / captions
parallel), partial register blocks and strips (odd token counts and D), one-token items,
all-zero output-gradient tiles (skipped), and bad lengths reaching the launcher directly.
"""

from __future__ import annotations

import ctypes
import os

import pytest
import torch

import hatkernels
from alignment_cases import SETTINGS, check_against_reference, make_case
from hatkernels import hier_align

pytestmark = pytest.mark.skipif(
    "cpu" not in hatkernels.available_backends("cpu"),
    reason="cpu backend unavailable: "
    + "; ".join(hatkernels.dispatch.not_supported_reasons(torch.device("cpu"), torch.float32, ())
                .get("cpu", [])),
)

# (n_images, n_texts, [(M, N, D)]): many tiles both ways; few images x many captions and the
# reverse (the backward switches which side owns its rows); small odd shapes.
SHAPES = {
    "tiles_both_ways": (11, 61, [(49, 32, 37)]),
    "one_image_many_captions": (1, 150, [(13, 30, 16)]),
    "many_images_one_caption": (150, 1, [(9, 5, 24)]),
    "odd_d": (7, 9, [(5, 6, 1), (4, 3, 3), (17, 19, 13)]),
}


@pytest.mark.parametrize("direction,reduce", SETTINGS)
@pytest.mark.parametrize("shape", list(SHAPES))
def test_against_float64_reference(shape, direction, reduce):
    n_images, n_texts, levels = SHAPES[shape]
    # Unit tokens at D = 1 are all +-1, which would build ties: raw Gaussians.
    case = make_case(3, n_images, n_texts, levels, normalise=shape != "odd_d")
    check_against_reference(case, "cpu", torch.float32, pooling="max", direction=direction,
                            reduce=reduce)


@pytest.mark.parametrize("direction", ["t2i", "i2t", "both"])
def test_one_token_items_and_single_pair(direction):
    for n_images, n_texts, levels in [(1, 1, [(1, 1, 3)]), (4, 5, [(1, 1, 37)])]:
        case = make_case(5, n_images, n_texts, levels, normalise=False)
        check_against_reference(case, "cpu", torch.float32, pooling="max", direction=direction,
                                reduce="sum")


@pytest.mark.parametrize("direction", ["t2i", "i2t", "both"])
def test_agrees_with_torch_backend(direction):
    case = make_case(9, 23, 47, [(49, 32, 64)])
    args = [x.float() for x in case.images], [x.float() for x in case.texts]
    kw = dict(image_lengths=case.image_lengths, text_lengths=case.text_lengths, pooling="max",
              direction=direction, reduce="mean")
    out = hier_align(*args, backend="cpu", **kw)
    ref = hier_align(*args, backend="torch", **kw)
    assert float((out - ref).norm() / ref.norm()) <= 1e-6


@pytest.mark.parametrize("direction", ["t2i", "i2t", "both"])
def test_exact_ties_share_the_gradient_like_amax(direction):
    """Unit tokens at D = 1 are +-1: every max is tied; grads split evenly, as torch's amax."""
    case = make_case(8, 4, 6, [(7, 9, 1)], normalise=True)
    check_against_reference(case, "cpu", torch.float32, pooling="max", direction=direction,
                            reduce="mean")


def _leaf(x: torch.Tensor) -> torch.Tensor:
    return x.float().requires_grad_(True)


@pytest.mark.parametrize("direction", ["t2i", "i2t", "both"])
def test_sparse_output_gradient_skips_tiles_exactly(direction):
    """A cotangent with one non-zero entry (most tiles skipped) gives the dense path's grads."""
    case = make_case(13, 17, 70, [(49, 32, 24)])
    v, t = _leaf(case.images[0]), _leaf(case.texts[0])
    kw = dict(image_lengths=case.image_lengths[0], text_lengths=case.text_lengths[0],
              pooling="max", direction=direction, reduce="mean")
    cot = torch.zeros(17, 70)
    cot[16, 3] = 2.0
    gv, gt = torch.autograd.grad(hier_align(v, t, backend="cpu", **kw), (v, t), cot)
    v2, t2 = _leaf(case.images[0]), _leaf(case.texts[0])
    rv, rt = torch.autograd.grad(hier_align(v2, t2, backend="torch", **kw), (v2, t2), cot)
    assert torch.allclose(gv, torch.nan_to_num(rv, nan=0.0), atol=1e-6)
    assert torch.allclose(gt, torch.nan_to_num(rt, nan=0.0), atol=1e-6)
    assert gv[:16].abs().sum() == 0 and gt[:3].abs().sum() == 0 and gt[4:].abs().sum() == 0


def test_inf_and_nan_padding_never_read():
    case = make_case(21, 6, 8, [(10, 9, 17)])
    v, t = case.images[0].float().clone(), case.texts[0].float().clone()
    v[torch.isnan(v)] = float("inf")
    t[torch.isnan(t)] = -float("inf")
    kw = dict(image_lengths=case.image_lengths[0], text_lengths=case.text_lengths[0],
              pooling="max", direction="both", reduce="sum")
    v, t = v.requires_grad_(), t.requires_grad_()
    out = hier_align(v, t, backend="cpu", **kw)
    gv, gt = torch.autograd.grad(out, (v, t), torch.ones_like(out))
    assert torch.isfinite(out).all() and torch.isfinite(gv).all() and torch.isfinite(gt).all()
    assert (gv[~torch.isfinite(v.detach())] == 0).all()
    assert (gt[~torch.isfinite(t.detach())] == 0).all()


@pytest.mark.parametrize("threads", [1, 2])
def test_thread_counts_agree(threads):
    case = make_case(17, 19, 41, [(49, 32, 40)])
    kw = dict(image_lengths=case.image_lengths[0], text_lengths=case.text_lengths[0],
              pooling="max", direction="both", reduce="mean")
    previous = torch.get_num_threads()
    try:
        torch.set_num_threads(threads)
        v, t = _leaf(case.images[0]), _leaf(case.texts[0])
        out = hier_align(v, t, backend="cpu", **kw)
        grads = torch.autograd.grad(out, (v, t), torch.ones_like(out))
    finally:
        torch.set_num_threads(previous)
    v, t = _leaf(case.images[0]), _leaf(case.texts[0])
    ref = hier_align(v, t, backend="cpu", **kw)
    ref_grads = torch.autograd.grad(ref, (v, t), torch.ones_like(ref))
    assert torch.equal(out, ref)
    for g, r in zip(grads, ref_grads):
        assert torch.allclose(g, r, rtol=1e-5, atol=1e-6)


def test_blas_thread_setting_is_restored():
    """The kernel pins MKL to one thread inside its parallel regions only: the calling
    thread's MKL thread count is the same after a call as before it."""
    lib = ctypes.CDLL(os.path.join(os.path.dirname(torch.__file__), "lib", "libtorch_cpu.so"))
    if not hasattr(lib, "MKL_Get_Max_Threads"):
        pytest.skip("torch is not linked with MKL")
    before = lib.MKL_Get_Max_Threads()
    case = make_case(1, 3, 4, [(5, 6, 8)])
    hier_align(case.images[0].float(), case.texts[0].float(),
               image_lengths=case.image_lengths[0], text_lengths=case.text_lengths[0],
               pooling="max", backend="cpu")
    assert lib.MKL_Get_Max_Threads() == before


@pytest.mark.parametrize("bad", [0, 6])
def test_launcher_rejects_bad_lengths(bad):
    from hatkernels import _C_cpu

    v, t = torch.randn(2, 5, 4), torch.randn(3, 6, 4)
    vl, tl = torch.tensor([5, bad]), torch.tensor([6, 1, 2])
    with pytest.raises(ValueError, match="image_lengths"):
        _C_cpu.max_align_forward(v, t, vl, tl, 0, True)
    with pytest.raises(ValueError, match="image_lengths"):
        _C_cpu.max_align_backward(torch.ones(2, 3), v, t, vl, tl, 0, True)
