"""Writes the Results section of docs/performance.md from benchmarks/results/results.json.

The section's tables are generated, not copied by hand: after a full run of the CPU
benchmarks, run::

    python benchmarks/results_section.py

It replaces the text between the ``results:begin`` and ``results:end`` markers of
docs/performance.md (the hand-written reading of the tables stays below the end marker).
"""

from __future__ import annotations

import json
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
BEGIN, END = "<!-- results:begin -->", "<!-- results:end -->"
MAX, SCAN = "max_align t2i mean", "scan_align i2t mean"
SWEEP = ["S base", "S Bi=16", "S Bt=1280", "S M=144", "S D=64", "S D=768"]
FWD_HEAD = ("| contender | timed on | GFLOP/s | of FMA | of GEMM | x naive | x torch | x cpu-fp32 "
            "| vs float64 |\n|---|---|---|---|---|---|---|---|---|")
BWD_HEAD = ("| contender | timed on | GFLOP/s | x naive | x torch | fwd+bwd / fwd | vs float64 |\n"
            "|---|---|---|---|---|---|---|")


def cell(row: dict | None, key: str, digits: int = 2) -> str:
    """``median (min–max)`` of one statistic of a row, or the median alone when all agree."""
    if not row or row.get(f"{key}_median") is None:
        return ""
    med, lo, hi = (f"{row[f'{key}_{s}']:.{digits}f}" for s in ("median", "min", "max"))
    return med if lo == hi == med else f"{med} ({lo}–{hi})"


class Rows:
    def __init__(self, payload: dict):
        self.timing = [r for r in payload["rows"] if "kind" not in r]
        self.memory = [r for r in payload["rows"] if r.get("kind") == "memory"]

    def get(self, op: str, mode: str, workload: str, backend: str) -> dict | None:
        for r in self.timing:
            if (r["op"], r["mode"], r["workload"], r["backend"]) == (op, mode, workload, backend):
                return r
        return None

    def select(self, op: str, mode: str, workload: str) -> list[dict]:
        return [r for r in self.timing
                if (r["op"], r["mode"], r["workload"]) == (op, mode, workload)]


def _intro(payload: dict, rows: Rows) -> str:
    m = payload["machine"]
    loads = sorted({r["load"] for r in rows.timing if r["workload"] in ("W1", "W1 near-tie")})
    return (f"`{payload['command']}`, 5 rounds (3 for the sweep and W6), at commit {m['commit']} "
            f"(files differing from it when the run started: {m['uncommitted']}; cpu extension "
            f"built {m['cpu_extension_built']}, {m['cpu_kernels']}), on a 2-core "
            f"{m['cpu_model']} shared virtual machine, torch {m['torch']}; started "
            f"{m['started']}, tables written {m['written']}. The load average was "
            f"{loads[0]}–{loads[-1]} while the W1 rows were measured. The same-round ratios are "
            "the figures to read, and even they move with the load (the ranges show how much).")


def _headline(rows: Rows) -> list[str]:
    out = ["**The cpu backend on W1** (median (range) over the rounds; `cpu` screens the max "
           "forward, `cpu-fp32` is the float32 kernel alone):", "",
           "| W1 | of FMA peak | of GEMM rate | x naive | x torch backend | x cpu-fp32 "
           "| fwd+bwd / fwd |", "|---|---|---|---|---|---|---|"]
    cases = [(MAX, "cpu"), (MAX, "cpu-fp32"), (SCAN, "cpu"),
             ("scan_align t2i mean", "cpu"), ("scan_align both mean", "cpu")]
    for op, backend in cases:
        r, b = rows.get(op, "fwd", "W1", backend), rows.get(op, "fwd+bwd", "W1", backend)
        if r is None:
            continue
        name = f"{op.split('_')[0]} {op.split(' ', 1)[1]}, {backend}"
        out.append(f"| {name} | {cell(r, 'of_fma')} | {cell(r, 'of_gemm')} | "
                   f"{cell(r, 'x_naive')} | {cell(r, 'x_torch')} | {cell(r, 'x_cpu_fp32')} | "
                   f"{cell(b, 'fwdbwd_over_fwd')} |")
    return out


