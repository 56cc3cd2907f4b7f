"""The benchmark harness fails when a contender raises or computes wrong results (a benchmark
that cannot fail checks nothing); a backend that cannot run here is skipped with its reason."""

from __future__ import annotations

import harness
import pytest
import torch
from workloads import MAX_T2I, SCAN_I2T, TINY, align_fn

from hatkernels import available_backends


@pytest.fixture(autouse=True)
def _torch_and_cpu_only(monkeypatch):
    """The harness's logic is under test, not every backend: time the torch and cpu backends
    (where the cpu extension is built) and keep the triton interpreter out."""
    real = harness.not_supported_reasons
    monkeypatch.setattr(harness, "not_supported_reasons", lambda *a: {
        k: v for k, v in real(*a).items() if k in ("torch", "cpu")})


def _cpu_built() -> bool:
    return "cpu" in available_backends("cpu")


class _Benchmark:
    """Stands in for pytest-benchmark's fixture: runs the round function ``rounds`` times."""

    def pedantic(self, fn, rounds: int, iterations: int, warmup_rounds: int) -> None:
        for _ in range(rounds):
            fn()


def _patched(broken: str, how: str):
    """``align_fn`` with backend ``broken`` raising, or returning scores off by 1e-3 (the float64
    reference, the naive way in float64, stays right)."""

    def fn(x, case, backend, backward):
        inner = align_fn(x, case, backend, backward)
        if backend != broken or x.images.dtype == torch.float64:
            return inner
        if how == "raise":
            def run():
                raise RuntimeError("kernel exploded")
            return run
        if backward:
            return lambda: tuple(t * 1.001 for t in inner())
        return lambda: inner() * 1.001

    return fn


def _run(monkeypatch, case, mode: str, broken: str | None = None, how: str = "raise"):
    rows: list[dict] = []
    monkeypatch.setattr(harness, "ROWS", rows)
    if broken:
        monkeypatch.setattr(harness, "align_fn", _patched(broken, how))
    harness.bench_timing(_Benchmark(), harness.Config(full=False, rounds=2), case, TINY, mode)
    return rows


@pytest.mark.parametrize("broken", ["cpu", "naive", "torch"])
@pytest.mark.parametrize("how", ["raise", "wrong"])
def test_broken_contender_fails_the_benchmark(monkeypatch, broken, how):
    if broken == "cpu" and not _cpu_built():
        pytest.skip("the cpu extension is not built here")
    with pytest.raises(AssertionError, match="raised RuntimeError|MISMATCH"):
        _run(monkeypatch, MAX_T2I, "fwd", broken, how)
    assert any(r.get("backend") == broken and r["status"] != "ok" for r in harness.ROWS)


def test_wrong_gradients_fail_the_benchmark(monkeypatch):
    with pytest.raises(AssertionError, match="MISMATCH vs float64 \\(out, grad images"):
        _run(monkeypatch, SCAN_I2T, "fwd+bwd", "torch", "wrong")


def test_gemm_that_raises_fails_the_benchmark(monkeypatch):
    def gemm_fn(x):
        def run():
            raise RuntimeError("no BLAS")
        return run

    monkeypatch.setattr(harness, "gemm_fn", gemm_fn)
    with pytest.raises(AssertionError, match="gemm: raised RuntimeError"):
        _run(monkeypatch, MAX_T2I, "fwd")


def test_healthy_run_checks_every_contender_against_float64(monkeypatch):
    rows = _run(monkeypatch, SCAN_I2T, "fwd+bwd")
    timed = [r for r in rows if not r["status"].startswith("skipped")]
    want = {"torch", "naive"} | ({"cpu"} if _cpu_built() else set())
    assert {r["backend"] for r in timed} >= want
    for r in timed:
        assert r["status"] == "ok" and "grad texts" in r["vs_float64"], r


def test_backend_that_cannot_run_here_is_skipped_with_its_reason(monkeypatch):
    monkeypatch.setattr(harness, "not_supported_reasons",
                        lambda *a: {"torch": [], "cpu": ["extension not built"]})
    rows = _run(monkeypatch, MAX_T2I, "fwd")
    assert {"backend": "cpu", "status": "skipped: extension not built"}.items() <= next(
        r for r in rows if r["backend"] == "cpu").items()
