"""The ``cuda`` backend (csrc/cuda): build, dispatch and error checks that need no GPU, and,
where a GPU is present, its scores and gradients against the float64 naive reference for
every mode, ragged lengths, NaN padding, odd feature sizes and both scratch paths."""

from __future__ import annotations

import importlib
import os
import shutil
import subprocess
import sys

import pytest
import torch

import hatkernels
from alignment_cases import (
    SETTINGS,
    TOLERANCE,
    make_case,
    padding_fill_runs,
    rel_err,
    zero_padding,
)
from hatkernels import dispatch, hier_align
from hatkernels.backends import cuda as cuda_backend
from hatkernels.reference import naive_hier_align

HAS_NVCC = shutil.which("nvcc") is not None or os.path.exists("/usr/local/cuda/bin/nvcc")
SKIPPED_BUILD = os.environ.get("HATKERNELS_SKIP_CUDA_BUILD", "0") == "1"
GPU_REASONS = dispatch.not_supported_reasons(torch.device("cuda"), torch.float32, (64,))["cuda"]
needs_gpu = pytest.mark.skipif(
    bool(GPU_REASONS), reason="cuda backend cannot run here: " + "; ".join(GPU_REASONS)
)
POOLINGS = ("max", "scan")


# ---- no GPU needed ----


@pytest.mark.skipif(
    not HAS_NVCC or torch.version.cuda is None or SKIPPED_BUILD,
    reason="the CUDA extension builds only where nvcc and a CUDA torch are found "
    "(and HATKERNELS_SKIP_CUDA_BUILD is unset)",
)
def test_extension_is_built_and_imports_without_gpu():
    assert cuda_backend.LOAD_ERROR is None, cuda_backend.LOAD_ERROR
    ext = importlib.import_module("hatkernels._C_cuda")
    for name in (
        "max_align_forward",
        "max_align_backward",
        "scan_align_forward",
        "scan_align_backward",
    ):
        assert callable(getattr(ext, name))


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the no-GPU reasons")
def test_dispatch_without_gpu_does_not_list_cuda_and_says_why():
    assert "cuda" not in hatkernels.available_backends("cuda")
    reasons = dispatch.not_supported_reasons(torch.device("cuda"), torch.float32, (64,))
    assert "CUDA is not available" in reasons["cuda"]
    on_cpu = dispatch.not_supported_reasons(torch.device("cpu"), torch.float32, (64,))["cuda"]
    assert any("device type 'cpu' not in ('cuda',)" in r for r in on_cpu)


def test_forced_cuda_backend_on_cpu_tensors_raises_with_reasons(monkeypatch):
    v, t = torch.randn(2, 3, 8), torch.randn(4, 5, 8)
    with pytest.raises(ValueError, match=r"backend: 'cuda' cannot run.*device type 'cpu'"):
        hier_align(v, t, backend="cuda")
    monkeypatch.setenv("HATKERNELS_BACKEND", "cuda")
    with pytest.raises(ValueError, match=r"backend: 'cuda' cannot run"):
        hier_align(v, t)


def test_auto_on_cpu_never_picks_cuda(monkeypatch):
    monkeypatch.delenv("HATKERNELS_BACKEND", raising=False)
    v, t = torch.randn(2, 3, 8), torch.randn(4, 5, 8)
    assert hier_align(v, t).shape == (2, 4)
    assert "cuda" not in hatkernels.available_backends("cpu")


def test_dtype_reasons():
    reasons = cuda_backend.CudaBackend().environment_reasons(
        torch.device("cuda"), torch.float64, (8,)
    )
    assert any("dtype float64" in r for r in reasons)


@pytest.mark.skipif(cuda_backend.LOAD_ERROR is not None, reason="extension not built")
@pytest.mark.parametrize("op", ["max_align_forward", "scan_align_forward",
                                "max_align_backward", "scan_align_backward"])
def test_binding_rejects_cpu_tensors_with_value_error(op):
    ext = importlib.import_module("hatkernels._C_cuda")
    v, t = torch.randn(2, 3, 8), torch.randn(4, 5, 8)
    vl, tl = torch.tensor([3, 2]), torch.tensor([5, 1, 2, 3])
    extra = (9.0,) if op.startswith("scan") else ()
    if op.endswith("backward"):  # the backward takes the scores' gradient first
        args = (torch.ones(2, 4), v, t, vl, tl, 2, False, *extra)
    else:
        args = (v, t, vl, tl, 0, True, *extra)
    with pytest.raises(ValueError, match="images/texts: CUDA tensors expected"):
        getattr(ext, op)(*args)


