"""The shape sweep as a chart: every contender's rate as a fraction of the machine's float32
FMA peak measured in the same rounds, at every sweep point, max and scan pooling (median over
the rounds, bars from min to max).

    python benchmarks/plot_sweep.py [results.json] [sweep.png]

reads ``benchmarks/results/results.json`` and writes ``benchmarks/results/sweep.png`` by
default; the full benchmark run (``pytest benchmarks/ --benchmark``) calls it when it timed the
sweep.
"""

from __future__ import annotations

import json
import sys
import textwrap
from pathlib import Path

RESULTS = Path(__file__).resolve().parent / "results"
# Drawing order and colours; contenders not listed come after, in the default cycle.
ORDER = ["gemm", "cpu", "cpu-fp32", "torch", "naive", "numkong", "maxsim-cpu"]
PEERS = ("numkong", "maxsim-cpu")  # hatched: libraries that are not part of this project


def sweep_rows(payload: dict) -> dict[str, list[dict]]:
    """The sweep's forward rows with a ratio to the FMA peak, by pooling (max, scan)."""
    out: dict[str, list[dict]] = {}
    for row in payload["rows"]:
        if (str(row.get("workload", "")).startswith("S ") and row.get("mode") == "fwd"
                and row.get("of_fma_median") is not None):
            out.setdefault(row["op"].split("_")[0], []).append(row)
    return out


def plot(results: Path = RESULTS / "results.json", out: Path = RESULTS / "sweep.png") -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    payload = json.loads(results.read_text())
    by_pooling = sweep_rows(payload)
    if not by_pooling:
        raise SystemExit(f"{results}: no sweep rows (run the full benchmark with the sweep)")
    fig, axes = plt.subplots(len(by_pooling), 1, figsize=(10, 3.6 * len(by_pooling)),
                             squeeze=False)
    for ax, (_, rows) in zip(axes[:, 0], sorted(by_pooling.items())):
        points = list(dict.fromkeys(r["workload"] for r in rows))
        names = list(dict.fromkeys(r["backend"] for r in rows))
        names.sort(key=lambda n: ORDER.index(n) if n in ORDER else len(ORDER))
        width = 0.8 / len(names)
        for k, name in enumerate(names):
            xs, ys, lo, hi = [], [], [], []
            for i, point in enumerate(points):
                row = next((r for r in rows if r["workload"] == point and r["backend"] == name),
                           None)
                if row is None:
                    continue
                med = row["of_fma_median"]
                xs.append(i - 0.4 + width * (k + 0.5))
                ys.append(med)
                lo.append(med - row.get("of_fma_min", med))
                hi.append(row.get("of_fma_max", med) - med)
            approximate = any(r["backend"] == name and r.get("status") == "approximate"
                              for r in rows)
            ax.bar(xs, ys, width, yerr=[lo, hi], capsize=2,
                   label=name + (" (approximate)" if approximate else ""),
                   hatch="//" if name in PEERS else None)
        ax.set_xticks(range(len(points)), [p.removeprefix("S ") for p in points])
        ax.set_ylabel("fraction of FMA peak")
        ax.set_title(f"{rows[0]['op']}, forward: shape sweep (base 64 x 49 vs 320 x 8-32, "
                     "D 256; one size changed)", fontsize=10)
        ax.axhline(1.0, color="black", linewidth=0.8, linestyle="--")
        top = max(max(r.get("of_fma_max", 0), r["of_fma_median"]) for r in rows)
        ax.set_ylim(0, 1.3 * max(1.0, top))
        ax.grid(axis="y", alpha=0.3)
        ax.legend(fontsize=8, ncol=len(names), loc="upper right")
    machine = payload.get("machine", {})
    footer = (f"{payload.get('command', '')}; commit {machine.get('commit', '?')}; "
              f"{machine.get('cpu_model', '')}, {machine.get('cores', '?')} cores; written "
              f"{machine.get('written', '?')}. Bars: median over rounds; whiskers: min-max; "
              "the rates of one round are divided by the FMA peak timed in the same round "
              "(dashed line: 1). Rates count the float32 FLOPs of every valid token pair; a "
              "method that "
              "screens with int8 codes skips most of them and can pass 1.")
    lines = textwrap.wrap(footer, 150)
    fig.text(0.01, 0.005, "\n".join(lines), fontsize=6.5)
    fig.tight_layout(rect=(0, 0.01 + 0.0135 * len(lines) * 7.2 / fig.get_figheight(), 1, 1))
    fig.savefig(out, dpi=110)
    plt.close(fig)
    return out


if __name__ == "__main__":
    args = [Path(a) for a in sys.argv[1:3]]
    print(plot(*args))
