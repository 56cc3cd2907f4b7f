"""GPU validation of the triton backend: correctness at realistic sizes, then timings.

Run on a CUDA machine with the project installed (it installs nothing)::

    python benchmarks/gpu_report.py --quick            # under ~5 minutes
    python benchmarks/gpu_report.py --out report.md    # full GPU workload sizes
    TRITON_INTERPRET=1 python benchmarks/gpu_report.py --smoke --out /tmp/r.md  # no GPU:
                                                       # tiny sizes, checks the script itself

Every timed row of a workload is measured in the same run, interleaved over ``--rounds``
rounds, and reported as the median (range): the triton backend, the naive way
(``hatkernels.reference.naive_align`` in the input dtype, where it fits memory), the torch
backend, and the ceiling: the time of the workload's valid-token similarity FLOPs at the rate
that cuBLAS reaches on a large bf16 GEMM of the same ``D``. Writes a markdown report to
``--out``. Importable and ``--help``-able without a GPU.
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch
from report_common import write_report

ROOT = Path(__file__).resolve().parents[1]
DEFAULT_OUT = ROOT / "benchmarks" / "results" / "gpu_report.md"
NAIVE_BYTES = 8 << 30  # the naive way's [chunk, Bt, M, N] block, at most


@dataclass
class Workload:
    """One scoring call of a named GPU workload: levels of (M, D), caption sizes, settings."""

    name: str
    images: int
    texts: int
    levels: list[tuple[int, int, int]]  # (M, N, D) per level
    pooling: str
    direction: str
    reduce: str
    min_words: int = 8
    ragged: bool = False  # ragged images too, and NaN in every padded token
    tensors: dict = field(default_factory=dict)

    def make(self, device: str, dtype: torch.dtype, seed: int = 0) -> None:
        gen = torch.Generator(device=device).manual_seed(seed)
        t_len = torch.randint(self.min_words, self.levels[0][1] + 1, (self.texts,),
                              generator=gen, device=device)
        images, texts, v_lens = [], [], []
        for m, n, d in self.levels:
            v = torch.randn(self.images, m, d, generator=gen, device=device, dtype=dtype)
            t = torch.randn(self.texts, n, d, generator=gen, device=device, dtype=dtype)
            v, t = v / v.norm(dim=-1, keepdim=True), t / t.norm(dim=-1, keepdim=True)
            v_len = torch.full((self.images,), m, device=device)
            if self.ragged:
                v_len = torch.randint(max(1, m // 2), m + 1, (self.images,), generator=gen,
                                      device=device)
                v[torch.arange(m, device=device) >= v_len[:, None]] = float("nan")
                t[torch.arange(n, device=device) >= t_len[:, None]] = float("nan")
            images.append(v)
            texts.append(t)
            v_lens.append(v_len)
        self.tensors = dict(images=images, texts=texts, text_lengths=t_len,
                            image_lengths=v_lens)

    def flops(self) -> float:
        """Similarity FLOPs on valid tokens: ``2 D sum(m) sum(n)`` summed over levels."""
        words = float(self.tensors["text_lengths"].sum())
        return sum(2.0 * d * float(v_len.sum()) * words
                   for (_, _, d), v_len in zip(self.levels, self.tensors["image_lengths"]))

    def call(self, backend: str, requires_grad: bool = False) -> torch.Tensor:
        from hatkernels import hier_align

        images = [x.requires_grad_(requires_grad) for x in self.tensors["images"]]
        texts = [x.requires_grad_(requires_grad) for x in self.tensors["texts"]]
        return hier_align(images, texts, image_lengths=self.tensors["image_lengths"],
                          text_lengths=self.tensors["text_lengths"], pooling=self.pooling,
                          direction=self.direction, reduce=self.reduce, backend=backend)

    def naive(self) -> torch.Tensor | None:
        """The naive way in the input dtype, or None when its block cannot fit memory."""
        from hatkernels.reference import naive_align

        out = 0
        for v, t, vl in zip(self.tensors["images"], self.tensors["texts"],
                            self.tensors["image_lengths"]):
            per_image = self.texts * v.shape[1] * t.shape[1] * v.element_size() * 4
            chunk = NAIVE_BYTES // per_image
            if chunk < 1:
                return None
            out = out + naive_align(v, t, vl, self.tensors["text_lengths"],
                                    pooling=self.pooling, direction=self.direction,
                                    reduce=self.reduce, chunk=int(chunk))
        return out


def workloads(mode: str) -> list[Workload]:
    """The named GPU workloads (G1-G3); ``quick`` cuts the gallery sizes (ratios stay comparable),
    ``smoke`` runs tiny ones (the script's own check, on CPU under the interpreter)."""
    g = {"smoke": (6, 10), "quick": (1000, 5000), "full": (5000, 25000)}[mode]
    hat = {"smoke": (3, 5), "quick": (500, 2500), "full": (5000, 25000)}[mode]
    d_max, d_hat = (16, 16) if mode == "smoke" else (1024, 768)
    levels = [(40, 32, d_hat), (20, 32, d_hat), (9, 32, d_hat)] if mode == "smoke" else \
        [(784, 32, d_hat), (196, 32, d_hat), (49, 32, d_hat)]
    return [
        Workload("G1 max t2i mean", *g, [(49, 32, d_max)], "max", "t2i", "mean"),
        Workload("G3 TERAN max t2i sum", *g, [(36, 32, d_max)], "max", "t2i", "sum"),
        Workload("scan i2t mean (49 tokens)", *g, [(49, 32, d_hat)], "scan", "i2t", "mean"),
        Workload("G2 HAT 3 levels scan i2t mean", *hat, levels, "scan", "i2t", "mean"),
    ]


def _sync() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def _sync_time(fn: Callable[[], object]) -> float:
    _sync()
    start = time.perf_counter()
    fn()
    _sync()
    return time.perf_counter() - start


def gemm_rate(dim: int, dtype: torch.dtype, device: str, size: int = 16384) -> float:
    """FLOP/s of cuBLAS on ``[size, dim] x [dim, size]`` (the ceiling's rate)."""
    a = torch.randn(size, dim, device=device, dtype=dtype)
    b = torch.randn(dim, size, device=device, dtype=dtype)
    out = torch.empty(size, size, device=device, dtype=dtype)
    torch.mm(a, b, out=out)
    best = min(_sync_time(lambda: torch.mm(a, b, out=out)) for _ in range(5))
    return 2.0 * size * size * dim / best


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.double() - b.double()).norm() / b.double().norm().clamp_min(1e-30))


