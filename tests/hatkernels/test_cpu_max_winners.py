"""The cpu backend's max-pooling backward from saved winners.

With gradients, the forward keeps every query token's winner when they fit ``memory_budget``,
and the backward gathers and scatters from them (tied query tokens from their tile's
recomputed similarities); otherwise (a tiny budget) it recomputes every tile's similarities.
Both paths must give the float64 reference's gradients and the same gradients up to the order
of float32 additions, exact ties shared equally either way; the winners path gives the same
bits at any thread count.
"""

from __future__ import annotations

import pytest
import torch

import hatkernels
from alignment_cases import SETTINGS, check_against_reference, make_case
from hatkernels import hier_align
from hatkernels.ops import max_align
from hatkernels.reference import naive_align

pytestmark = pytest.mark.skipif(
    "cpu" not in hatkernels.available_backends("cpu"), reason="hatkernels._C_cpu is not built"
)

WINNERS, RECOMPUTE = 1 << 30, 1  # memory budgets (bytes): room for the winners, or none
SHAPES = {
    "tiles_both_ways": (11, 61, (49, 32, 37)),
    "odd_sizes": (7, 9, (17, 19, 13)),
    "one_token_items": (4, 5, (1, 1, 5)),
}


@pytest.fixture
def backward_calls(monkeypatch) -> list[bool]:
    """Whether each max backward call of the cpu extension got winners."""
    ext = hatkernels.backends.cpu.CpuBackend.extension
    calls: list[bool] = []
    original = ext.max_align_backward

    def spy(*args):
        calls.append(len(args) == 8)
        return original(*args)

    monkeypatch.setattr(ext, "max_align_backward", spy)
    return calls


def _run(v, t, vl, tl, direction, reduce, budget, cot=None):
    """Scores, what the forward kept, and both gradients (cotangent ``cot``, else random)."""
    v, t = v.detach().clone().requires_grad_(), t.detach().clone().requires_grad_()
    scores, saved = max_align(v, t, vl, tl, direction, reduce, "cpu", budget, True)
    if cot is None:
        cot = torch.randn(scores.shape, generator=torch.Generator().manual_seed(5))
    gv, gt = torch.autograd.grad(scores, (v, t), cot)
    return scores.detach(), saved, gv, gt


def _assert_same_results(a, b):
    """Scores of two runs bit-identical, gradients equal up to the order of float32 additions
    (NaN where the other has NaN)."""
    torch.testing.assert_close(a[0], b[0], rtol=0, atol=0, equal_nan=True)
    for x, y in zip(a[2:], b[2:]):
        scale = float(y.nan_to_num().abs().max())
        torch.testing.assert_close(x, y, rtol=1e-5, atol=1e-6 * scale, equal_nan=True)


def _inputs(case):
    return case.images[0].float(), case.texts[0].float(), case.image_lengths[0], \
        case.text_lengths[0]


@pytest.mark.parametrize("direction,reduce", SETTINGS)
@pytest.mark.parametrize("shape", list(SHAPES))
def test_winners_give_the_reference_gradients(shape, direction, reduce, backward_calls):
    n_images, n_texts, level = SHAPES[shape]
    case = make_case(41, n_images, n_texts, [level])
    check_against_reference(case, "cpu", torch.float32, pooling="max", direction=direction,
                            reduce=reduce)  # fmt: skip
    assert backward_calls == [True]


@pytest.mark.parametrize("direction,reduce", SETTINGS)
@pytest.mark.parametrize("shape", list(SHAPES))
def test_winners_and_recompute_agree(shape, direction, reduce):
    n_images, n_texts, level = SHAPES[shape]
    v, t, vl, tl = _inputs(make_case(43, n_images, n_texts, [level]))
    kept = _run(v, t, vl, tl, direction, reduce, WINNERS)
    recomputed = _run(v, t, vl, tl, direction, reduce, RECOMPUTE)
    assert kept[1].numel() > 0 and recomputed[1].numel() == 0
    _assert_same_results(kept, recomputed)
    with torch.no_grad():
        plain, nothing = max_align(v, t, vl, tl, direction, reduce, "cpu", WINNERS, False)
    assert nothing.numel() == 0 and torch.equal(plain, kept[0])


@pytest.mark.parametrize("direction", ["t2i", "i2t", "both"])
def test_winners_path_is_bit_identical_at_any_thread_count(direction):
    """Every gradient row is summed by one task in an order fixed by the inputs (blocks of
    about 700 rows of 1 KiB each way here, so the threads share several)."""
    v, t, vl, tl = _inputs(make_case(71, 60, 200, [(49, 32, 256)]))  # several blocks each way
    threads = torch.get_num_threads()
    try:
        runs = []
        for n in (1, 2, 3):
            torch.set_num_threads(n)
            runs.append(_run(v, t, vl, tl, direction, "mean", WINNERS))
    finally:
        torch.set_num_threads(threads)
    assert runs[0][1].numel() > 0 and runs[0][1][-1] == 0  # winners kept, none tied
    for other in runs[1:]:
        for x, y in zip(runs[0][2:], other[2:]):
            assert torch.equal(x, y)


