"""Builds of the cpu extension against each other on W1 (256 images x 49 tokens, 1,280 captions
of 8-32 words, D = 256, float32, 2 threads), the kernels called directly.

On a shared host timings drift by tens of percent within minutes, so only ratios taken close
together mean anything. One worker process per build stays alive for the whole run (two
builds of the same module cannot be loaded into one process); rounds call every worker once
per case, in an order that alternates from round to round, and the result per case is the
median over rounds of each build's time over the first build's time in the same round::

    python benchmarks/build_ab.py --rounds 8 --cases scan-i2t-fwd,max-t2i-bwd BASE_DIR NEW_DIR

Each ``*_DIR`` is a folder holding a built ``hatkernels`` package (a checkout built in place,
or a copy of its ``hatkernels`` folder). A case is ``OP-DIRECTION-MODE``: OP ``max`` or
``scan``, DIRECTION ``t2i``, ``i2t`` or ``both``, MODE ``fwd`` (forward), ``fwdbwd``
(forward + backward) or ``bwd`` (max only: the backward from saved winners alone). Prints a
Markdown table; the checksum column (the sum of the scores) shows whether builds agree.
"""

from __future__ import annotations

import argparse
import statistics
import subprocess
import sys
import time

DIRECTIONS = {"t2i": 0, "i2t": 1, "both": 2}
MODES = ("fwd", "fwdbwd", "bwd")


def parse_case(case: str) -> tuple[str, str, str]:
    """``OP-DIRECTION-MODE`` checked, as a tuple."""
    parts = case.split("-")
    if (len(parts) != 3 or parts[0] not in ("max", "scan") or parts[1] not in DIRECTIONS
            or parts[2] not in MODES or (parts[2] == "bwd" and parts[0] != "max")):
        raise ValueError(f"--cases: expected OP-DIRECTION-MODE (max|scan, t2i|i2t|both, "
                         f"fwd|fwdbwd|bwd, bwd for max only), got {case!r}")
    return parts[0], parts[1], parts[2]


def worker(package_dir: str) -> None:
    """Answer ``case`` lines on stdin with ``milliseconds checksum`` lines, one call each."""
    sys.path.insert(0, package_dir)
    import torch

    from hatkernels import _C_cpu as ext

    torch.set_num_threads(2)
    g = torch.Generator().manual_seed(0)
    v = torch.randn(256, 49, 256, generator=g)
    v /= v.norm(dim=-1, keepdim=True)
    t = torch.randn(1280, 32, 256, generator=g)
    t /= t.norm(dim=-1, keepdim=True)
    vl = torch.full((256,), 49)
    tl = torch.randint(8, 33, (1280,), generator=g)
    grad = torch.randn(256, 1280, generator=g)
    for line in sys.stdin:
        op, direction, mode = parse_case(line.strip())
        args = (v, t, vl, tl, DIRECTIONS[direction], True)
        if op == "max":
            fwd, bwd = ext.max_align_forward, ext.max_align_backward
        else:
            args += (9.0,)
            fwd, bwd = ext.scan_align_forward, ext.scan_align_backward
        if mode == "bwd":
            out, winners = ext.max_align_forward_winners(*args, 1 << 40)
            start = time.perf_counter()
            bwd(grad, *args, winners)
        else:
            start = time.perf_counter()
            out = fwd(*args)
            if mode == "fwdbwd":
                bwd(grad, *args)
        ms = (time.perf_counter() - start) * 1e3
        print(f"{ms:.3f} {out.double().sum().item():.10e}", flush=True)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("builds", nargs="+", help="folders holding a built hatkernels package")
    ap.add_argument("--cases", default="max-t2i-fwd,scan-i2t-fwd",
                    help="comma-separated OP-DIRECTION-MODE cases")
    ap.add_argument("--rounds", type=int, default=8)
    ap.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    a = ap.parse_args()
    if a.worker:
        worker(a.builds[0])
        return
    if a.rounds < 1:
        raise ValueError(f"--rounds: expected a positive count, got {a.rounds}")
    cases = a.cases.split(",")
    for case in cases:
        parse_case(case)
    procs = [subprocess.Popen([sys.executable, __file__, "--worker", b], stdin=subprocess.PIPE,
                              stdout=subprocess.PIPE, text=True) for b in a.builds]

    def call(k: int, case: str) -> tuple[float, str]:
        procs[k].stdin.write(case + "\n")
        procs[k].stdin.flush()
        line = procs[k].stdout.readline()
        if not line:
            raise RuntimeError(f"the worker of {a.builds[k]} stopped (see its error above)")
        ms, checksum = line.split()
        return float(ms), checksum

    order = list(range(len(a.builds)))
    for case in cases:  # warm-up: first calls load code and fault in buffers
        for k in order:
            call(k, case)
    times = {(c, k): [] for c in cases for k in order}
    sums = {}
    for r in range(a.rounds):
        for case in cases:
            for k in (order if r % 2 == 0 else order[::-1]):
                ms, sums[case, k] = call(k, case)
                times[case, k].append(ms)
    for p in procs:
        p.stdin.close()
        p.wait()
    print(f"{a.rounds} rounds; time over {a.builds[0]}'s in the same round, median (range)\n")
    print("| case | build | ms, median (min) | time ratio | checksum |")
    print("|---|---|---|---|---|")
    for case in cases:
        for k in order:
            ratios = [x / y for x, y in zip(times[case, k], times[case, 0])]
            print(f"| {case} | {a.builds[k]} | {statistics.median(times[case, k]):.1f} "
                  f"({min(times[case, k]):.1f}) | {statistics.median(ratios):.3f} "
                  f"({min(ratios):.3f}-{max(ratios):.3f}) | {sums[case, k]} |")


if __name__ == "__main__":
    main()