def time_rows(rows: dict[str, Callable[[], object]], rounds: int) -> dict[str, list[float]]:
    """Interleaved rounds: each round times every row once, side by side."""
    for fn in rows.values():  # warm up: compilation and autotuning
        fn()
    times: dict[str, list[float]] = {name: [] for name in rows}
    for _ in range(rounds):
        for name, fn in rows.items():
            times[name].append(_sync_time(fn))
    return times


def _fmt(ts: list[float]) -> str:
    return f"{1e3 * statistics.median(ts):.1f} ({1e3 * min(ts):.1f}-{1e3 * max(ts):.1f})"


def check_correctness(dtype: torch.dtype, device: str, smoke: bool) -> list[str]:
    """Triton vs torch backend at realistic sizes: scores and gradients of every mode."""
    lines = ["| check | rel err scores | rel err grads (images, texts per level) "
             "| grads 0 on NaN padding |", "|---|---|---|---|"]
    n_images, n_texts = (3, 4) if smoke else (64, 320)
    levels = [(20, 8, 12), (9, 8, 12)] if smoke else [(196, 32, 768), (49, 32, 768)]
    for pooling in ("max", "scan"):
        for direction in ("t2i", "i2t", "both"):
            w = Workload("check", n_images, n_texts, levels, pooling, direction, "mean",
                         min_words=2, ragged=True)
            w.make(device, dtype, seed=1)
            cot = torch.randn(n_images, n_texts, device=device)
            results = []
            for backend in ("triton", "torch"):
                out = w.call(backend, requires_grad=True)
                grads = torch.autograd.grad(out, w.tensors["images"] + w.tensors["texts"], cot)
                results.append((out.detach(), grads))
            (out, grads), (ref, ref_grads) = results
            g_err = [rel_err(g, r) for g, r in zip(grads, ref_grads)]
            inputs = w.tensors["images"] + w.tensors["texts"]
            zero = all(bool((g[x.isnan()] == 0).all()) for g, x in zip(grads, inputs))
            lines.append(f"| {pooling} {direction} mean, {str(dtype)[6:]} | "
                         f"{rel_err(out, ref):.2e} | "
                         + ", ".join(f"{e:.2e}" for e in g_err) + f" | {zero} |")
    return lines


