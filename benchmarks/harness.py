"""How the benchmarks measure: interleaved rounds, ratios per round, agreement checks, peak
memory in a fresh process, and the result tables.

Timings on a shared machine swing 2x within minutes, so every ratio is taken between two
timings of the same round, over several rounds whose contender order rotates, and reported
as the median and range. Run as a script, this module is the child process of the peak-memory
check (``python harness.py CASE_JSON``).
"""

from __future__ import annotations

import csv
import functools
import gc
import itertools
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from datetime import datetime, timezone
from pathlib import Path

import peers
import torch
from fma_peak import fma_fn
from workloads import (
    SCREEN_ENV,
    SWEEP,
    TINY,
    TINY_MEMORY,
    W1,
    W2,
    Case,
    HatWorkload,
    Inputs,
    Workload,
    align_fn,
    gemm_fn,
    make_any,
    make_inputs,
)

import hatkernels
from hatkernels.backends import BACKENDS
from hatkernels.dispatch import not_supported_reasons
from hatkernels.info import cpu_isa_report

ROOT = Path(__file__).resolve().parent.parent
ROWS: list[dict] = []  # every row measured in this session, written at its end
PEAKS = ("fma", "gemm")  # the machine's rates, timed beside the kernels (forward rounds)
TOLERANCE = {"out": 1e-5, "grad": 1e-4}  # float32 against the float64 reference
MIB = 1 << 20


@dataclass(frozen=True)
class Config:
    full: bool  # --benchmark: the named workloads, several rounds, tables written
    rounds: int


@dataclass
class Contender:
    backend: str  # a backend name, "cpu-fp32", "naive", "gemm", "fma" or a peer's name
    backward: bool
    timed_on: tuple[int, int]
    flops: int
    fn: Callable[[], object]
    note: str = ""

    @property
    def key(self) -> str:
        return self.backend + (" fwd+bwd" if self.backward else "")


def backend_candidates(dim: int, full: bool) -> tuple[list[str], dict[str, str]]:
    """CPU backends to time, and the reasons the others are not timed."""
    reasons = not_supported_reasons(torch.device("cpu"), torch.float32, [dim])
    usable, skipped = [], {}
    for name, why in reasons.items():
        if "cpu" not in BACKENDS[name].device_types:
            continue
        if not why and name == "triton" and full:
            why = ["interpreted on CPU (TRITON_INTERPRET=1): a test vehicle, not timed"]
        if why:
            skipped[name] = "; ".join(why)
        else:
            usable.append(name)
    return sorted(usable, key=lambda n: n != "torch"), skipped


def contender_names(case: Case, mode: str, backends: list[str], only: list[str] | None):
    """The backends, ``cpu-fp32`` after ``cpu`` (max pooling: the cpu backend without its
    int8 screening, forward and forward+backward) and the naive way; only those in ``only``
    when given."""
    names = []
    for name in backends:
        names.append(name)
        if name == "cpu" and case.pooling == "max":
            names.append("cpu-fp32")
    names.append("naive")
    return [n for n in names if only is None or n in only]


def peer_names(case: Case, w, mode: str, only: list[str] | None,
               skipped: dict[str, str]) -> list[str]:
    """The optional peer libraries to time (max t2i forward, on workloads that ask for them);
    those not importable go to ``skipped``."""
    if not (w.peers and case.pooling == "max" and case.direction == "t2i" and mode == "fwd"):
        return []
    names = []
    for name in peers.PEERS:
        if only is not None and name not in only:
            continue
        why = peers.available(name)
        if why:
            skipped[name] = why
        else:
            names.append(name)
    return names


def _peer_contender(name: str, part, failed: dict[str, str]) -> Contender | None:
    """A peer set up on ``part`` (packing, probing: not timed), or None (why in ``failed``)."""
    try:
        run = peers.peer_run(name, part)
    except Exception as exc:  # reported in the peer's row; a peer does not fail the run
        failed[name] = f"raised {type(exc).__name__}: {exc}"
        return None
    d = part.images.shape[2]
    flops = 2 * d * int(part.image_lengths.sum()) * int(part.text_lengths[run.cols].sum())
    return Contender(name, False, (len(part.images), len(run.cols)), flops, run.fn, run.note)


