"""The dispatcher: which backend runs, and the reasons given for the others."""

from __future__ import annotations

import pytest
import torch

import hatkernels
from hatkernels import dispatch, hier_align


def test_available_backends_cpu_lists_torch_and_orders_fastest_first():
    names = hatkernels.available_backends("cpu")
    assert "torch" in names
    order = dispatch.PREFERENCE["cpu"]
    assert names == [n for n in order if n in names]


def test_available_backends_cuda_without_gpu_is_torch_only_or_empty():
    names = hatkernels.available_backends(torch.device("cuda"))
    if not torch.cuda.is_available():
        assert "triton" not in names and "cuda" not in names


def test_every_unavailable_backend_has_a_reason():
    reasons = dispatch.not_supported_reasons(torch.device("cpu"), torch.float32, (64,))
    assert set(reasons) == {"torch", "cpu", "triton", "cuda"}
    assert reasons["torch"] == []
    assert reasons["cuda"], "cuda cannot serve CPU tensors"
    assert all(isinstance(r, str) and r for rs in reasons.values() for r in rs)


def test_auto_picks_the_first_available(monkeypatch):
    monkeypatch.delenv("HATKERNELS_BACKEND", raising=False)
    chosen = dispatch.select_backend(torch.device("cpu"), torch.float32, (8,))
    assert chosen.name == hatkernels.available_backends("cpu")[0]


def test_forced_backend_that_cannot_run_raises_with_reasons():
    with pytest.raises(ValueError, match=r"backend: 'cuda' cannot run.*device type 'cpu'"):
        dispatch.select_backend(torch.device("cpu"), torch.float32, (8,), "cuda")


def test_float64_only_on_torch_backend():
    reasons = dispatch.not_supported_reasons(torch.device("cpu"), torch.float64, (8,))
    assert reasons["torch"] == []
    assert any("dtype float64" in r for r in reasons["cpu"])


def test_env_override(monkeypatch):
    monkeypatch.setenv("HATKERNELS_BACKEND", "torch")
    assert dispatch.select_backend(torch.device("cpu"), torch.float32, (8,)).name == "torch"
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
