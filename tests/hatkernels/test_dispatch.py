"""The dispatcher: which backend runs, and the reasons given for the others."""

from __future__ import annotations

import pytest
import torch

import hatkernels
from alignment_cases import INTERPRETING, check_against_reference, make_case
from hatkernels import dispatch, hier_align
from hatkernels.backends.triton import TritonBackend
from hatkernels.inputs import AlignInputs
from hatkernels.ops import align


def _inputs(m=5, n=6, d=8, pooling="max", direction="t2i", needs_grad=False,
            dtype=torch.float32):  # fmt: skip
    """A call's inputs for dispatch (no kernel runs on them)."""
    images, texts = torch.zeros(2, m, d, dtype=dtype), torch.zeros(3, n, d, dtype=dtype)
    lengths = torch.full((2,), m), torch.full((3,), n)
    return AlignInputs(images, texts, *lengths, pooling, direction, "mean", 9.0, 1 << 30,
                       needs_grad)  # fmt: skip


def test_available_backends_cpu_lists_torch_and_orders_fastest_first():
    names = hatkernels.available_backends("cpu")
    assert "torch" in names
    order = dispatch.PREFERENCE["cpu"]
    assert names == [n for n in order if n in names]


def test_available_backends_cuda_lists_gpu_backends_only_with_a_gpu():
    names = hatkernels.available_backends(torch.device("cuda"))
    assert names == [n for n in dispatch.PREFERENCE["cuda"] if n in names]
    reasons = dispatch.not_supported_reasons(torch.device("cuda"), torch.float32, ())
    for name in ("triton", "cuda", "torch"):
        assert (name in names) == (not reasons[name])
        if not torch.cuda.is_available():
            assert any("CUDA is not available" in r for r in reasons[name])


def test_every_unavailable_backend_has_a_reason():
    reasons = dispatch.not_supported_reasons(torch.device("cpu"), torch.float32, (64,))
    assert set(reasons) == {"torch", "cpu", "triton", "cuda"}
    assert reasons["torch"] == []
    assert reasons["cuda"], "cuda cannot serve CPU tensors"
    assert all(isinstance(r, str) and r for rs in reasons.values() for r in rs)


def test_auto_picks_the_first_available(monkeypatch):
    monkeypatch.delenv("HATKERNELS_BACKEND", raising=False)
    chosen = dispatch.select_backend(_inputs())
    assert chosen.name == hatkernels.available_backends("cpu")[0]


def test_forced_backend_that_cannot_run_raises_with_reasons():
    with pytest.raises(ValueError, match=r"backend: 'cuda' cannot run.*device type 'cpu'"):
        dispatch.select_backend(_inputs(), "cuda")


def test_float64_only_on_torch_backend():
    reasons = dispatch.not_supported_reasons(torch.device("cpu"), torch.float64, (8,))
    assert reasons["torch"] == []
    assert any("dtype float64" in r for r in reasons["cpu"])


def test_triton_shape_limits_are_reasons_and_backward_limits_need_gradients():
    triton = TritonBackend()
    assert triton.shape_reasons(_inputs(n=200, pooling="max")) == []
    long_captions = triton.shape_reasons(_inputs(n=129, pooling="scan"))
    assert len(long_captions) == 1 and "captions over 128 tokens" in long_captions[0]
    big_images = dict(m=129, pooling="scan", direction="both")
    assert triton.shape_reasons(_inputs(**big_images)) == []
    (why,) = triton.shape_reasons(_inputs(**big_images, needs_grad=True))
    assert "backward with over 128 image tokens" in why and "gradients are needed" in why
    assert triton.shape_reasons(_inputs(m=129, pooling="scan", direction="i2t",
                                        needs_grad=True)) == []  # fmt: skip


def test_dispatch_falls_back_when_a_shape_limit_rules_the_first_backend_out(monkeypatch):
    """With triton first in the order (as on GPUs) and runnable, a call it cannot serve goes
    to the next backend; forcing triton then raises with the shape reason."""
    monkeypatch.delenv("HATKERNELS_BACKEND", raising=False)
    monkeypatch.setitem(dispatch.PREFERENCE, "cpu", ("triton", "torch"))
    monkeypatch.setattr(TritonBackend, "environment_reasons", lambda self, *args: [])
    assert dispatch.select_backend(_inputs(n=40, pooling="scan")).name == "triton"
    assert dispatch.select_backend(_inputs(n=129, pooling="scan")).name == "torch"
    grads = _inputs(m=200, pooling="scan", direction="t2i", needs_grad=True)
    assert dispatch.select_backend(grads).name == "torch"
    assert dispatch.call_reasons(grads)["torch"] == []
    with pytest.raises(ValueError, match=r"backend: 'triton' cannot run.*gradients are needed"):
        dispatch.select_backend(grads, "triton")


def test_forced_triton_on_long_captions_raises_from_hier_align():
    v, t = torch.randn(2, 3, 4), torch.randn(2, 130, 4)
    with pytest.raises(ValueError, match=r"backend: 'triton' cannot run.*captions over 128"):
        hier_align(v, t, pooling="scan", backend="triton")


def test_env_override(monkeypatch):
    monkeypatch.setenv("HATKERNELS_BACKEND", "torch")
    assert dispatch.select_backend(_inputs()).name == "torch"
    monkeypatch.setenv("HATKERNELS_BACKEND", "nope")
    with pytest.raises(ValueError, match="HATKERNELS_BACKEND"):
        hier_align(torch.randn(2, 3, 4), torch.randn(2, 3, 4))


def test_info_reports_every_backend():
    from hatkernels.info import report

    text = report()
    for name in ("torch", "cpu", "triton", "cuda"):
        assert name in text
    assert "torch " in text and "hatkernels" in text


def test_import_without_compiled_extension_warns_once_and_falls_back():
    import subprocess
    import sys

    code = (
        "import sys, warnings\n"
        "sys.modules['hatkernels._C_cpu'] = None\n"
        "with warnings.catch_warnings(record=True) as w:\n"
        "    warnings.simplefilter('always')\n"
        "    import hatkernels, torch\n"
        "msgs = [str(x.message) for x in w if 'fused CPU backend' in str(x.message)]\n"
        "assert len(msgs) == 1, msgs\n"
        "assert 'cpu' not in hatkernels.available_backends('cpu')\n"
        "out = hatkernels.hier_align(torch.randn(2, 3, 4), torch.randn(3, 5, 4))\n"
        "assert out.shape == (2, 3)\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True)


@pytest.mark.skipif(not INTERPRETING, reason="runs Triton kernels on CPU: TRITON_INTERPRET=1")
def test_each_level_goes_to_a_backend_that_serves_it(monkeypatch):
    """Triton first (as on GPUs): the level with long captions runs on the next backend, the
    other on triton, and the sum is exact, gradients included."""
    from hatkernels import api

    monkeypatch.delenv("HATKERNELS_BACKEND", raising=False)
    monkeypatch.setitem(dispatch.PREFERENCE, "cpu", ("triton", "torch"))
    chosen = []

    def spy(inp, backend):
        chosen.append((inp.text_tokens, backend))
        return align(inp, backend)

    monkeypatch.setattr(api, "align", spy)
    case = make_case(23, 2, 3, [(5, 9, 6), (4, 130, 6)])
    check_against_reference(case, "auto", torch.float32, pooling="scan", direction="i2t")
    assert chosen == [(9, "triton"), (130, "torch")]