def _contenders(case: Case, w: Workload, x: Inputs, mode: str, names: list[str],
                peer_list: list[str], skipped: dict[str, str], failed: dict[str, str],
                full: bool) -> list[Contender]:
    """Forward: the FMA peak and the GEMM rate first; then every backend, the naive way and
    the peers on their slices (fwd+bwd: forward alone and forward + backward). The full run's
    FMA probe lasts about a quarter of a second on an idle machine: a short probe catches a
    moment of a shared machine, the kernels' timings average over seconds."""
    out = []
    if mode == "fwd":
        try:
            fma, flops = fma_fn(1 << 26 if full else 1 << 20)
            out.append(Contender("fma", False, (0, 0), flops, fma))
        except RuntimeError as exc:  # no C compiler or no AVX2 here
            skipped["fma"] = str(exc)
        out.append(Contender("gemm", False, (w.n_images, w.n_texts), x.valid_flops(), gemm_fn(x)))
    for name in names:
        part = x.head(*w.slice_for(case.pooling, mode, name))
        for backward in (False, True) if mode == "fwd+bwd" else (False,):
            fn = align_fn(part, case, name, backward)
            out.append(Contender(name, backward, (len(part.images), len(part.texts)),
                                 part.valid_flops(), fn))
    for name in peer_list:
        if name not in failed:
            c = _peer_contender(name, x.head(*w.slice_for(case.pooling, mode, name)), failed)
            out += [c] if c else []
    return out


def _run_rounds(benchmark, contenders: list[Contender], rounds: int, failed: dict[str, str]):
    """Time every contender not in ``failed`` once per round (rotating the order); keep each
    one's first result. A contender that raises is recorded in ``failed`` and not run again."""
    times = {c.key: [] for c in contenders}
    first = {}
    counter = itertools.count()

    def one_round() -> None:
        live = [c for c in contenders if c.key not in failed]
        if not live:
            return
        k = next(counter) % len(live)
        for c in live[k:] + live[:k]:
            start = time.perf_counter()
            try:
                result = c.fn()
            except Exception as exc:  # recorded, and the benchmark test fails on it
                failed[c.key] = f"raised {type(exc).__name__}: {exc}"
                continue
            times[c.key].append(time.perf_counter() - start)
            first.setdefault(c.key, result)

    benchmark.pedantic(one_round, rounds=rounds, iterations=1, warmup_rounds=0)
    return times, first


def _rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.double() - b.double()).norm() / b.double().norm().clamp_min(1e-30))


def check_common_slice(case: Case, part: Inputs, mode: str, names: list[str],
                       peer_list: tuple[str, ...] = ()) -> dict[str, str]:
    """Every contender on the same inputs (``part``) against the float64 reference: scores
    within ``TOLERANCE["out"]`` and, with backward, both gradients within ``TOLERANCE["grad"]``
    (relative Frobenius error). It also loads each contender's libraries, thread pools and
    kernels before the timed rounds. Returns each contender's errors, or why it failed. A
    peer's error is reported, marked ``(approximate)`` above the tolerance, not a mismatch."""
    backward = mode == "fwd+bwd"
    want = align_fn(part.to(torch.float64), case, "naive", backward)()
    labels = ("out", "grad images", "grad texts") if backward else ("out",)
    wants = want if backward else (want,)
    report = {}
    for name in names:
        try:
            got = align_fn(part, case, name, backward)()
        except Exception as exc:
            report[name] = f"raised {type(exc).__name__}: {exc}"
            continue
        errs = {k: _rel_err(g, w) for k, g, w in zip(labels, got if backward else (got,), wants)}
        bad = [k for k, e in errs.items()
               if not e <= TOLERANCE["out" if k == "out" else "grad"]]
        text = ", ".join(f"{k} {e:.1e}" for k, e in errs.items())
        report[name] = f"MISMATCH vs float64 ({', '.join(bad)}): {text}" if bad else text
    for name in peer_list:
        try:
            run = peers.peer_run(name, part)
            err = _rel_err(run.fn(), want[:, run.cols])
        except Exception as exc:
            report[name] = f"raised {type(exc).__name__}: {exc}"
            continue
        some = f" ({len(run.cols)} of {want.shape[1]} captions)" if len(run.cols) < want.shape[
            1] else ""
        approximate = "" if err <= TOLERANCE["out"] else " (approximate)"
        report[name] = f"out {err:.1e}{approximate}{some}"
    return report