def bench_workload(w: Workload, rate: float, rounds: int, with_naive: bool) -> list[str]:
    flops = w.flops()
    ceiling = flops / rate
    rows: dict[str, Callable[[], object]] = {"triton": lambda: w.call("triton")}
    if w.name.startswith("G2"):
        rows_note = "torch backend skipped (minutes at this size)"
    else:
        rows["torch backend"] = lambda: w.call("torch")
        rows_note = ""
    if with_naive and len(w.levels) == 1:
        rows["naive"] = w.naive
    with torch.no_grad():
        times = time_rows(rows, rounds)
        triton_out = w.call("triton")
        errs = {"triton": f"{rel_err(triton_out, w.call('torch')):.1e}"} \
            if "torch backend" in rows else {}
    lines = []
    base = statistics.median(times["triton"])
    for name, ts in times.items():
        med = statistics.median(ts)
        lines.append(f"| {w.name} | {name} | {_fmt(ts)} | {flops / med / 1e12:.3g} | "
                     f"{ceiling / med:.2f} | {med / base:.2f} | {errs.get(name, '')} |")
    lines.append(f"| {w.name} | GEMM ceiling | {1e3 * ceiling:.1f} | {rate / 1e12:.3g} | 1.00 "
                 f"| {ceiling / base:.2f} | {rows_note} |")
    return lines


def peak_memory(w: Workload) -> list[str]:
    """Peak allocated during HAT's 3-level scoring vs inputs + output + 1 GiB (target)."""
    inputs = sum(x.numel() * x.element_size() for x in w.tensors["images"] + w.tensors["texts"])
    output = w.images * w.texts * 4
    if not torch.cuda.is_available():
        elapsed = _sync_time(lambda: w.call("triton"))
        return [f"- {w.name} ({w.images} x {w.texts}): {elapsed:.2f} s; no CUDA, no memory "
                "statistics"]
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    before = torch.cuda.memory_allocated()
    with torch.no_grad():
        elapsed = _sync_time(lambda: w.call("triton"))
    peak = torch.cuda.max_memory_allocated() - before
    torch.cuda.empty_cache()
    limit = output + (1 << 30)
    return [f"- {w.name} ({w.images} x {w.texts}): {elapsed:.2f} s (target < 30 s at 5,000 x "
            f"25,000); inputs {inputs / 2**30:.2f} GiB; peak beyond the inputs "
            f"{peak / 2**30:.2f} GiB (limit: output + 1 GiB = {limit / 2**30:.2f} GiB): "
            f"{'OK' if peak <= limit else 'OVER'}"]


