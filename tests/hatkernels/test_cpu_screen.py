"""Exact screened max pooling of the cpu backend (int8 VNNI codes, float32 for the candidates).

On by default where the CPU has AVX-512 VNNI (HATKERNELS_CPU_SCREEN=0 turns it off); its scores
must equal the float32 kernel's up to the rounding of the winning dot product (same winners) on
random data and on data built to defeat the screening (exact and near ties, huge and tiny
norms), every direction and reduce, with ragged lengths and NaN padding; gradients (the
backward never screens) stay identical. Which tiles are screened depends only on the inputs,
so the screened forward is bit-identical at any thread count.
"""

from __future__ import annotations

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import hatkernels
from alignment_cases import SETTINGS, check_against_reference, make_case

ext = pytest.importorskip("hatkernels._C_cpu")


def _screening_available() -> bool:
    import os

    old = os.environ.get("HATKERNELS_CPU_SCREEN")
    os.environ["HATKERNELS_CPU_SCREEN"] = "1"
    try:
        return ext.cpu_screen().startswith("on")
    except ValueError:
        return False
    finally:
        if old is None:
            del os.environ["HATKERNELS_CPU_SCREEN"]
        else:
            os.environ["HATKERNELS_CPU_SCREEN"] = old


pytestmark = pytest.mark.skipif(
    not _screening_available(), reason="screening needs the avx512 level with AVX-512 VNNI"
)

DIRECTIONS = {"t2i": 0, "i2t": 1, "both": 2}


def _nan_pad(images: torch.Tensor, texts: torch.Tensor, il: torch.Tensor,
             tl: torch.Tensor) -> None:
    """NaN past every item's length: padding is never read, so it must not reach a score."""
    for x, lengths in ((images, il), (texts, tl)):
        for b, k in enumerate(lengths.tolist()):
            x[b, k:] = float("nan")


def _inputs(seed: int, bi: int, bt: int, m: int, n: int, d: int):
    g = torch.Generator().manual_seed(seed)
    images = torch.nn.functional.normalize(torch.randn(bi, m, d, generator=g), dim=-1)
    texts = torch.nn.functional.normalize(torch.randn(bt, n, d, generator=g), dim=-1)
    il = torch.randint(1, m + 1, (bi,), generator=g)
    tl = torch.randint(1, n + 1, (bt,), generator=g)
    _nan_pad(images, texts, il, tl)
    return images, texts, il, tl


def _both_paths(monkeypatch, images, texts, il, tl, direction: str, mean: bool):
    out = {}
    for flag in ("0", "1"):
        monkeypatch.setenv("HATKERNELS_CPU_SCREEN", flag)
        out[flag] = ext.max_align_forward(images, texts, il, tl, DIRECTIONS[direction], mean)
    return out["0"], out["1"]


def _near_tied(count: int, g: torch.Generator) -> torch.Tensor:
    """count images of 49 unit tokens, each image one random direction plus noise of 1e-4."""
    base = torch.nn.functional.normalize(torch.randn(count, 1, 96, generator=g), dim=-1)
    return torch.nn.functional.normalize(
        base + 1e-4 * torch.randn(count, 49, 96, generator=g), dim=-1)


def _assert_same_scores(plain: torch.Tensor, screened: torch.Tensor) -> None:
    assert torch.isfinite(screened).all()
    scale = float(plain.abs().max())
    torch.testing.assert_close(screened, plain, rtol=1e-6, atol=1e-6 * scale)


@pytest.mark.parametrize("direction,reduce", SETTINGS)
def test_random_data_equals_float32_path(monkeypatch, direction, reduce):
    # Several tiles both ways (groups of ~400 tokens), partial strips and blocks (odd sizes).
    images, texts, il, tl = _inputs(1, 23, 71, 49, 32, 131)
    plain, screened = _both_paths(monkeypatch, images, texts, il, tl, direction, reduce == "mean")
    _assert_same_scores(plain, screened)
    if direction != "both":
        # The screened path really ran: its candidates' dot products round differently from
        # the GEMM's, so some scores differ in their last bits.
        assert not torch.equal(plain, screened)


@settings(max_examples=25, deadline=None,
          suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture])
@given(seed=st.integers(0, 2**31 - 1), bi=st.integers(1, 30), bt=st.integers(1, 60),
       m=st.integers(1, 60), n=st.integers(1, 40), d=st.integers(96, 160),
       direction=st.sampled_from(["t2i", "i2t"]), scale=st.sampled_from([1e-3, 1.0, 50.0]))
