"""The benchmark harness fails when a contender raises or computes wrong results (a benchmark
that cannot fail checks nothing); a backend that cannot run here is skipped with its reason; a
peer library is reported (approximate, raising or not installed) and never fails it."""

from __future__ import annotations

import os
import sys

import harness
import peers
import pytest
import torch
import workloads
from workloads import MAX_T2I, SCAN_I2T, TINY, TINY_HAT, W1, align_fn, make_inputs

from hatkernels import available_backends

REAL_PEERS = dict(peers.PEERS)


@pytest.fixture(autouse=True)
def _torch_and_cpu_only(monkeypatch):
    """The harness's logic is under test, not every backend: time the torch and cpu backends
    (where the cpu extension is built), keep the triton interpreter and the installed peer
    libraries out (the tests that need a peer bring their own)."""
    real = harness.not_supported_reasons
    monkeypatch.setattr(harness, "not_supported_reasons", lambda *a: {
        k: v for k, v in real(*a).items() if k in ("torch", "cpu")})
    monkeypatch.setattr(peers, "PEERS", {})


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


def _fake_peer(monkeypatch, how: str) -> None:
    """One peer, ``fake``, computing max t2i mean the naive way: exactly, off by 1%, or
    raising when it is set up."""

    def run(x, threads):
        if how == "raise":
            raise RuntimeError("peer exploded")
        fn = align_fn(x, MAX_T2I, "naive", False)
        scale = 1.01 if how == "approximate" else 1.0
        return peers.PeerRun(lambda: fn() * scale, torch.arange(len(x.texts)), "a fake peer")

    monkeypatch.setattr(peers, "PEERS", {"fake": ("json", run)})


@pytest.mark.parametrize("how", ["exact", "approximate", "raise"])
def test_peer_is_reported_and_never_fails_the_benchmark(monkeypatch, how):
    _fake_peer(monkeypatch, how)
    rows = _run(monkeypatch, MAX_T2I, "fwd")
    row = next(r for r in rows if r["backend"] == "fake")
    want = {"exact": "ok", "approximate": "approximate", "raise": "raised RuntimeError"}[how]
    assert row["status"].startswith(want), row
    if how != "raise":
        assert row["vs_float64"].startswith("out ") and row["note"] == "a fake peer", row


def test_peers_not_installed_are_skipped(monkeypatch):
    monkeypatch.setattr(peers, "PEERS", REAL_PEERS)
    monkeypatch.setitem(sys.modules, "numkong", None)  # import numkong raises ImportError
    monkeypatch.setitem(sys.modules, "maxsim_cpu", None)
    rows = _run(monkeypatch, MAX_T2I, "fwd")
    for name in ("numkong", "maxsim-cpu"):
        row = next(r for r in rows if r["backend"] == name)
        assert row["status"].startswith("skipped: not installed"), row


def test_peers_only_on_max_t2i_forward(monkeypatch):
    _fake_peer(monkeypatch, "exact")
    assert not any(r["backend"] == "fake" for r in _run(monkeypatch, MAX_T2I, "fwd+bwd"))
    assert not any(r["backend"] == "fake" for r in _run(monkeypatch, SCAN_I2T, "fwd"))


def test_maxsim_cpu_gets_only_the_captions_it_can_score():
    x = make_inputs(W1).head(4, 64)
    cols = peers.maxsim_cpu_cols(x)
    assert len(cols) and (x.text_lengths[cols] <= 20).all()
    assert len(cols) == int((x.text_lengths <= 20).sum())


def test_cpu_rows_run_with_screening_on_and_off(monkeypatch):
    seen = []
    real = workloads.hier_align

    def spy(*args, **kw):
        seen.append((kw["backend"], os.environ.get(workloads.SCREEN_ENV)))
        return real(*args, **kw)

    monkeypatch.setattr(workloads, "hier_align", spy)
    monkeypatch.setenv(workloads.SCREEN_ENV, "0")
    x = make_inputs(TINY)
    for name in ("cpu", "cpu-fp32"):
        align_fn(x, MAX_T2I, name, False)()
        assert os.environ[workloads.SCREEN_ENV] == "0"  # restored after the call
    assert seen == [("cpu", "1"), ("cpu", "0")]
    if _cpu_built():
        rows = _run(monkeypatch, MAX_T2I, "fwd")
        cpu = next(r for r in rows if r["backend"] == "cpu")
        assert cpu["x_cpu_fp32"] and any(r["backend"] == "cpu-fp32" for r in rows)


def test_several_levels_report_time_per_pair(monkeypatch):
    rows: list[dict] = []
    monkeypatch.setattr(harness, "ROWS", rows)
    harness.bench_timing(_Benchmark(), harness.Config(full=False, rounds=2), SCAN_I2T,
                         TINY_HAT, "fwd")
    timed = [r for r in rows if r["backend"] in ("torch", "naive", "cpu")]
    assert timed and all(r["status"] == "ok" and r["ms_per_pair"] for r in timed), timed


def test_sweep_chart_is_drawn_from_the_results(tmp_path):
    import json

    import plot_sweep

    rows = [dict(op=f"{p}_align x", mode="fwd", workload=f"S {w}", backend=b,
                 of_fma_median=0.5, of_fma_min=0.4, of_fma_max=0.6)
            for p in ("max", "scan") for w in ("base", "D=64") for b in ("cpu", "gemm")]
    results = tmp_path / "results.json"
    results.write_text(json.dumps({"command": "pytest", "machine": {}, "rows": rows}))
    out = plot_sweep.plot(results, tmp_path / "sweep.png")
    assert out.stat().st_size > 10_000


def test_a_peer_that_crashes_its_probe_is_reported_not_run(monkeypatch):
    """maxsim-cpu's shapes run first in a child process: a segmentation fault there is a
    reason, not the end of the benchmark."""
    monkeypatch.setattr(peers, "_PROBE", "import os, signal; os.kill(os.getpid(), signal.SIGSEGV)")
    x = make_inputs(TINY)
    why = peers._probe_maxsim_cpu(x, peers.maxsim_cpu_cols(x))
    assert why and why.startswith("crashed (signal SIGSEGV)"), why