def backward_ratio(rounds: int, device: str, mode: str) -> list[str]:
    """Forward vs forward + backward, bfloat16: T1 (a training step) for max and scan, and in the
    full run max pooling at G1's COCO-5K scale too."""
    lines = ["| workload | forward ms | forward+backward ms | backward / forward |",
             "|---|---|---|---|"]
    t1 = (4, 6, [(9, 8, 16)]) if mode == "smoke" else (128, 640, [(49, 32, 768)])
    cases = [("T1", *t1, "max", "t2i"), ("T1", *t1, "scan", "i2t")]
    if mode == "full":
        cases.append(("G1", 5000, 25000, [(49, 32, 1024)], "max", "t2i"))
    for name, n_images, n_texts, levels, pooling, direction in cases:
        w = Workload(name, n_images, n_texts, levels, pooling, direction, "mean", min_words=2)
        w.make(device, torch.bfloat16, seed=2)

        def fwd(w=w):
            with torch.no_grad():
                return w.call("triton")

        def fwd_bwd(w=w):
            out = w.call("triton", requires_grad=True)
            torch.autograd.grad(out.sum(), w.tensors["images"] + w.tensors["texts"])

        times = time_rows({"fwd": fwd, "fwd+bwd": fwd_bwd}, rounds)
        f, fb = statistics.median(times["fwd"]), statistics.median(times["fwd+bwd"])
        lines.append(f"| {name} {pooling} {direction} mean ({n_images} x {n_texts}) | "
                     f"{1e3 * f:.2f} | {1e3 * fb:.2f} | {(fb - f) / f:.2f} |")
        w.tensors = {}
    return lines


def _machine() -> str:
    import triton

    try:
        commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT,
                                capture_output=True, text=True).stdout.strip()
    except OSError:
        commit = "?"
    name = torch.cuda.get_device_name() if torch.cuda.is_available() else \
        "CPU under TRITON_INTERPRET=1 (a smoke run: timings mean nothing)"
    return f"{name}, torch {torch.__version__}, triton {triton.__version__}, commit {commit or '?'}"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT, help="markdown report path")
    parser.add_argument("--quick", action="store_true",
                        help="reduced gallery sizes and rounds (under ~5 minutes)")
    parser.add_argument("--smoke", action="store_true",
                        help="tiny sizes; runs on CPU under TRITON_INTERPRET=1 (tests the script)")
    parser.add_argument("--rounds", type=int, default=None, help="interleaved timing rounds")
    parser.add_argument("--no-naive", action="store_true", help="skip the naive baseline")
    args = parser.parse_args(argv)
    interpreting = os.environ.get("TRITON_INTERPRET", "0") == "1"
    if not torch.cuda.is_available() and not (args.smoke and interpreting):
        print("gpu_report: no CUDA device (only --smoke runs without one, under "
              "TRITON_INTERPRET=1); nothing measured", file=sys.stderr)
        return 2
    import hatkernels

    device = "cpu" if interpreting else "cuda"
    mode = "smoke" if args.smoke else "quick" if args.quick else "full"
    rounds = args.rounds or {"smoke": 1, "quick": 3, "full": 5}[mode]
    dtype = torch.bfloat16
    report = [f"# triton backend on {_machine()}", "",
              f"available_backends({device!r}): {hatkernels.available_backends(device)}", "",
              "## Correctness vs the torch backend (ragged, NaN in padding)", ""]
    report += check_correctness(dtype, device, args.smoke)
    report += [""] + check_correctness(torch.float32, device, args.smoke)
    gemm_size = 256 if args.smoke else 16384
    rates = {d: gemm_rate(d, dtype, device, gemm_size) for d in (16, 768, 1024)
             if (d == 16) == args.smoke}
    report += ["", f"## Scoring ({str(dtype)[6:]}, median (range) of {rounds} interleaved "
               "rounds)", "", "x GEMM rate: ceiling time / time (1.0 = the cuBLAS rate on the "
               "valid-token similarity FLOPs).", "",
               "| workload | method | ms | TFLOP/s | x GEMM rate | time / triton "
               "| rel err vs torch backend |", "|---|---|---|---|---|---|---|"]
    hat = None
    for w in workloads(mode):
        w.make(device, dtype)
        report += bench_workload(w, rates[w.levels[0][2]], rounds, not args.no_naive)
        if w.name.startswith("G2"):
            hat = w
        else:
            w.tensors = {}
    report += ["", "## HAT three-level scoring: time and peak memory", ""] + peak_memory(hat)
    hat.tensors = {}
    report += ["", "## Backward vs forward (bfloat16)", ""]
    report += backward_ratio(rounds, device, mode)
    write_report(args.out, report)
    return 0


if __name__ == "__main__":
    sys.exit(main())