def test_any_shape_equals_float32_path(monkeypatch, seed, bi, bt, m, n, d, direction, scale):
    """Ragged random shapes (NaN padding, image tokens of any scale, some repeated exactly):
    the screened scores equal the float32 kernel's within 1e-6 of |image token| |word| (the
    scale of every similarity; a score near zero from cancelling terms is only that accurate
    in float32, whichever order its dot product is summed in)."""
    images, texts, il, tl = _inputs(seed, bi, bt, m, n, d)
    images, texts = images * scale, texts.clone()
    if m > 2:
        images[:, 1] = images[:, 0]  # exact ties where both tokens are valid
    plain, screened = _both_paths(monkeypatch, images, texts, il, tl, direction, True)
    torch.testing.assert_close(screened, plain, rtol=1e-6, atol=1e-6 * scale)


@pytest.mark.parametrize("direction", ["t2i", "i2t"])
def test_ties_and_near_ties(monkeypatch, direction):
    """Images made of a few tokens repeated exactly or up to 1e-7: every max is (nearly) tied,
    which leaves many candidates (tiles fall back to float32)."""
    g = torch.Generator().manual_seed(2)
    base = torch.nn.functional.normalize(torch.randn(9, 3, 96, generator=g), dim=-1)
    images = base.repeat(1, 16, 1)
    images[:, 24:] += 1e-7 * torch.randn(9, 24, 96, generator=g)
    texts = torch.nn.functional.normalize(torch.randn(30, 20, 96, generator=g), dim=-1)
    il = torch.full((9,), 48)
    tl = torch.randint(1, 21, (30,), generator=g)
    plain, screened = _both_paths(monkeypatch, images, texts, il, tl, direction, True)
    _assert_same_scores(plain, screened)


@pytest.mark.parametrize("direction", ["t2i", "i2t"])
def test_huge_and_tiny_norms(monkeypatch, direction):
    """Tokens scaled by 1e18 (their bound would overflow: those tiles fall back) and 1e-20
    (codes of tiny scales) among unit tokens."""
    images, texts, il, tl = _inputs(3, 17, 40, 30, 24, 100)
    images[2, :5] *= 1e18
    images[5] *= 1e-20
    texts[7, :3] *= 1e-20
    texts[11, :2] *= 1e5
    plain, screened = _both_paths(monkeypatch, images, texts, il, tl, direction, False)
    _assert_same_scores(plain, screened)


@pytest.mark.parametrize("direction", ["t2i", "i2t"])
def test_wide_dynamic_range_within_tokens(monkeypatch, direction):
    """One huge coordinate per token makes the int8 codes of the rest zero: screening finds
    few tokens to drop, and the result must still be exact."""
    images, texts, il, tl = _inputs(4, 12, 50, 20, 16, 97)
    images[..., 0] = 1e4
    texts[..., 0] = torch.where(torch.isnan(texts[..., 0]), texts[..., 0], 1.0)
    plain, screened = _both_paths(monkeypatch, images, texts, il, tl, direction, True)
    _assert_same_scores(plain, screened)


@pytest.mark.parametrize("direction", ["t2i", "i2t"])
def test_screened_forward_is_deterministic_at_any_thread_count(monkeypatch, direction):
    # Many tiles (caption groups of ~384 words): the probe tiles and the rest run on several
    # threads.
    images, texts, il, tl = _inputs(5, 40, 300, 49, 32, 96)
    monkeypatch.setenv("HATKERNELS_CPU_SCREEN", "1")
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one = ext.max_align_forward(images, texts, il, tl, DIRECTIONS[direction], True)
        torch.set_num_threads(2)
        two = ext.max_align_forward(images, texts, il, tl, DIRECTIONS[direction], True)
    finally:
        torch.set_num_threads(threads)
    assert torch.equal(one, two)
    again = ext.max_align_forward(images, texts, il, tl, DIRECTIONS[direction], True)
    assert torch.equal(two, again)


@pytest.mark.parametrize("direction", ["t2i", "i2t"])
def test_amx_and_vnni_gemms_give_identical_scores(monkeypatch, direction):
    """The int8 GEMM on AMX tiles (where usable) and on AVX-512 VNNI sums the same integers,
    so the screened scores are bit-identical (odd d: codes padded to whole tile rows)."""
    images, texts, il, tl = _inputs(10, 19, 83, 49, 32, 107)
    out = {}
    for flag in ("1", "vnni"):
        monkeypatch.setenv("HATKERNELS_CPU_SCREEN", flag)
        out[flag] = ext.max_align_forward(images, texts, il, tl, DIRECTIONS[direction], True)
    assert torch.equal(out["1"], out["vnni"])