def _disagreement(c: Contender, ref: Contender, got, want) -> str | None:
    """Why ``got`` (contender ``c``'s first scores) disagrees with the torch backend's on the
    prefix both were timed on (float32 against float32: twice the float64 tolerance)."""
    a, b = min(c.timed_on[0], ref.timed_on[0]), min(c.timed_on[1], ref.timed_on[1])
    outs = (got[0], want[0]) if c.backward else (got, want)
    err = _rel_err(outs[0][:a, :b], outs[1][:a, :b])
    return None if err <= 2 * TOLERANCE["out"] else f"MISMATCH vs torch: out rel err {err:.1e}"


def _stats(values: list[float]) -> list[float] | None:
    return [statistics.median(values), min(values), max(values)] if values else None


def _ratio(num: list[float], den: list[float]) -> list[float] | None:
    return _stats([a / b for a, b in zip(num, den)]) if num and den else None


def _per_pair(w: HatWorkload, c: Contender, seconds: list[float]) -> dict:
    """Milliseconds per (image, caption) pair, every level, and the time extrapolated to
    ``w.pairs_to`` pairs (hours)."""
    pairs = c.timed_on[0] * c.timed_on[1]
    ms = [t * 1e3 / pairs for t in seconds]
    label, total = w.pairs_to
    return dict(ms_per_pair=_stats(ms), extrapolated_h=_stats([v * total / 3.6e6 for v in ms]),
                extrapolated_to=f"{total:,} pairs ({label})")


def bench_timing(benchmark, cfg: Config, case: Case, w: Workload | HatWorkload, mode: str,
                 rounds: int | None = None, only: list[str] | None = None) -> None:
    """Check every backend, the naive way (and, where asked, the peers) on a common slice
    against float64, then time them, the GEMM and the FMA peak (forward) in interleaved
    rounds; record one row per contender; fail if any backend or the naive way raised or
    disagrees (a peer's failure or approximation is reported in its row). ``only``: the
    contenders to time besides the GEMM and the FMA peak."""
    x = make_any(w)
    backends, skipped = backend_candidates(w.dim, cfg.full)
    names = contender_names(case, mode, backends, only)
    skipped = {n: why for n, why in skipped.items() if only is None or n in only}
    peer_list = peer_names(case, w, mode, only, skipped)
    for name in list(peer_list):
        why = peers.cannot_score(name, x.head(*w.slice_for(case.pooling, mode, name)))
        if why:
            skipped[name] = why
            peer_list.remove(name)
    common = w.common_slice(case.pooling, mode)
    checks = check_common_slice(case, x.head(*common), mode, names, peer_list)
    suffix = " fwd+bwd" if mode == "fwd+bwd" else ""
    failed = {key: why for n, why in checks.items() if why.startswith("raised")
              for key in (n, n + suffix)}
    contenders = _contenders(case, w, x, mode, names, peer_list, skipped, failed, cfg.full)
    times, first = _run_rounds(benchmark, contenders, rounds or cfg.rounds, failed)
    by_key = {c.key: c for c in contenders}
    rate = {c.key: [c.flops / 1e9 / t for t in times[c.key]] for c in contenders}
    ref_key, naive_key = "torch" + suffix, "naive" + suffix
    rate.setdefault(naive_key, [])
    base = dict(op=case.op, mode=mode, workload=w.name, shape=w.shape,
                load=round(os.getloadavg()[0], 1))
    problems = []
    for c in contenders:
        if c.backward != (mode == "fwd+bwd"):
            continue
        status = failed.get(c.key) or failed.get(c.backend)
        check = checks.get(c.backend, "")
        is_peer = c.backend in peer_list
        if status is None and check.startswith("MISMATCH"):
            status = check
        if (status is None and not is_peer and c.backend not in ("torch", *PEAKS)
                and ref_key in first):
            status = _disagreement(c, by_key[ref_key], first[c.key], first[ref_key])
        if status is None and is_peer and "(approximate)" in check:
            status = "approximate"
        problems += [f"{c.key}: {status}"] if status and not is_peer else []
        timed_on = "" if c.backend == "fma" else "x".join(map(str, c.timed_on))
        row = dict(base, backend=c.backend, timed_on=timed_on,
                   rounds=len(times[c.key]), status=status or "ok", gflops=_stats(rate[c.key]))
        if check and not check.startswith("raised"):
            row["vs_float64"] = f"{check} on {common[0]}x{common[1]}"
        if mode == "fwd" and c.backend != "fma":
            row["of_fma"] = _ratio(rate[c.key], rate.get("fma", []))
        if mode == "fwd" and c.backend not in PEAKS:
            row["of_gemm"] = _ratio(rate[c.key], rate["gemm"])
        if c.backend not in (*PEAKS, "naive"):
            row["x_naive"] = _ratio(rate[c.key], rate[naive_key])
        if c.backend not in (*PEAKS, "torch"):
            row["x_torch"] = _ratio(rate[c.key], rate.get(ref_key, []))
        if c.backend == "cpu" and mode == "fwd":
            row["x_cpu_fp32"] = _ratio(rate[c.key], rate.get("cpu-fp32", []))
        if mode == "fwd+bwd" and c.key not in failed:
            row["fwdbwd_over_fwd"] = _ratio(times[c.key], times[c.backend])
        if isinstance(w, HatWorkload) and c.backend not in PEAKS and times[c.key]:
            row.update(_per_pair(w, c, times[c.key]))
        if c.note:
            row["note"] = c.note
        ROWS.append(row)
    for name in peer_list:  # a peer whose set-up raised: reported, not timed
        if name not in by_key:
            check = checks.get(name, "raised")
            ROWS.append(dict(base, backend=name, status=failed.get(name, "not run"),
                             **({} if check.startswith("raised") else {"vs_float64": check})))
    ROWS.extend(dict(base, backend=n, status=f"skipped: {why}") for n, why in skipped.items())
    assert not problems, problems