def test_missing_extension_gives_a_reason_naming_the_build_switch():
    code = (
        "import sys\n"
        "sys.modules['hatkernels._C_cuda'] = None\n"
        "import torch\n"
        "from hatkernels import dispatch\n"
        "r = dispatch.not_supported_reasons(torch.device('cuda'), torch.float32, (8,))['cuda']\n"
        "assert any('hatkernels._C_cuda is not built' in x for x in r), r\n"
        "assert any('HATKERNELS_SKIP_CUDA_BUILD' in x for x in r), r\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True, timeout=120)


# ---- GPU: the float64 reference ----


def check_on_gpu(case, dtype: torch.dtype, *, exact_padding_check: bool = True, **kwargs) -> None:
    """Scores and gradients of the cuda backend in ``dtype`` vs the float64 naive reference
    (on the same dtype-rounded inputs), padding NaN; gradients exactly zero on padding."""
    rounded = [x.to(dtype) for x in case.images], [x.to(dtype) for x in case.texts]
    ref_in = [[x.double().requires_grad_(True) for x in side] for side in rounded]
    test_in = [[x.cuda().requires_grad_(True) for x in side] for side in rounded]
    ref = naive_hier_align(*ref_in, case.image_lengths, case.text_lengths, **kwargs)
    out = hier_align(
        *test_in,
        image_lengths=[x.cuda() for x in case.image_lengths],
        text_lengths=[x.cuda() for x in case.text_lengths],
        backend="cuda",
        **kwargs,
    )
    assert out.dtype == torch.float32 and out.is_cuda
    fwd_tol, grad_tol = TOLERANCE[dtype]
    err = rel_err(out.cpu(), ref)
    assert err <= fwd_tol, f"scores: rel err {err:.3g} ({kwargs})"
    cot = torch.randn(ref.shape, generator=torch.Generator().manual_seed(7), dtype=torch.float64)
    ref_grads = torch.autograd.grad(ref, ref_in[0] + ref_in[1], cot)
    out_grads = torch.autograd.grad(out, test_in[0] + test_in[1], cot.float().cuda())
    for k, (g, gr, x) in enumerate(zip(out_grads, ref_grads, rounded[0] + rounded[1])):
        g = g.cpu()
        assert g.dtype == dtype
        assert torch.isfinite(g).all(), f"grad {k}: non-finite values ({kwargs})"
        assert bool((g[~torch.isfinite(x)] == 0).all()), f"grad {k}: non-zero on padding"
        err = rel_err(g, zero_padding(gr), floor=1e-3 * float(cot.norm()))
        assert err <= grad_tol, f"grad {k}: rel err {err:.3g} ({kwargs})"


@needs_gpu
@pytest.mark.parametrize("direction,reduce", SETTINGS)
@pytest.mark.parametrize("pooling", POOLINGS)
def test_every_mode_float32_ragged_nan_padding(pooling, direction, reduce):
    # 37 x 53 items: several CTA blocks and a partial last block on both sides; D = 72 is not
    # a multiple of the 32-wide feature slice.
    case = make_case(11, 37, 53, [(49, 32, 72), (7, 11, 24)])
    check_on_gpu(
        case, torch.float32, pooling=pooling, direction=direction, reduce=reduce, weights=[1.0, 0.5]
    )


@needs_gpu
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("pooling", POOLINGS)
def test_low_precision_tensor_cores(pooling, dtype):
    # D = 64 takes the 16-byte vector loads, D = 13 the scalar ones.
    case = make_case(5, 19, 23, [(49, 32, 64), (9, 7, 13)])
    for direction, reduce in (("t2i", "mean"), ("i2t", "sum"), ("both", "mean")):
        check_on_gpu(case, dtype, pooling=pooling, direction=direction, reduce=reduce)


@needs_gpu
@pytest.mark.parametrize("pooling", POOLINGS)
def test_odd_shapes(pooling):
    # One token items, D = 1 (max only: scan is degenerate there), single image / caption
    # (a scan CTA with one or two pairs splits their queries across its warps), 130 words.
    d = 1 if pooling == "max" else 2
    for n_images, n_texts, levels in (
        (1, 1, [(1, 1, d)]),
        (3, 4, [(1, 3, 5), (4, 1, d)]),
        (1, 7, [(70, 9, 33)]),
        (1, 2, [(9, 6, 16)]),
        (6, 1, [(5, 130, 40)]),
    ):
        case = make_case(3, n_images, n_texts, levels)
        for direction, reduce in SETTINGS:
            check_on_gpu(case, torch.float32, pooling=pooling, direction=direction, reduce=reduce)


@needs_gpu
@pytest.mark.parametrize("direction", ["t2i", "i2t", "both"])
def test_scan_large_blocks_use_global_scratch(direction):
    # 300 image tokens: the backward's per-warp Gram gradient does not fit shared memory, so
    # the kernel works in its slice of a global buffer.
    case = make_case(4, 5, 6, [(300, 20, 48)])
    check_on_gpu(
        case, torch.float32, pooling="scan", direction=direction, reduce="mean", lambda_softmax=4.0
    )


@needs_gpu
def test_scan_t2i_runs_in_image_chunks():
    # 1024 image tokens: the images' Gram matrices are built 64 images at a time.
    case = make_case(8, 70, 3, [(1024, 5, 8)])
    check_on_gpu(case, torch.float32, pooling="scan", direction="t2i", reduce="sum")


@needs_gpu
@pytest.mark.parametrize("pooling", POOLINGS)
def test_padding_values_do_not_matter(pooling):
    outs = padding_fill_runs(make_case(9, 6, 7, [(12, 9, 40)]), pooling, "cuda", device="cuda")
    for other in outs[1:]:
        assert torch.equal(outs[0][0], other[0])  # the forward is deterministic
        for a, b in zip(outs[0][1:], other[1:]):  # gradients use float atomics
            torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


@needs_gpu
def test_huge_token_counts_raise_value_error():
    v = torch.randn(1, 40000, 1, device="cuda")
    t = torch.randn(1, 40000, 1, device="cuda")
    with pytest.raises(ValueError, match="too large for the CUDA max_align kernel"):
        hier_align(v, t, backend="cuda")


@needs_gpu
def test_auto_prefers_triton_then_cuda(monkeypatch):
    monkeypatch.delenv("HATKERNELS_BACKEND", raising=False)
    names = hatkernels.available_backends("cuda")
    assert "cuda" in names
    if "triton" in names:
        assert names.index("triton") < names.index("cuda")
