"""hier_topk with and without pruning by score bounds (max t2i mean, cpu backend).

Data where pruning can pay: 2,000 images of 49 tokens (D = 256) in clusters of 5
near-duplicates (noise 0.1 / sqrt(D) per component), and 1,000 captions of 8-32 words, each
word an image token of one random image plus noise 0.5 / sqrt(D): a caption's cluster stands
out from the rest of the gallery. k = 5 (at most the cluster: the bounds rule the rest out)
and k = 10 (five items of the k come from the undistinguished rest, whose scores lie within
the bounds' width of one another: the probe turns pruning off).

Measured, with ``--benchmark``: both calls in interleaved rounds (median and range of the
seconds and of the speed ratio), the share of (query, item) pairs scored exactly, and that
both give the same items. Without it: the same on a tiny gallery (seconds). Results go to
``benchmarks/results/topk_prune.{md,json}``.
"""

from __future__ import annotations

import json
import os
import statistics
import time
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from harness import machine_info

import hatkernels.topk as topk_module
from hatkernels import hier_topk

RESULTS = Path(__file__).resolve().parent / "results"
FULL = dict(clusters=400, size=5, tokens=49, dim=256, queries=1000, words=32)
TINY = dict(clusters=40, size=5, tokens=12, dim=64, queries=70, words=9)
ROWS: list[dict] = []


def make_data(w: dict) -> tuple[torch.Tensor, ...]:
    gen = torch.Generator().manual_seed(0)
    m, d = w["tokens"], w["dim"]
    centers = F.normalize(torch.randn(w["clusters"], m, d, generator=gen), dim=-1)
    noise = 0.1 * torch.randn(w["clusters"], w["size"], m, d, generator=gen) / d**0.5
    images = F.normalize(centers[:, None] + noise, dim=-1).flatten(0, 1)
    n = images.shape[0]
    match = torch.randint(0, n, (w["queries"],), generator=gen)
    words = torch.randint(0, m, (w["queries"], w["words"]), generator=gen)
    texts = F.normalize(images[match[:, None], words] + 0.5 * torch.randn(
        w["queries"], w["words"], d, generator=gen) / d**0.5, dim=-1)
    lengths = torch.randint(min(8, w["words"]), w["words"] + 1, (w["queries"],), generator=gen)
    return images, torch.full((n,), m), texts, lengths


@pytest.mark.parametrize("k", [5, 10])
def test_topk_prune(bench, k: int, monkeypatch) -> None:
    images, il, texts, tl = make_data(FULL if bench.full else TINY)
    kw = dict(image_lengths=il, text_lengths=tl, pooling="max", direction="t2i",
              backend="cpu")
    scored: list[int] = []
    real = topk_module.hier_align

    def counting(*args, **kwargs):
        out = real(*args, **kwargs)
        scored.append(out.numel())
        return out

    monkeypatch.setattr(topk_module, "hier_align", counting)
    times: dict[bool, list[float]] = {False: [], True: []}
    results = {}
    for r in range(bench.rounds):
        for prune in (r % 2 == 0, r % 2 == 1):  # alternate which goes first
            scored.clear()
            start = time.perf_counter()
            results[prune] = hier_topk(images, texts, k, prune=prune, **kw)
            times[prune].append(time.perf_counter() - start)
            if prune:
                share = sum(scored) / (images.shape[0] * texts.shape[0])
    assert torch.equal(results[True].indices, results[False].indices)
    torch.testing.assert_close(results[True].values, results[False].values, rtol=1e-6,
                               atol=1e-7)
    if not bench.full:
        return
    ratio = [a / b for a, b in zip(times[False], times[True])]
    ROWS.append(dict(k=k, gallery=images.shape[0], queries=texts.shape[0],
                     pruned_s=_stats(times[True]), full_s=_stats(times[False]),
                     speedup=_stats(ratio), share_scored=share, same_topk=True,
                     load=round(os.getloadavg()[0], 1)))
    write_results()


def _stats(values: list[float]) -> list[float]:
    return [statistics.median(values), min(values), max(values)]


def write_results() -> None:
    machine = machine_info()
    w = FULL
    lines = [
        "# hier_topk pruning by score bounds", "",
        "Command: `pytest benchmarks/test_bench_topk_prune.py --benchmark` "
        f"(HATKERNELS_BENCH_ROUNDS={os.environ.get('HATKERNELS_BENCH_ROUNDS', '5')})", "",
        "Machine: " + ", ".join(f"{k} {v}" for k, v in machine.items()), "",
        f"{w['clusters'] * w['size']:,} images of {w['tokens']} tokens (D = {w['dim']}) in "
        f"clusters of {w['size']} near-duplicates; {w['queries']:,} captions of 8-{w['words']} "
        "words made from one image's tokens plus noise; max t2i mean, cpu backend. Seconds of "
        "one hier_topk call with and without pruning (interleaved rounds, median (min-max)), "
        "their ratio, and the share of (query, item) pairs scored exactly with pruning (both "
        "calls gave the same items).", "",
        "| k | pruned s | unpruned s | speed-up | pairs scored | load |",
        "|---|---|---|---|---|---|",
    ]
    for r in ROWS:
        p, f, s = r["pruned_s"], r["full_s"], r["speedup"]
        lines.append(f"| {r['k']} | {p[0]:.2f} ({p[1]:.2f}-{p[2]:.2f}) | {f[0]:.2f} "
                     f"({f[1]:.2f}-{f[2]:.2f}) | {s[0]:.2f} ({s[1]:.2f}-{s[2]:.2f}) | "
                     f"{r['share_scored']:.0%} | {r['load']} |")
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "topk_prune.md").write_text("\n".join(lines) + "\n")
    (RESULTS / "topk_prune.json").write_text(json.dumps({"machine": machine, "rows": ROWS},
                                                        indent=1) + "\n")