def bench_memory(cfg: Config, case: Case, w: Workload) -> None:
    """Added peak RSS of one forward call per backend, in a fresh process; every backend that
    can run here must run and stay within twice the output's size plus 256 MiB."""
    backends, skipped = backend_candidates(w.dim, True)
    if cfg.full:  # the check is for the fused kernels; the torch backend takes many minutes
        skipped.update({n: "not run on W2 (minutes per call); the check is for the cpu backend"
                        for n in backends if n == "torch"})
        backends = [n for n in backends if n != "torch"]
    job = dict(asdict(case), workload=w.name, backends=backends)
    cmd = [sys.executable, str(Path(__file__)), json.dumps(job)]
    proc = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT, check=False)
    if proc.returncode != 0:
        raise RuntimeError(f"peak-memory child failed ({proc.returncode}):\n{proc.stderr[-3000:]}")
    base = dict(kind="memory", op=case.op, workload=w.name, shape=w.shape,
                load=round(os.getloadavg()[0], 1))
    bad = []
    for name, got in zip(backends, json.loads(proc.stdout.strip().splitlines()[-1])):
        row = dict(base, backend=name, **got)
        if "error" not in got:
            row["limit_mib"] = (2 * got["output_bytes"] + 256 * MIB) / MIB
            row["ok"] = got["added_peak_bytes"] / MIB <= row["limit_mib"]
        bad += [] if row.get("ok") else [row]
        ROWS.append(row)
    ROWS.extend(dict(base, backend=n, error=f"skipped: {why}") for n, why in skipped.items())
    assert not bad, bad