def test_screening_is_the_default(monkeypatch):
    images, texts, il, tl = _inputs(8, 9, 30, 20, 12, 96)
    monkeypatch.setenv("HATKERNELS_CPU_SCREEN", "1")
    on = ext.max_align_forward(images, texts, il, tl, 0, True)
    monkeypatch.delenv("HATKERNELS_CPU_SCREEN")
    assert torch.equal(on, ext.max_align_forward(images, texts, il, tl, 0, True))


def test_data_that_defeats_screening_runs_the_float32_kernel(monkeypatch):
    """Every image one direction plus noise of 1e-4: nothing can be screened out, the probe
    tiles fall back and the whole call runs the float32 kernel (bit-identical to it)."""
    g = torch.Generator().manual_seed(9)
    images = _near_tied(24, g)
    texts = torch.nn.functional.normalize(torch.randn(200, 32, 96, generator=g), dim=-1)
    il = torch.full((24,), 49)
    tl = torch.randint(8, 33, (200,), generator=g)
    plain, screened = _both_paths(monkeypatch, images, texts, il, tl, "t2i", True)
    assert torch.equal(plain, screened)


def test_tiles_that_fall_back_among_screened_ones(monkeypatch):
    """The last 9 of 297 images are near-tied: no probe tile holds them (image groups of 400 or
    1,600 tokens alike), so the call keeps screening and only their tiles run the float32
    kernel, bit-identical to it; the other images' scores come from the screened path."""
    g = torch.Generator().manual_seed(12)
    images = torch.nn.functional.normalize(torch.randn(297, 49, 96, generator=g), dim=-1)
    images[288:] = _near_tied(9, g)
    texts = torch.nn.functional.normalize(torch.randn(20, 16, 96, generator=g), dim=-1)
    il = torch.full((297,), 49)
    tl = torch.randint(8, 17, (20,), generator=g)
    plain, screened = _both_paths(monkeypatch, images, texts, il, tl, "t2i", True)
    _assert_same_scores(plain, screened)
    assert torch.equal(screened[288:], plain[288:])
    assert not torch.equal(screened[:288], plain[:288])


def test_groups_that_straddle_row_blocks(monkeypatch):
    """Images of 10, 10, 10, 5 tokens, then 10, 10, 10, 8, ...: the second group of four
    starts 11 rows past a 12-row block and ends 1 row into one, so its int8 GEMM covers 22
    rows more than the group (the most it can), and its similarities must still fit."""
    g = torch.Generator().manual_seed(13)
    images = torch.nn.functional.normalize(torch.randn(16, 10, 128, generator=g), dim=-1)
    texts = torch.nn.functional.normalize(torch.randn(30, 12, 128, generator=g), dim=-1)
    il = torch.tensor([10, 10, 10, 5, 10, 10, 10, 8] * 2)
    tl = torch.randint(1, 13, (30,), generator=g)
    _nan_pad(images, texts, il, tl)
    plain, screened = _both_paths(monkeypatch, images, texts, il, tl, "t2i", True)
    _assert_same_scores(plain, screened)


@pytest.mark.parametrize("direction,reduce", [("t2i", "mean"), ("i2t", "sum")])
def test_against_float64_reference_with_gradients(monkeypatch, direction, reduce):
    monkeypatch.setenv("HATKERNELS_CPU_SCREEN", "1")
    case = make_case(6, 13, 41, [(49, 32, 64), (7, 9, 33)])
    check_against_reference(case, "cpu", torch.float32, pooling="max", direction=direction,
                            reduce=reduce)


def test_small_feature_sizes_run_the_float32_kernel(monkeypatch):
    """Below 96 features screening costs more than it saves: such calls are not screened, so
    their scores are the float32 kernel's bit for bit."""
    images, texts, il, tl = _inputs(11, 15, 60, 49, 32, 95)
    plain, screened = _both_paths(monkeypatch, images, texts, il, tl, "t2i", True)
    assert torch.equal(plain, screened)


def test_bad_switch_value_is_named(monkeypatch):
    monkeypatch.setenv("HATKERNELS_CPU_SCREEN", "yes")
    images, texts, il, tl = _inputs(7, 2, 2, 3, 3, 8)
    with pytest.raises(ValueError, match="^HATKERNELS_CPU_SCREEN"):
        ext.max_align_forward(images, texts, il, tl, 0, True)


def test_info_reports_screening(monkeypatch):
    from hatkernels.info import cpu_isa_report

    monkeypatch.delenv("HATKERNELS_CPU_SCREEN", raising=False)
    assert "max screening on" in cpu_isa_report()
    monkeypatch.setenv("HATKERNELS_CPU_SCREEN", "vnni")
    assert "VNNI" in cpu_isa_report()
    monkeypatch.setenv("HATKERNELS_CPU_SCREEN", "0")
    assert "max screening off" in cpu_isa_report()
    assert hatkernels.available_backends("cpu")