@pytest.mark.parametrize("reduce", ["mean", "sum"])
def test_winners_path_over_many_blocks_matches_float64_from_the_same_winners(reduce):
    """Shapes that split both passes into several blocks each way (blocks of about 700 rows of
    1 KiB): the gradients equal a float64 gather/scatter from the very winners the forward
    kept, so the blocking loses and repeats no pair. (Random float32 data may hold a few exact
    ties; the pairs holding one get a zero output gradient here, so both sides skip them.)"""
    from hatkernels import _C_cpu

    v, t, vl, tl = _inputs(make_case(73, 40, 150, [(49, 32, 256)]))
    v, t = v.nan_to_num(), t.nan_to_num()
    g = torch.randn(40, 150, generator=torch.Generator().manual_seed(2))
    _, winners = _C_cpu.max_align_forward_winners(v, t, vl, tl, 0, reduce == "mean", 1 << 30)
    words = torch.arange(t.shape[1]) < tl[:, None]  # [Bt, n] valid words, packed in this order
    caption = torch.arange(150)[:, None].expand_as(words)[words]
    win = winners[:-1].view(40, -1).long()  # [Bi, words]: row within the image, or -1: tied
    tied = win < 0
    g[tied.nonzero()[:, 0], caption[tied.nonzero()[:, 1]]] = 0.0
    assert tied.float().mean() < 1e-3 and (g != 0).float().mean() > 0.99
    gv, gt = _C_cpu.max_align_backward(g, v, t, vl, tl, 0, reduce == "mean", winners)
    t_rows, win = t[words].double(), win.clamp(min=0)
    ref_v, ref_t = torch.zeros_like(v, dtype=torch.float64), torch.zeros_like(t_rows)
    for i in range(40):
        a = g[i, caption].double() / (tl[caption].double() if reduce == "mean" else 1.0)
        ref_t += a[:, None] * v[i].double()[win[i]]
        ref_v[i].index_add_(0, win[i], a[:, None] * t_rows)
    torch.testing.assert_close(gv.double(), ref_v, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(gt[words].double(), ref_t, rtol=1e-5, atol=1e-5)
    assert (gt[~words] == 0).all()


@pytest.mark.parametrize("direction", ["t2i", "i2t", "both"])
def test_winners_size_is_one_per_query_token_and_pair(direction):
    v, t, vl, tl = _inputs(make_case(47, 5, 7, [(6, 8, 4)]))
    saved = _run(v, t, vl, tl, direction, "sum", WINNERS)[1]
    t2i, i2t = 5 * int(tl.sum()), int(vl.sum()) * 7
    assert saved.dtype == torch.int32
    assert saved.numel() == {"t2i": t2i, "i2t": i2t, "both": t2i + i2t}[direction] + 1
    assert saved[-1] == 0  # no tie
    # One byte short of the winners: the forward keeps nothing.
    assert _run(v, t, vl, tl, direction, "sum", 4 * saved.numel() - 1)[1].numel() == 0


@pytest.mark.parametrize("direction", ["t2i", "i2t", "both"])
def test_exact_ties_are_shared_from_winners(direction):
    """Repeated tokens tie exactly in some pairs (their tiles' similarities are recomputed),
    not in others; every tie is shared equally, as torch's amax does."""
    case = make_case(53, 9, 40, [(12, 10, 16)])
    for x, lengths in ((case.images[0], case.image_lengths[0]),
                       (case.texts[0], case.text_lengths[0])):  # fmt: skip
        for b in range(0, x.shape[0], 2):
            if lengths[b] > 1:
                x[b, 1] = x[b, 0]
    check_against_reference(case, "cpu", torch.float32, pooling="max", direction=direction,
                            reduce="mean")  # fmt: skip
    v, t, vl, tl = _inputs(case)
    kept = _run(v, t, vl, tl, direction, "mean", WINNERS)
    assert (kept[1] < 0).any() and (kept[1] >= 0).any() and kept[1][-1] == 1
    _assert_same_results(kept, _run(v, t, vl, tl, direction, "mean", RECOMPUTE))


@pytest.mark.parametrize("direction", ["t2i", "i2t", "both"])
def test_every_max_tied(direction):
    """Tokens of one feature, all +-1: every query token's maximum is tied."""
    v, t, vl, tl = _inputs(make_case(8, 4, 6, [(7, 9, 1)]))
    v, t = v.sign().nan_to_num(), t.sign().nan_to_num()
    kept = _run(v, t, vl, tl, direction, "mean", WINNERS)
    _assert_same_results(kept, _run(v, t, vl, tl, direction, "mean", RECOMPUTE))
    v64, t64 = v.double().requires_grad_(), t.double().requires_grad_()
    cot = torch.randn(kept[0].shape, generator=torch.Generator().manual_seed(5))
    ref = naive_align(v64, t64, vl, tl, pooling="max", direction=direction, reduce="mean")
    for g, r in zip(kept[2:], torch.autograd.grad(ref, (v64, t64), cot.double())):
        torch.testing.assert_close(g.double(), r.nan_to_num(), rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("direction", ["t2i", "i2t", "both"])
def test_nan_in_valid_tokens_on_the_winners_path(direction):
    """The NaN rule holds: a NaN in image 2 and an Inf in caption 5 make their pairs NaN,
    and, where the upstream gradient is nonzero (pair (2, 5) only), their items' gradients."""
    v, t, vl, tl = _inputs(make_case(59, 6, 8, [(10, 9, 17)]))
    v[2, 0, 3] = float("nan")
    t[5, 0, 0] = float("inf")
    cot = torch.randn(6, 8, generator=torch.Generator().manual_seed(1))
    cot[2], cot[:, 5], cot[2, 5] = 0.0, 0.0, 1.0
    kept = _run(v, t, vl, tl, direction, "sum", WINNERS, cot)
    assert kept[1].numel() > 0
    _assert_same_results(kept, _run(v, t, vl, tl, direction, "sum", RECOMPUTE, cot))
    scores, _, gv, gt = kept
    bad = torch.zeros(6, 8, dtype=torch.bool)
    bad[2], bad[:, 5] = True, True
    assert scores[bad].isnan().all() and scores[~bad].isfinite().all()
    assert gv[2, : vl[2]].isnan().all() and gt[5, : tl[5]].isnan().all()
    others_v, others_t = [0, 1, 3, 4, 5], [0, 1, 2, 3, 4, 6, 7]
    assert gv[others_v].isfinite().all() and gt[others_t].isfinite().all()
    assert gv[others_v].abs().sum() > 0 and gt[others_t].abs().sum() > 0


def test_hier_align_keeps_winners_only_with_room_for_them(backward_calls):
    v, t, vl, tl = _inputs(make_case(61, 3, 4, [(5, 6, 8)]))
    v, t = v.requires_grad_(), t.requires_grad_()
    kw = dict(image_lengths=vl, text_lengths=tl, pooling="max", backend="cpu")
    hier_align(v, t, **kw).sum().backward()
    hier_align(v, t, memory_budget=RECOMPUTE, **kw).sum().backward()
    assert backward_calls == [True, False]


def test_backward_rejects_winners_of_other_inputs():
    from hatkernels import _C_cpu

    v, t = torch.randn(2, 5, 4), torch.randn(3, 6, 4)
    vl, tl = torch.tensor([5, 2]), torch.tensor([6, 1, 2])
    _, winners = _C_cpu.max_align_forward_winners(v, t, vl, tl, 0, True, 1 << 20)
    assert winners.numel() == 2 * 9 + 1
    with pytest.raises(RuntimeError, match="winners"):
        _C_cpu.max_align_backward(torch.ones(2, 3), v, t, vl, tl, 2, True, winners)
    with pytest.raises(RuntimeError, match="winners"):
        _C_cpu.max_align_backward(torch.ones(2, 3), v, t, vl, tl, 0, True, winners.long())


@pytest.mark.parametrize("direction", ["t2i", "i2t"])
def test_the_screened_forward_keeps_the_same_winners(direction, monkeypatch):
    """The screened forward (the default where the CPU has AVX-512 VNNI) writes winners too:
    its scores are those of the screened forward without gradients, bit for bit, and its
    gradients those of the float32 forward's winners (the same winners: random data has no
    near-ties at float32 rounding)."""
    v, t, vl, tl = _inputs(make_case(67, 13, 40, [(49, 32, 96)]))
    monkeypatch.setenv("HATKERNELS_CPU_SCREEN", "0")
    float32 = _run(v, t, vl, tl, direction, "mean", WINNERS)
    monkeypatch.setenv("HATKERNELS_CPU_SCREEN", "1")
    kept = _run(v, t, vl, tl, direction, "mean", WINNERS)
    assert kept[1].numel() > 0
    with torch.no_grad():
        plain, _ = max_align(v, t, vl, tl, direction, "mean", "cpu", WINNERS, False)
    assert torch.equal(plain, kept[0])
    torch.testing.assert_close(kept[0], float32[0], rtol=1e-6, atol=1e-7)
    assert torch.equal(kept[1], float32[1])
    for got, want in zip(kept[2:], float32[2:]):
        assert torch.equal(got, want)
