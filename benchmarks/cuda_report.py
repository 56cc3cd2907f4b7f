"""GPU validation of the ``cuda`` backend: correctness, a sanitizer pass, timings.

Run on a CUDA machine with the project installed and built (it installs nothing)::

    python benchmarks/cuda_report.py --quick                  # a few minutes
    python benchmarks/cuda_report.py --out report.md          # the full GPU workload sizes
    compute-sanitizer --tool memcheck python benchmarks/cuda_report.py --sanitize
    compute-sanitizer --tool racecheck python benchmarks/cuda_report.py --sanitize

1. Correctness: every pooling x direction x reduce x dtype on small ragged inputs with NaN in
   the padding, scores and gradients against ``hatkernels.reference.naive_align`` in float64
   (the documented tolerances, PASS/FAIL); then realistic sizes against the torch backend.
2. ``--sanitize`` runs only tiny calls of every kernel (both dtypes paths, shared and global
   scratch) so that compute-sanitizer finishes in minutes.
3. Timings: the cuda backend, the triton backend and the naive way (where its block fits
   memory) side by side in interleaved rounds, reported as the median (range) and the median
   of the per-round cuda/triton ratios (target for max pooling: at most 1.5).

Importable and ``--help``-able without a GPU.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
from report_common import write_report

ROOT = Path(__file__).resolve().parents[1]
DEFAULT_OUT = ROOT / "benchmarks" / "results" / "cuda_report.md"
TOLERANCE = {torch.float32: (1e-5, 1e-4), torch.float16: (1e-2, 2e-2), torch.bfloat16: (1e-2, 2e-2)}
MODES = [
    (p, d, r) for p in ("max", "scan") for d in ("t2i", "i2t", "both") for r in ("mean", "sum")
]
NAIVE_BYTES = 8 << 30


def rel_err(a: torch.Tensor, b: torch.Tensor, floor: float = 1e-30) -> float:
    a, b = a.detach().double().cpu(), b.detach().double().cpu()
    return float((a - b).norm() / b.norm().clamp_min(floor))


def ragged(gen: torch.Generator, batch: int, size: int, dim: int, low: int = 1):
    """L2-normalised float64 tokens with NaN padding, and lengths in [low, size]."""
    x = torch.randn(batch, size, dim, generator=gen, dtype=torch.float64)
    x = x / x.norm(dim=-1, keepdim=True)
    lengths = torch.randint(min(low, size), size + 1, (batch,), generator=gen)
    lengths[0] = size
    x[torch.arange(size) >= lengths[:, None]] = float("nan")
    return x, lengths


def reference_check(pooling, direction, reduce, dtype, seed: int = 0) -> tuple[bool, list[float]]:
    """cuda vs float64 naive on 2 ragged levels; returns (pass, [score, grad...] errors)."""
    from hatkernels import hier_align
    from hatkernels.reference import naive_hier_align

    gen = torch.Generator().manual_seed(seed)
    levels = [(49, 32, 72), (9, 13, 24)]
    sides = (
        [ragged(gen, 21, m, d) for m, _, d in levels],
        [ragged(gen, 27, n, d) for _, n, d in levels],
    )
    (vs, vls), (ts, tls) = (list(zip(*side)) for side in sides)
    vs, ts = [v.to(dtype) for v in vs], [t.to(dtype) for t in ts]
    ref_in = [[x.double().requires_grad_(True) for x in s] for s in (vs, ts)]
    cuda_in = [[x.cuda().requires_grad_(True) for x in s] for s in (vs, ts)]
    kw = dict(pooling=pooling, direction=direction, reduce=reduce, weights=[1.0, 0.5])
    ref = naive_hier_align(*ref_in, list(vls), list(tls), **kw)
    out = hier_align(
        *cuda_in,
        image_lengths=[x.cuda() for x in vls],
        text_lengths=[x.cuda() for x in tls],
        backend="cuda",
        **kw,
    )
    cot = torch.randn(ref.shape, generator=gen, dtype=torch.float64)
    ref_g = torch.autograd.grad(ref, ref_in[0] + ref_in[1], cot)
    out_g = torch.autograd.grad(out, cuda_in[0] + cuda_in[1], cot.float().cuda())
    errs = [rel_err(out, ref)]
    ok = errs[0] <= TOLERANCE[dtype][0]
    for g, r, x in zip(out_g, ref_g, vs + ts):
        g = g.cpu()
        ok &= bool((g[~torch.isfinite(x)] == 0).all()) and bool(torch.isfinite(g).all())
        errs.append(rel_err(g, torch.nan_to_num(r), floor=1e-3 * float(cot.norm())))
        ok &= errs[-1] <= TOLERANCE[dtype][1]
    return ok, errs


def reference_table() -> list[str]:
    lines = [
        "| pooling | direction | reduce | dtype | result | rel err: scores, grads |",
        "|---|---|---|---|---|---|",
    ]
    for pooling, direction, reduce in MODES:
        for dtype in (torch.float32, torch.float16, torch.bfloat16):
            ok, errs = reference_check(pooling, direction, reduce, dtype)
            lines.append(
                f"| {pooling} | {direction} | {reduce} | {dtype} | "
                f"{'PASS' if ok else 'FAIL'} | {', '.join(f'{e:.1e}' for e in errs)} |"
            )
    return lines


@dataclass
class Workload:
    """One scoring call of a named workload: levels of (M, N, D), caption lengths 8-32 of N."""

    name: str
    images: int
    texts: int
    levels: list[tuple[int, int, int]]
    pooling: str
    direction: str
    reduce: str
    backward: bool = False

    def make(self, dtype: torch.dtype, seed: int = 0) -> None:
        gen = torch.Generator(device="cuda").manual_seed(seed)
        n = self.levels[0][1]
        self.text_lengths = torch.randint(
            min(8, n), n + 1, (self.texts,), generator=gen, device="cuda"
        )
        self.v, self.t = [], []
        for m, n, d in self.levels:
            v = torch.randn(self.images, m, d, generator=gen, device="cuda", dtype=dtype)
            t = torch.randn(self.texts, n, d, generator=gen, device="cuda", dtype=dtype)
            self.v.append((v / v.norm(dim=-1, keepdim=True)).requires_grad_(self.backward))
            self.t.append((t / t.norm(dim=-1, keepdim=True)).requires_grad_(self.backward))

    def flops(self) -> float:
        words = float(self.text_lengths.sum())
        return sum(2.0 * d * self.images * m * words for m, _, d in self.levels)

    def call(self, backend: str) -> object:
        from hatkernels import hier_align

        with torch.set_grad_enabled(self.backward):
            out = hier_align(
                self.v,
                self.t,
                text_lengths=self.text_lengths,
                pooling=self.pooling,
                direction=self.direction,
                reduce=self.reduce,
                backend=backend,
            )
            if self.backward:
                return torch.autograd.grad(out.sum(), self.v + self.t)
            return out

    def naive(self) -> Callable[[], object] | None:
        from hatkernels.reference import naive_align

        if len(self.levels) > 1 or self.backward:
            return None
        (v,), (t,) = self.v, self.t
        chunk = NAIVE_BYTES // (self.texts * v.shape[1] * t.shape[1] * v.element_size() * 4)
        if chunk < 1:
            return None
        vl = torch.full((v.shape[0],), v.shape[1], device="cuda")
        return lambda: naive_align(
            v,
            t,
            vl,
            self.text_lengths,
            pooling=self.pooling,
            direction=self.direction,
            reduce=self.reduce,
            chunk=int(chunk),
        )


def workloads(quick: bool) -> list[Workload]:
    g = (1000, 5000) if quick else (5000, 25000)
    hat = (200, 1000) if quick else (1000, 5000)
    return [
        Workload("G1 max t2i mean", *g, [(49, 32, 1024)], "max", "t2i", "mean"),
        Workload("G3 TERAN max t2i sum", *g, [(36, 32, 1024)], "max", "t2i", "sum"),
        Workload("max i2t mean", *g, [(49, 32, 1024)], "max", "i2t", "mean"),
        Workload("scan i2t mean (49 tokens)", *g, [(49, 32, 768)], "scan", "i2t", "mean"),
        Workload(
            "G2 HAT 3 levels (reduced gallery)",
            *hat,
            [(784, 32, 768), (196, 32, 768), (49, 32, 768)],
            "scan",
            "i2t",
            "mean",
        ),
        Workload("T1 max fwd+bwd", 128, 640, [(49, 32, 768)], "max", "t2i", "mean", True),
        Workload("T1 scan fwd+bwd", 128, 640, [(49, 32, 768)], "scan", "i2t", "mean", True),
    ]


def _timed(fn: Callable[[], object]) -> float:
    torch.cuda.synchronize()
    start = time.perf_counter()
    fn()
    torch.cuda.synchronize()
    return time.perf_counter() - start


def _fmt(ts: list[float], scale: float = 1e3) -> str:
    return f"{scale * statistics.median(ts):.2f} ({scale * min(ts):.2f}-{scale * max(ts):.2f})"


def bench(w: Workload, rounds: int, dtype: torch.dtype) -> list[str]:
    from hatkernels import available_backends

    w.make(dtype)
    rows: dict[str, Callable[[], object]] = {"cuda": lambda: w.call("cuda")}
    if "triton" in available_backends("cuda"):
        rows["triton"] = lambda: w.call("triton")
    naive = w.naive()
    if naive is not None:
        rows["naive"] = naive
    agree = ""
    if "triton" in rows and not w.backward:
        agree = f"{rel_err(w.call('cuda'), w.call('triton')):.1e}"
    for fn in rows.values():  # warm-up (Triton compiles and autotunes here)
        fn()
    times: dict[str, list[float]] = {name: [] for name in rows}
    for r in range(rounds):
        names = list(rows)[r % len(rows) :] + list(rows)[: r % len(rows)]  # rotate the order
        for name in names:
            times[name].append(_timed(rows[name]))
    lines = []
    for name, ts in times.items():
        ratio = ""
        if name == "cuda" and "triton" in times:
            ratio = f"{statistics.median(a / b for a, b in zip(ts, times['triton'])):.2f}"
        tflops = "" if w.backward else f"{w.flops() / statistics.median(ts) / 1e12:.1f}"
        lines.append(
            f"| {w.name} | {name} | {_fmt(ts)} | {tflops} | {ratio} | "
            f"{agree if name == 'cuda' else ''} |"
        )
    del w.v, w.t
    torch.cuda.empty_cache()
    return lines


def sanitize() -> None:
    """Tiny calls of every kernel: dtypes, directions, reduces, shared and global scratch."""
    from hatkernels import hier_align

    gen = torch.Generator().manual_seed(3)
    shapes = [(5, 7, [(13, 11, 24)]), (2, 3, [(300, 20, 16)]), (1, 2, [(3, 130, 9)])]
    for n_i, n_t, levels in shapes:
        for dtype in (torch.float32, torch.float16, torch.bfloat16):
            for pooling, direction, reduce in MODES:
                ((m, n, d),) = levels
                v, vl = ragged(gen, n_i, m, d)
                t, tl = ragged(gen, n_t, n, d)
                v = v.to(dtype).cuda().requires_grad_(True)
                t = t.to(dtype).cuda().requires_grad_(True)
                out = hier_align(
                    v,
                    t,
                    image_lengths=vl.cuda(),
                    text_lengths=tl.cuda(),
                    pooling=pooling,
                    direction=direction,
                    reduce=reduce,
                    backend="cuda",
                )
                torch.autograd.grad(out.sum(), (v, t))
    torch.cuda.synchronize()
    print("sanitize: every kernel ran on tiny inputs")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="smaller galleries (5x fewer)")
    parser.add_argument("--rounds", type=int, default=5, help="interleaved timing rounds")
    parser.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float16", "float32"])
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT, help="markdown report path")
    parser.add_argument(
        "--sanitize",
        action="store_true",
        help="only run tiny calls of every kernel (under compute-sanitizer)",
    )
    parser.add_argument("--skip-timing", action="store_true", help="correctness only")
    args = parser.parse_args(argv)
    if not torch.cuda.is_available():
        print("cuda_report: no CUDA GPU available", file=sys.stderr)
        return 2
    from hatkernels.dispatch import not_supported_reasons

    why = not_supported_reasons(torch.device("cuda"), torch.float32, (64,))["cuda"]
    if why:
        print(f"cuda_report: the cuda backend cannot run: {'; '.join(why)}", file=sys.stderr)
        return 2
    if args.sanitize:
        sanitize()
        return 0
    dtype = getattr(torch, args.dtype)
    report = [
        f"# cuda backend report ({torch.cuda.get_device_name()}, torch {torch.__version__})",
        "",
        "## Correctness against the float64 naive reference",
        "",
        *reference_table(),
    ]
    if not args.skip_timing:
        report += [
            "",
            f"## Timings ({args.dtype}, {args.rounds} interleaved rounds, ms)",
            "",
            "| workload | backend | ms median (range) | TFLOP/s (valid tokens) | "
            "cuda/triton | rel err vs triton |",
            "|---|---|---|---|---|---|",
        ]
        for w in workloads(args.quick):
            report += bench(w, args.rounds, dtype)
            print("\n".join(report[-3:]), flush=True)
    report += [
        "",
        "Sanitizer: `compute-sanitizer --tool memcheck python benchmarks/cuda_report.py "
        "--sanitize` (also `--tool racecheck`, `--tool synccheck`).",
    ]
    write_report(args.out, report)
    return 0


if __name__ == "__main__":
    sys.exit(main())
