"""The ``triton`` backend's own checks: its tiling paths (straddling items, several row tiles,
winner chunks, shape limits reported to dispatch), every mode against the float64 reference, and its
helpers. On CPU it runs under Triton's interpreter (``TRITON_INTERPRET=1``, as CI sets it):
tiny shapes only, and the interpreter's tiles are 16 wide so that small inputs cross them."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import hatkernels
from alignment_cases import INTERPRETING, TOLERANCE, check_against_reference, make_case
from hatkernels import hier_align

ROOT = Path(__file__).parents[2]
ON_GPU = torch.cuda.is_available() and not INTERPRETING
needs_kernels = pytest.mark.skipif(
    not (INTERPRETING or ON_GPU), reason="needs a CUDA GPU or TRITON_INTERPRET=1"
)
DEVICE = "cuda" if ON_GPU else "cpu"
MODES = [(p, d, r) for p in ("max", "scan") for d in ("t2i", "i2t", "both")
         for r in ("mean", "sum")]


def _on_device(case):
    for side in (case.images, case.texts, case.image_lengths, case.text_lengths):
        side[:] = [x.to(DEVICE) for x in side]
    return case


@needs_kernels
@pytest.mark.parametrize("pooling,direction,reduce", MODES)
def test_every_mode_float32(pooling, direction, reduce):
    """Two levels: 40 image tokens (several 16-row tiles, items straddling tiles) at odd
    D = 13, and 9 tokens (one tile) at D = 24; ragged, NaN padding; scores and gradients."""
    case = _on_device(make_case(11, 3, 5, [(40, 12, 13), (9, 5, 24)]))
    check_against_reference(case, "triton", torch.float32, pooling=pooling,
                            direction=direction, reduce=reduce, weights=[1.0, 0.5])


@needs_kernels
@pytest.mark.parametrize("pooling", ["max", "scan"])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "f16"])
def test_low_precision(pooling, dtype):
    case = _on_device(make_case(12, 4, 3, [(20, 7, 19)]))
    for direction, reduce in (("i2t", "mean"), ("both", "sum")):
        check_against_reference(case, "triton", dtype, pooling=pooling, direction=direction,
                                reduce=reduce)


@needs_kernels
@pytest.mark.parametrize("pooling", ["max", "scan"])
def test_one_token_items(pooling):
    case = _on_device(make_case(13, 3, 4, [(1, 1, 6), (3, 2, 7)]))
    for direction in ("t2i", "i2t", "both"):
        check_against_reference(case, "triton", torch.float32, pooling=pooling,
                                direction=direction, reduce="mean")


@needs_kernels
@pytest.mark.parametrize("pooling", ["max", "scan"])
def test_matches_torch_backend(pooling):
    case = make_case(14, 5, 6, [(18, 10, 16)])
    args = (case.images[0].float().to(DEVICE), case.texts[0].float().to(DEVICE))
    kwargs = dict(image_lengths=case.image_lengths[0].to(DEVICE),
                  text_lengths=case.text_lengths[0].to(DEVICE), pooling=pooling,
                  direction="both", reduce="mean")
    out = hier_align(*args, backend="triton", **kwargs)
    ref = hier_align(*args, backend="torch", **kwargs)
    assert float((out - ref).norm() / ref.norm()) <= TOLERANCE[torch.float32][0]


@needs_kernels
@pytest.mark.parametrize("pooling", ["max", "scan"])
def test_padding_never_read(pooling):
    """NaN, Inf or huge padding gives bit-identical scores and gradients, zero on padding."""
    case = make_case(15, 3, 4, [(20, 9, 11)])
    valid_v = torch.arange(20) < case.image_lengths[0][:, None]
    valid_t = torch.arange(9) < case.text_lengths[0][:, None]
    results = []
    for fill in (float("nan"), float("inf"), 1e30):
        v = torch.where(valid_v[..., None], case.images[0], fill).float().to(DEVICE)
        t = torch.where(valid_t[..., None], case.texts[0], fill).float().to(DEVICE)
        v.requires_grad_(True)
        t.requires_grad_(True)
        out = hier_align(v, t, image_lengths=case.image_lengths[0].to(DEVICE),
                         text_lengths=case.text_lengths[0].to(DEVICE), pooling=pooling,
                         direction="both", backend="triton")
        gv, gt = torch.autograd.grad(out.sum(), (v, t))
        assert bool((gv[~valid_v.to(DEVICE)] == 0).all())
        assert bool((gt[~valid_t.to(DEVICE)] == 0).all())
        results.append((out, gv, gt))
    for other in results[1:]:
        for a, b in zip(results[0], other):
            assert torch.equal(a, b)


@needs_kernels
def test_scan_one_row_normalisation_gradient():
    """One-token images (i2t) and one-word captions (t2i): the normalisation's two gradient
    terms cancel to eps / norm^2, which the backward uses directly (a case hypothesis found at
    1.1e-4 with the difference)."""
    case = _on_device(make_case(17932261, 3, 5, [(7, 1, 40), (1, 5, 4)]))
    for direction in ("t2i", "i2t", "both"):
        check_against_reference(case, "triton", torch.float32, pooling="scan",
                                direction=direction, reduce="mean")


@needs_kernels
def test_max_backward_in_winner_chunks(monkeypatch):
    """A winner budget of a few key items forces the chunked backward path."""
    import hatkernels.triton.max_align as max_align

    monkeypatch.setattr(max_align, "_WINNER_BYTES", 4 * 60)
    case = _on_device(make_case(16, 5, 4, [(7, 6, 9)]))
    for direction in ("t2i", "i2t"):
        check_against_reference(case, "triton", torch.float32, pooling="max",
                                direction=direction, reduce="sum")


@needs_kernels
def test_scan_backward_in_chunks_and_groups(monkeypatch):
    """A dS budget of two images and groups of two images force the chunked i2t backward."""
    import hatkernels.triton.scan_backward as scan_backward

    monkeypatch.setattr(scan_backward, "_DS_BYTES", 4 * 2 * 20 * 4 * 7)
    monkeypatch.setattr(scan_backward, "_IMAGES_PER_GROUP", 2)
    case = _on_device(make_case(18, 5, 4, [(20, 7, 10)]))
    check_against_reference(case, "triton", torch.float32, pooling="scan", direction="i2t",
                            reduce="mean")


@needs_kernels
def test_scan_t2i_forward_of_large_images_runs_without_gradients(monkeypatch):
    """The t2i backward's image limit rules triton out only when gradients are needed."""
    from hatkernels.triton import common

    monkeypatch.setattr(common, "MAX_T2I_TOKENS", 8)
    case = _on_device(make_case(19, 3, 4, [(12, 5, 6)]))
    check_against_reference(case, "triton", torch.float32, grads=False, pooling="scan",
                            direction="both", reduce="sum")
    v, t = case.images[0].float().requires_grad_(True), case.texts[0].float()
    with pytest.raises(ValueError, match="gradients are needed"):
        hier_align(v, t, image_lengths=case.image_lengths[0],
                   text_lengths=case.text_lengths[0], pooling="scan", direction="t2i",
                   backend="triton")


