"""Top-k search (hier_topk, workload W5): a gallery of 200,000 images x 16 tokens (D = 32)
stored as float16 in a TokenStore on disk, 500 caption queries of 8-32 L2-normalised random
tokens, k = 10, max t2i mean and scan i2t mean, scored in float32 by the cpu backend.

Measured, with ``--benchmark``:

- the whole gallery, one process (a fresh child per operator): queries/s and the added peak
  RSS of the hier_topk call (Linux ``VmHWM`` after ``clear_refs``, over the RSS just before),
  and, for max pooling, the same for the dense ``hier_align`` of the gallery held in memory;
- hier_topk over the store vs the dense ``hier_align`` + ``torch.topk`` on the same
  images (a prefix slice of the gallery, so that scan's dense baseline fits the run), in
  interleaved rounds: the median and range of the speed ratio;
- 2 gloo ranks (spawned, one thread each, each scoring its half of the store) vs 1 process
  (two threads) on the same gallery.

Without ``--benchmark``: the same code on a tiny gallery (seconds), checked against the dense
top-k. Results go to ``benchmarks/results/topk.{md,json}``.
"""

from __future__ import annotations

import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from harness import machine_info

from hatkernels import TokenStore, hier_align, hier_topk

RESULTS = Path(__file__).resolve().parent / "results"
MIB = 1 << 20
K = 10
CASES = {"max t2i mean": dict(pooling="max", direction="t2i", reduce="mean"),
         "scan i2t mean": dict(pooling="scan", direction="i2t", reduce="mean")}
# Ranks split a store at shard boundaries: the rank slices hold an even number of shards.
FULL = dict(gallery=200_000, tokens=16, dim=32, queries=500, words=32, shard=8192,
            ratio_slice={"max t2i mean": 50_000, "scan i2t mean": 10_000},
            ranks_slice={"max t2i mean": 196_608, "scan i2t mean": 32_768})
TINY = dict(gallery=3_000, tokens=16, dim=32, queries=20, words=32, shard=512,
            ratio_slice={"max t2i mean": 3_000, "scan i2t mean": 1_000},
            ranks_slice={"max t2i mean": 3_000, "scan i2t mean": 1_024})
TARGET_MIB = 256  # added peak RSS of hier_topk, beyond one shard


def make_store(path: Path, w: dict) -> TokenStore:
    """W5's gallery: L2-normalised random tokens, float16, written batch by batch."""
    gen = torch.Generator().manual_seed(5)
    with TokenStore.writer(path, [(w["tokens"], w["dim"])], dtype=torch.float16,
                           shard_size=w["shard"]) as writer:
        for start in range(0, w["gallery"], w["shard"]):
            n = min(w["shard"], w["gallery"] - start)
            v = torch.randn(n, w["tokens"], w["dim"], generator=gen)
            writer.add(torch.nn.functional.normalize(v, dim=-1))
    return TokenStore.open(path)


def make_queries(w: dict) -> tuple[torch.Tensor, torch.Tensor]:
    """500 captions of 8-32 words (float32, padding zero)."""
    gen = torch.Generator().manual_seed(6)
    t = torch.nn.functional.normalize(torch.randn(w["queries"], w["words"], w["dim"],
                                                  generator=gen), dim=-1)
    lengths = torch.randint(8, w["words"] + 1, (w["queries"],), generator=gen)
    t[torch.arange(w["words"])[None, :] >= lengths[:, None]] = 0
    return t, lengths


def _status(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) * 1024
    raise RuntimeError(f"{field} not in /proc/self/status")


def _measured(fn) -> dict:
    """Seconds and added peak RSS of ``fn()``."""
    Path("/proc/self/clear_refs").write_text("5")
    before = _status("VmRSS")
    start = time.perf_counter()
    fn()
    seconds = time.perf_counter() - start
    return {"seconds": seconds, "added_peak_mib": (_status("VmHWM") - before) / MIB}


def child(job: dict) -> dict:
    """One measurement in a fresh process: hier_topk over the whole store, or the dense
    hier_align of the gallery loaded into memory."""
    w, kw = job["workload"], CASES[job["case"]]
    store = TokenStore.open(job["store"])
    texts, lengths = make_queries(w)
    hier_topk(store[:64], texts[:4], 2, text_lengths=lengths[:4], backend="cpu", **kw)  # warm
    if job["what"] == "topk":
        return _measured(lambda: hier_topk(store, texts, K, text_lengths=lengths,
                                           backend="cpu", **kw))
    images = store.read()[0][0].float()
    return _measured(lambda: hier_align(images, texts, text_lengths=lengths, backend="cpu",
                                        **kw).t().topk(K, dim=1))