def align_benchmarks(case: Case) -> tuple[Callable, Callable, Callable]:
    """The three benchmark tests of one operator, for its test module to bind to names of its
    own: W1 timing (forward, forward+backward), W2 peak memory (tiny shapes in the smoke
    run), and the shape sweep (with --benchmark only)."""
    import pytest  # here, not at the top: the peak-memory child process imports this module

    @pytest.mark.parametrize("mode", ["fwd", "fwd+bwd"])
    def w1(benchmark, bench, mode):
        bench_timing(benchmark, bench, case, W1 if bench.full else TINY, mode)

    def w2_memory(bench):
        bench_memory(bench, case, W2 if bench.full else TINY_MEMORY)

    @pytest.mark.parametrize("workload", SWEEP, ids=lambda w: w.name.replace(" ", "_"))
    def sweep(benchmark, bench, workload):
        if not bench.full:
            pytest.skip("the shape sweep runs with --benchmark")
        bench_timing(benchmark, bench, case, workload, "fwd", rounds=min(3, bench.rounds))

    return w1, w2_memory, sweep


def _proc_status(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) * 1024
    raise RuntimeError(f"{field} not in /proc/self/status")


def _peak_child(x: Inputs, case: Case, backend: str) -> dict:
    """A tiny warm-up call, reset the peak RSS (Linux ``clear_refs``), one forward call; the
    peak over the RSS just before it."""
    fn = align_fn(x, case, backend, False)
    try:
        align_fn(make_inputs(TINY), case, backend, False)()
        gc.collect()
        Path("/proc/self/clear_refs").write_text("5")
        before = _proc_status("VmRSS")
        start = time.perf_counter()
        out = fn()
        seconds = time.perf_counter() - start
    except Exception as exc:  # reported to the parent, whose check then fails
        return {"error": f"raised {type(exc).__name__}: {exc}"}
    return {"added_peak_bytes": _proc_status("VmHWM") - before,
            "output_bytes": out.numel() * out.element_size(), "seconds": seconds,
            "gflops": x.valid_flops() / 1e9 / seconds}


def _memory_child(job: dict) -> list[dict]:
    """The peak-memory child process: one workload, one case, each backend in turn."""
    workloads = {w.name: w for w in (W1, W2, TINY, TINY_MEMORY, *SWEEP)}
    case = Case(job["pooling"], job["direction"], job["reduce"], job["lambda_softmax"])
    x = make_inputs(workloads[job["workload"]])
    return [_peak_child(x, case, name) for name in job["backends"]]


def _git(*args: str) -> str:
    proc = subprocess.run(["git", *args], capture_output=True, text=True, cwd=ROOT, check=False)
    return proc.stdout.strip()


def screening_with_flag() -> str:
    """What the ``cpu`` contender's HATKERNELS_CPU_SCREEN=1 does here: the extension's own
    report (``on (...)``, or why it stays off on this CPU), read with the variable set."""
    old = os.environ.get(SCREEN_ENV)
    os.environ[SCREEN_ENV] = "1"
    try:
        import hatkernels._C_cpu as ext

        return ext.cpu_screen()
    except (ImportError, ValueError) as exc:
        return f"unknown ({type(exc).__name__}: {exc})"
    finally:
        if old is None:
            del os.environ[SCREEN_ENV]
        else:
            os.environ[SCREEN_ENV] = old


@functools.cache
def code_state() -> dict:
    """What code ran, read once when the session starts (an extension rebuilt later is not the
    one loaded): git commit, the files of the code under test that differ from it, when the
    cpu extension was built, the instruction set its kernels run at, the start time."""
    code = ["hatkernels", "csrc", "benchmarks", ":!benchmarks/results"]
    changed = (_git("diff", "--name-only", "HEAD", "--", *code).split()
               + _git("ls-files", "--others", "--exclude-standard", "--", *code).split())
    extension = next(Path(hatkernels.__file__).parent.glob("_C_cpu*"), None)
    built = extension and datetime.fromtimestamp(extension.stat().st_mtime, timezone.utc)
    return {
        "commit": _git("rev-parse", "--short", "HEAD"),
        "uncommitted": ", ".join(changed) or "none",
        "cpu_extension_built": built.strftime("%Y-%m-%d %H:%M UTC") if built else "not built",
        "cpu_kernels": cpu_isa_report(),
        "cpu_row_screening": screening_with_flag(),
        "started": datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
    }


CODE_KEYS = ("commit", "uncommitted", "cpu_extension_built", "cpu_kernels",
             "cpu_row_screening")