@needs_kernels
def test_max_ties_share_the_gradient(monkeypatch):
    """D = 1 unit tokens tie everywhere: the gradient is shared among the tied tokens, as
    torch.amax (the reference) and the other backends do (in chunks of two key items)."""
    import hatkernels.triton.max_align as max_align

    monkeypatch.setattr(max_align, "_WINNER_BYTES", 4 * 2 * 5 * 6)
    case = _on_device(make_case(20, 4, 5, [(6, 4, 1), (3, 5, 2)]))
    for direction in ("t2i", "i2t", "both"):
        check_against_reference(case, "triton", torch.float32, pooling="max",
                                direction=direction, reduce="mean")


@needs_kernels
def test_long_captions_go_to_another_backend():
    """Captions over MAX_WORDS tokens: forced triton raises with the reason; on a GPU "auto"
    takes the next backend, exactly."""
    from hatkernels.triton import common

    n = common.MAX_WORDS + 3
    case = _on_device(make_case(17, 2, 2, [(3, n, 4)]))
    with pytest.raises(ValueError, match=f"captions over {common.MAX_WORDS} tokens"):
        check_against_reference(case, "triton", torch.float32, pooling="scan")
    if ON_GPU:
        check_against_reference(case, "auto", torch.float32, pooling="scan", direction="i2t",
                                reduce="mean")