def _run_child(job: dict) -> dict:
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).parent)}
    proc = subprocess.run([sys.executable, __file__, json.dumps(job)], capture_output=True,
                          text=True, env=env, check=False)
    if proc.returncode:
        raise RuntimeError(f"child failed ({proc.returncode}):\n{proc.stderr[-3000:]}")
    return json.loads(proc.stdout.splitlines()[-1])


def _rank_worker(rank: int, folder: str, store_path: str, w: dict, case: str, n: int) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{folder}/rendezvous", rank=rank,
                            world_size=2)
    try:
        store = TokenStore.open(store_path)[:n]
        part = store.split(rank, 2)
        texts, lengths = make_queries(w)
        hier_topk(store[:64], texts[:4], 2, text_lengths=lengths[:4], backend="cpu",
                  **CASES[case])  # warm-up (needs no group)
        dist.barrier()
        start = time.perf_counter()
        top = hier_topk(part, texts, K, text_lengths=lengths, backend="cpu",
                        group=dist.group.WORLD, **CASES[case])
        seconds = time.perf_counter() - start
        Path(f"{folder}/rank{rank}.json").write_text(json.dumps(
            {"seconds": seconds, "indices": top.indices.tolist()}))
        dist.barrier()  # no rank tears down while another finishes the last collective
    finally:
        dist.destroy_process_group()


def _two_ranks(store_path: str, w: dict, case: str, n: int) -> tuple[float, list]:
    with tempfile.TemporaryDirectory() as folder:
        mp.start_processes(_rank_worker, args=(folder, store_path, w, case, n), nprocs=2,
                           start_method="spawn")
        ranks = [json.loads(Path(f"{folder}/rank{r}.json").read_text()) for r in range(2)]
    assert ranks[0]["indices"] == ranks[1]["indices"]
    return max(r["seconds"] for r in ranks), ranks[0]["indices"]


def _stats(values: list[float]) -> list[float]:
    return [statistics.median(values), min(values), max(values)]


@pytest.fixture(scope="module")
def w5(bench, tmp_path_factory):
    w = FULL if bench.full else TINY
    return w, make_store(tmp_path_factory.mktemp("w5") / "gallery", w)


@pytest.mark.parametrize("case", list(CASES))
def test_topk_w5(bench, w5, case: str) -> None:
    w, store = w5
    kw = CASES[case]
    if not bench.full and case != "max t2i mean":
        pytest.skip("the smoke run measures max pooling only (processes are slow to start)")
    texts, lengths = make_queries(w)
    row = {"case": case, "gallery": w["gallery"], "queries": w["queries"], "k": K}
    # 1. hier_topk over the whole store in a fresh process (and dense, for max).
    whole = _run_child({"what": "topk", "store": str(store.path), "workload": w, "case": case})
    row["topk_queries_per_s"] = w["queries"] / whole["seconds"]
    row["topk_added_peak_mib"] = whole["added_peak_mib"]
    shard_mib = w["shard"] * w["tokens"] * w["dim"] * 4 / MIB  # one shard cast to float32
    row["peak_limit_mib"] = TARGET_MIB + shard_mib
    if case.startswith("max"):
        dense = _run_child({"what": "dense", "store": str(store.path), "workload": w,
                            "case": case})
        row["dense_queries_per_s"] = w["queries"] / dense["seconds"]
        row["dense_added_peak_mib"] = dense["added_peak_mib"]
    # 2. hier_topk over the store vs dense + topk on the same slice, interleaved rounds.
    n = w["ratio_slice"][case]
    view = store[:n]
    images = view.read()[0][0].float()
    # Two hier_topk contenders: over the same float32 tensor as dense (the cost of the top-k
    # itself) and streamed from the float16 store (what reading and casting shards adds).
    calls = {
        "topk": lambda: hier_topk(view, texts, K, text_lengths=lengths, backend="cpu", **kw),
        "topk_memory": lambda: hier_topk(images, texts, K, text_lengths=lengths, backend="cpu",
                                         **kw),
        "dense": lambda: hier_align(images, texts, text_lengths=lengths, backend="cpu",
                                    **kw).t().topk(K, dim=1),
    }
    ratios: dict[str, list[float]] = {"topk": [], "topk_memory": []}
    for r in range(bench.rounds):
        names = list(calls)
        order = names[r % 3:] + names[:r % 3]  # each contender leads a round in turn
        times, got = {}, {}
        for what in order:
            start = time.perf_counter()
            got[what] = calls[what]()
            times[what] = time.perf_counter() - start
        for what in ratios:
            ratios[what].append(times["dense"] / times[what])
    for what in ratios:
        torch.testing.assert_close(got[what].values, got["dense"].values, rtol=1e-5, atol=1e-6)
    row["ratio_slice"] = n
    row["topk_vs_dense"] = _stats(ratios["topk"])
    row["topk_memory_vs_dense"] = _stats(ratios["topk_memory"])
    # 3. Two gloo ranks vs one process on the same gallery: a timing, so only in the full run
    # (the two-rank results themselves are tested in tests/hatkernels/test_topk_distributed.py;
    # this smoke run's spawned ranks twice aborted in gloo's teardown, cause not yet found).
    if bench.full:
        n = w["ranks_slice"][case]
        start = time.perf_counter()
        one = hier_topk(store[:n], texts, K, text_lengths=lengths, backend="cpu", **kw)
        one_s = time.perf_counter() - start
        two_s, two_indices = _two_ranks(str(store.path), w, case, n)
        assert two_indices == one.indices.tolist()
        row["ranks_slice"] = n
        row["one_process_s"], row["two_ranks_s"] = one_s, two_s
        row["two_ranks_speedup"] = one_s / two_s
    ROWS.append(row)
    if bench.full:
        write_results()
    assert row["topk_added_peak_mib"] <= row["peak_limit_mib"], row