def machine_info() -> dict:
    """CPU model and ISA, cores, torch/python versions, the code that ran, the load now."""
    cpuinfo = Path("/proc/cpuinfo").read_text() if Path("/proc/cpuinfo").exists() else ""
    model = next((ln.split(":", 1)[1].strip() for ln in cpuinfo.splitlines()
                  if ln.startswith("model name")), platform.processor())
    flags = next((ln.split(":", 1)[1].split() for ln in cpuinfo.splitlines()
                  if ln.startswith("flags")), [])
    isa = "avx512f" if "avx512f" in flags else "avx2" if "avx2" in flags else "other"
    return {
        "cpu_model": f"{model} ({isa})", "cores": os.cpu_count(), "torch_threads":
        torch.get_num_threads(), "torch": torch.__version__, "python": platform.python_version(),
        **code_state(),
        "written": datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "load_average": " ".join(f"{v:.1f}" for v in os.getloadavg()),
    }


def _fmt(stats: list[float] | None, digits: int) -> str:
    if not stats:
        return ""
    med, lo, hi = (f"{v:.{digits}f}" for v in stats)
    return med if lo == hi else f"{med} ({lo}–{hi})"


TIMING_COLUMNS = [("op", None), ("mode", None), ("workload", None), ("backend", None),
                  ("timed_on", None), ("rounds", None), ("gflops", 1), ("of_fma", 2),
                  ("of_gemm", 2),
                  ("x_naive", 2), ("x_torch", 2), ("x_cpu_fp32", 2), ("fwdbwd_over_fwd", 2),
                  ("load", None), ("status", None), ("vs_float64", None), ("note", None)]
PER_PAIR_COLUMNS = [("op", None), ("workload", None), ("shape", None), ("backend", None),
                    ("timed_on", None), ("rounds", None), ("ms_per_pair", 3),
                    ("extrapolated_h", 2), ("extrapolated_to", None), ("gflops", 1),
                    ("of_fma", 2), ("load", None), ("status", None)]
MEMORY_COLUMNS = ["op", "workload", "backend", "output_mib", "added_peak_mib", "limit_mib",
                  "ok", "seconds", "gflops", "load", "error"]


def _memory_view(row: dict) -> dict:
    view = dict(row)
    for key in ("output", "added_peak"):
        if f"{key}_bytes" in row:
            view[f"{key}_mib"] = f"{row[f'{key}_bytes'] / MIB:.0f}"
    for key, digits in (("limit_mib", 0), ("seconds", 2), ("gflops", 1)):
        if key in row:
            view[key] = f"{row[key]:.{digits}f}"
    return view