def _contenders(rows: Rows) -> list[str]:
    out = ["**Every contender on W1.** `fma` and `gemm` are the machine's rates in the same "
           "rounds; `vs float64` is the check on the common slice (relative error of the "
           "scores and of both gradients)."]
    tables = [(MAX, "fwd", "W1", "max t2i mean, forward"),
              (MAX, "fwd+bwd", "W1", "max t2i mean, forward + backward"),
              (MAX, "fwd", "W1 near-tie", "max t2i mean, forward, W1 near-tie"),
              (SCAN, "fwd", "W1", "scan i2t mean, forward"),
              (SCAN, "fwd+bwd", "W1", "scan i2t mean, forward + backward"),
              ("scan_align t2i mean", "fwd", "W1", "scan t2i mean, forward"),
              ("scan_align both mean", "fwd", "W1", "scan both mean, forward")]
    for op, mode, workload, title in tables:
        selected = rows.select(op, mode, workload)
        if not selected:
            continue
        out += ["", f"**{title}**", "", FWD_HEAD if mode == "fwd" else BWD_HEAD]
        for r in selected:
            columns = 9 if mode == "fwd" else 7
            if r.get("status", "ok") not in ("ok", "approximate"):
                out.append(f"| {r['backend']} | {r['status']} |" + " |" * (columns - 2))
                continue
            head = f"| {r['backend']} | {r.get('timed_on', '')} | {cell(r, 'gflops', 1)} | "
            if mode == "fwd":
                out.append(head + f"{cell(r, 'of_fma')} | {cell(r, 'of_gemm')} | "
                           f"{cell(r, 'x_naive')} | {cell(r, 'x_torch')} | "
                           f"{cell(r, 'x_cpu_fp32')} | {r.get('vs_float64', '')} |")
            else:
                out.append(head + f"{cell(r, 'x_naive')} | {cell(r, 'x_torch')} | "
                           f"{cell(r, 'fwdbwd_over_fwd')} | {r.get('vs_float64', '')} |")
    return out


def _w6_memory_sweep(rows: Rows) -> list[str]:
    out = ["", "**W6 (HAT shapes, three levels, scan i2t mean, D = 768): time per pair** and the "
           "time to score Flickr30K's test split (1,000 x 5,000 = 5 M pairs) at that rate, one "
           "process:", "", "| contender | timed on | ms per pair | hours for 5 M pairs | of FMA |",
           "|---|---|---|---|---|"]
    for r in rows.timing:
        if r["workload"] == "W6 HAT" and "ms_per_pair_median" in r:
            out.append(f"| {r['backend']} | {r['timed_on']} | {cell(r, 'ms_per_pair', 3)} | "
                       f"{cell(r, 'extrapolated_h', 2)} | {cell(r, 'of_fma')} |")
    out += ["", "**Memory on W2** (1,000 images x 10,000 captions, D = 32; one forward call in "
            "a fresh process):", "", "| cpu backend, W2 | output | added peak | limit | one call |",
            "|---|---|---|---|---|"]
    for r in rows.memory:
        if r["backend"] == "cpu":
            out.append(f"| {r['op'].replace('_align', '')} | {r['output_bytes'] / 2**20:.0f} MiB "
                       f"| {r['added_peak_bytes'] / 2**20:.0f} MiB | {r['limit_mib']:.0f} MiB | "
                       f"{r['seconds']:.1f} s |")
    out += ["", "**Shape sweep, forward** (one size of the base changed at a time; fraction of "
            "the FMA peak, and for max the screened kernel over the float32 one and the peers' "
            "rates):", "", "| shape | max cpu: of FMA | max cpu-fp32: of FMA | max: x cpu-fp32 "
            "| numkong: of FMA | maxsim-cpu: of FMA | scan cpu: of FMA | scan cpu: of GEMM |",
            "|---|---|---|---|---|---|---|---|"]
    for workload in [w for w in SWEEP if rows.select(MAX, "fwd", w) or rows.select(SCAN, "fwd", w)]:
        def get(op, backend, w=workload):
            return rows.get(op, "fwd", w, backend)

        mc, mf = get(MAX, "cpu"), get(MAX, "cpu-fp32")
        out.append(f"| {workload[2:]} | {cell(mc, 'of_fma')} | {cell(mf, 'of_fma')} | "
                   f"{cell(mc, 'x_cpu_fp32')} | {cell(get(MAX, 'numkong'), 'of_fma')} | "
                   f"{cell(get(MAX, 'maxsim-cpu'), 'of_fma') or 'skipped'} | "
                   f"{cell(get(SCAN, 'cpu'), 'of_fma')} | {cell(get(SCAN, 'cpu'), 'of_gemm')} |")
    return out


def section(payload: dict) -> str:
    """The Markdown between the markers for one results.json payload."""
    rows = Rows(payload)
    out = [_intro(payload, rows), "", *_headline(rows), "", *_contenders(rows),
           *_w6_memory_sweep(rows)]
    return "\n".join(out) + "\n"


def main() -> None:
    payload = json.loads((ROOT / "benchmarks" / "results" / "results.json").read_text())
    doc = ROOT / "docs" / "performance.md"
    text = doc.read_text()
    head, rest = text.split(BEGIN, 1)
    _, tail = rest.split(END, 1)
    doc.write_text(f"{head}{BEGIN}\n{section(payload)}{END}{tail}")


if __name__ == "__main__":
    main()