def test_items_per_tile_bounds_every_layout():
    """The one-hot width of a query tile bounds the items any run of packed tokens touches."""
    from hatkernels.triton.common import items_per_tile

    gen = torch.Generator().manual_seed(3)
    for block in (1, 2, 3, 16, 64):
        for _ in range(20):
            lengths = torch.randint(1, 6, (40,), generator=gen)
            owner = torch.repeat_interleave(torch.arange(40), lengths)
            bound = items_per_tile(block, int(lengths.min()))
            for start in range(0, owner.numel(), max(1, block // 2)):
                touched = owner[start : start + block].unique().numel()
                assert touched <= bound


def test_autotuning_sees_a_slice_of_large_calls_once(monkeypatch):
    from hatkernels.triton import common

    monkeypatch.setattr(common, "interpreting", lambda: False)
    monkeypatch.setattr(common, "_TUNED", set())
    monkeypatch.setattr(common, "TUNE_IMAGES", 2)
    calls = []

    def op(images, texts, image_lengths, text_lengths, direction):
        calls.append((images.shape[0], texts.shape[0], len(image_lengths), direction))

    images, texts = torch.zeros(5, 3, 4), torch.zeros(6, 2, 4)
    lengths = (torch.ones(5, dtype=torch.int64), torch.ones(6, dtype=torch.int64))
    for _ in range(2):
        common.tune_on_slice(op, images, texts, *lengths, "i2t")
    common.tune_on_slice(op, images, texts, *lengths, "t2i")
    common.tune_on_slice(op, images[:2], texts, lengths[0][:2], lengths[1], "both")
    assert calls == [(2, 6, 2, "i2t"), (2, 6, 2, "t2i")]


def test_tf32_only_when_opted_in(monkeypatch):
    from hatkernels.triton import common

    monkeypatch.setattr(common, "interpreting", lambda: False)
    matmul = torch.backends.cuda.matmul
    before = matmul.fp32_precision
    try:
        assert common.dot_precision(torch.float32) == ("tf32" if before == "tf32" else "ieee")
        matmul.allow_tf32 = False
        assert common.dot_precision(torch.float32) == "ieee"
        matmul.allow_tf32 = True
        assert common.dot_precision(torch.float32) == "tf32"
        assert common.dot_precision(torch.bfloat16) == "ieee"
    finally:
        matmul.fp32_precision = before


@needs_kernels
def test_listed_for_its_devices():
    if ON_GPU:
        assert hatkernels.available_backends("cuda")[0] == "triton"
    else:
        assert "triton" in hatkernels.available_backends("cpu")


def test_kernels_compile_for_sm90():
    """The real compiler (not the interpreter) builds every kernel for an H100, no GPU needed:
    the interpreter accepts code that compiled Triton rejects."""
    import triton

    if not (Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "ptxas").exists():
        pytest.skip("Triton's bundled ptxas is missing")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    done = subprocess.run(
        [sys.executable, "-m", "hatkernels.triton.compile_check", "--arch", "90",
         "--dtypes", "bf16", "--first-config-only"],
        capture_output=True, text=True, timeout=900, env=env, cwd=ROOT,
    )
    assert done.returncode == 0, done.stderr[-3000:]


def test_gpu_report_runs_its_help_without_a_gpu():
    done = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "gpu_report.py"), "--help"],
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert "--quick" in done.stdout and "--out" in done.stdout