def markdown(machine: dict, command: str) -> str:
    """The session's rows as markdown tables with the machine and method in front."""
    lines = [
        "# hatkernels CPU benchmarks", "",
        f"Command: `{command}`  ",
        "Code: " + "; ".join(f"{k} {v}" for k, v in machine.items() if k in CODE_KEYS) + "  ",
        "Machine: " + ", ".join(f"{k} {v}" for k, v in machine.items() if k not in CODE_KEYS),
        "",
        "Every ratio is taken between two timings of the same round; rounds interleave the "
        "contenders (rotating their order); cells give the median (min–max) over rounds. "
        "GFLOP/s count valid-token FLOPs only (2·D·Σm·Σn). `timed on` is the slice a contender "
        "ran on (first images x first captions); its rate is that slice's FLOPs over its time, "
        "so a slow baseline timed on a slice compares with a kernel timed on the whole "
        "workload. `of FMA`: rate over the machine's float32 FMA peak, same round (row `fma`: "
        "12 independent chains of 512-bit FMAs, 256-bit without AVX-512, on every torch "
        "thread; a C loop compiled on the fly). `of GEMM`: rate over torch.mm of the packed "
        "valid tokens of the whole workload, same round. `x naive`: over "
        "`hatkernels.reference.naive_align` in float32 (same mode). `x torch`: over the torch "
        "backend (same mode). `cpu` runs the cpu backend with HATKERNELS_CPU_SCREEN=1 (the max "
        "forward screens with exact int8 codes where the CPU has AVX-512 VNNI; "
        "cpu_row_screening on the Code line says whether it did), `cpu-fp32` with "
        "HATKERNELS_CPU_SCREEN=0 (the float32 kernel alone); `x cpu fp32`: cpu over cpu-fp32, "
        "same round. `fwd+bwd / fwd`: time of forward+backward over forward, same backend, "
        "slice and round. `load`: the 1-minute load average when the row was "
        "measured (the machine is shared). `vs float64`: before the rounds, every contender "
        "runs on the same common slice (the smallest any of them is timed on) and its scores "
        "(and, fwd+bwd, both gradients) are compared with the float64 reference: relative "
        "Frobenius error, at most 1e-5 for scores and 1e-4 for gradients; each timed result "
        "is also checked against the torch backend's on the prefix both ran. A contender that "
        "raises or disagrees fails the run. Peers (`numkong`, `maxsim-cpu`: optional libraries, "
        "max t2i forward only; `note` says what each computes and on which captions) are "
        "checked the same way, but an approximate peer is reported (status `approximate`, its "
        "error in `vs float64`), and one that raises is reported as such, without failing the "
        "run.", "",
        "| " + " | ".join(c for c, _ in TIMING_COLUMNS) + " |",
        "|" + "---|" * len(TIMING_COLUMNS),
    ]
    for row in (r for r in ROWS if r.get("kind") != "memory"):
        cells = [_fmt(row.get(c), d) if d is not None else str(row.get(c, ""))
                 for c, d in TIMING_COLUMNS]
        lines.append("| " + " | ".join(cells) + " |")
    per_pair = [r for r in ROWS if "ms_per_pair" in r]
    if per_pair:
        lines += ["", "Time per pair: milliseconds per (image, caption) pair, every level of one "
                  "`hier_align` call (median (min–max) over the rounds), and that time "
                  "extrapolated linearly to the number of pairs named (hours; one process "
                  "on this machine at this load).", "",
                  "| " + " | ".join(c for c, _ in PER_PAIR_COLUMNS) + " |",
                  "|" + "---|" * len(PER_PAIR_COLUMNS)]
        lines += ["| " + " | ".join(_fmt(r.get(c), d) if d is not None else str(r.get(c, ""))
                                    for c, d in PER_PAIR_COLUMNS) + " |" for r in per_pair]
    memory = [_memory_view(r) for r in ROWS if r.get("kind") == "memory"]
    if memory:
        lines += ["", "Peak memory: added peak RSS of one forward call in a fresh process "
                  "(Linux VmHWM after clear_refs, minus VmRSS just before the call); "
                  "limit = 2 x output + 256 MiB.", "",
                  "| " + " | ".join(MEMORY_COLUMNS) + " |", "|" + "---|" * len(MEMORY_COLUMNS)]
        lines += ["| " + " | ".join(str(r.get(c, "")) for c in MEMORY_COLUMNS) + " |"
                  for r in memory]
    return "\n".join(lines) + "\n"


def _round(value: object) -> object:
    return float(f"{value:.4g}") if isinstance(value, float) else value


def _flat(row: dict, machine: dict) -> dict:
    flat = {}
    for key, value in row.items():
        if isinstance(value, list):
            flat.update({f"{key}_{s}": _round(v) for s, v in zip(("median", "min", "max"), value)})
        else:
            flat[key] = _round(value)
    return flat | machine


def write_results(directory: Path, command: str) -> None:
    """results.md, results.csv and results.json for this session's rows."""
    machine = machine_info()
    directory.mkdir(parents=True, exist_ok=True)
    (directory / "results.md").write_text(markdown(machine, command))
    flat = [_flat(r, machine) for r in ROWS]
    fields = list(dict.fromkeys(k for r in flat for k in r))
    with open(directory / "results.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=fields)
        writer.writeheader()
        writer.writerows(flat)
    payload = {"command": command, "machine": machine, "rows": [_flat(r, {}) for r in ROWS]}
    (directory / "results.json").write_text(json.dumps(payload, indent=1) + "\n")


if __name__ == "__main__":
    print(json.dumps(_memory_child(json.loads(sys.argv[1]))))