ROWS: list[dict] = []


def write_results() -> None:
    machine = machine_info()
    lines = [
        "# hier_topk, workload W5", "",
        f"Command: `pytest benchmarks/test_bench_topk.py --benchmark` "
        f"(HATKERNELS_BENCH_ROUNDS={os.environ.get('HATKERNELS_BENCH_ROUNDS', '5')})", "",
        "Machine: " + ", ".join(f"{k} {v}" for k, v in machine.items()), "",
        "Gallery 200,000 images x 16 tokens, D = 32, float16 TokenStore on disk (shards of "
        f"{FULL['shard']:,} items); 500 caption queries of 8-32 words; k = {K}; cpu backend, "
        "float32 math. Peak: added peak RSS of the call in a fresh process (limit: 256 MiB + one "
        "shard in float32). Ratio: dense hier_align + torch.topk time over hier_topk time on "
        "the same slice, median (min-max) of interleaved rounds, for hier_topk streaming the "
        "float16 store (`store`) and for hier_topk over the same float32 tensor as dense "
        "(`memory`: the top-k's own cost). Ranks: 2 gloo processes of "
        "one thread each vs one process of two threads, same slice.", "",
        "| operator | topk q/s | topk peak MiB (limit) | dense q/s | dense peak MiB | "
        "topk/dense speed: store | memory | (slice) | 1 proc s | 2 ranks s | "
        "2-rank speed-up (slice) |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in ROWS:
        ratio, memory = r["topk_vs_dense"], r["topk_memory_vs_dense"]
        lines.append(
            f"| {r['case']} | {r['topk_queries_per_s']:.1f} | {r['topk_added_peak_mib']:.0f} "
            f"({r['peak_limit_mib']:.0f}) | {r.get('dense_queries_per_s', float('nan')):.1f} | "
            f"{r.get('dense_added_peak_mib', float('nan')):.0f} | {ratio[0]:.2f} "
            f"({ratio[1]:.2f}-{ratio[2]:.2f}) | {memory[0]:.2f} ({memory[1]:.2f}-{memory[2]:.2f}) "
            f"| {r['ratio_slice']:,} | {r['one_process_s']:.1f} "
            f"| {r['two_ranks_s']:.1f} | {r['two_ranks_speedup']:.2f} ({r['ranks_slice']:,}) |")
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "topk.md").write_text("\n".join(lines) + "\n")
    (RESULTS / "topk.json").write_text(json.dumps({"machine": machine, "rows": ROWS},
                                                  indent=1) + "\n")


if __name__ == "__main__":
    print(json.dumps(child(json.loads(sys.argv[1]))))
