"""Host memory of evaluation in memory vs through token stores, with a paper-size HAT
(Swin-B at 224 px, BERT-base, three levels of 768 dims: ``hat_coco`` with random weights, no
pretrained files) on generated scenes rendered at 224 px.

``python benchmarks/topk_eval_memory.py [N_IMAGES ...] [--ways memory,store]`` runs, for each
set size, each way in a fresh process and records the added peak RSS of the evaluation
(Linux ``VmHWM`` after ``clear_refs``, over the RSS once the model is built), per image
(with its five captions).
Rows are kept per glibc ``MALLOC_MMAP_THRESHOLD_`` setting: with glibc's default (a threshold
that rises after large frees), freed activation memory stays in the heap and the RSS keeps
the high-water mark of every batch; a fixed threshold (e.g. 131072) returns large blocks to
the system. Writes ``benchmarks/results/topk_eval_memory.{md,json}``.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

RESULTS = Path(__file__).resolve().parent / "results"
MIB = 1 << 20
OVERRIDES = ["model.image.checkpoint=null", "model.text.pretrained=null", "model.text.config={}",
             "data.kind=scenes", "data.root=null", "data.json=null", "data.image_size=224",
             "eval.batch_size=8", "train.amp=false"]
BUDGET = 64 * MIB  # eval.memory_budget of both ways


def _status(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) * 1024
    raise RuntimeError(field)


def child(n_images: int, way: str) -> dict:
    import torch

    from hatmodel.config import load_config
    from hatmodel.data import build_dataset, build_tokenizer
    from hatmodel.evaluate import evaluate_model
    from hatmodel.models import build_model

    torch.manual_seed(0)
    cfg = load_config("hat_coco", OVERRIDES + [f"data.scenes.test_images={n_images}"])
    tokenizer = build_tokenizer(cfg)
    model = build_model(cfg, tokenizer.vocab_size).eval()
    dataset = build_dataset(cfg, "test")
    Path("/proc/self/clear_refs").write_text("5")
    before = _status("VmRSS")
    start = time.perf_counter()
    with tempfile.TemporaryDirectory() as folder:
        metrics, sims = evaluate_model(
            model, dataset, tokenizer, torch.device("cpu"), batch_size=8,
            memory_budget=BUDGET, progress=False,
            store=f"{folder}/store" if way == "store" else None)
    return {"n_images": n_images, "way": way, "seconds": time.perf_counter() - start,
            "malloc_mmap_threshold": os.environ.get("MALLOC_MMAP_THRESHOLD_", "glibc default"),
            "added_peak_mib": (_status("VmHWM") - before) / MIB,
            "rss_before_mib": before / MIB, "rsum": metrics["rsum"],
            "sims_sum": float(sims.double().sum())}


def main(sizes: list[int], ways: tuple[str, ...]) -> None:
    """Measure ``ways`` at ``sizes``; earlier rows of other (size, way) pairs are kept."""
    done = RESULTS / "topk_eval_memory.json"
    rows = json.loads(done.read_text()) if done.exists() else []
    for n in sizes:
        for way in ways:
            proc = subprocess.run([sys.executable, __file__, "--child", str(n), way],
                                  capture_output=True, text=True, check=False,
                                  env={**os.environ})
            if proc.returncode:
                raise RuntimeError(proc.stderr[-3000:])
            row = json.loads(proc.stdout.splitlines()[-1])
            row["per_image_mib"] = row["added_peak_mib"] / n
            key = (n, way, row["malloc_mmap_threshold"])
            rows = [r for r in rows if _key(r) != key] + [row]
            print(row, flush=True)
    write(rows)


def _key(row: dict) -> tuple:
    return row["n_images"], row["way"], row.get("malloc_mmap_threshold", "glibc default")


def write(rows: list[dict]) -> None:
    rows = sorted(rows, key=lambda r: (_key(r)[2], r["n_images"], r["way"]))
    lines = ["# Evaluation memory: in memory vs token stores (paper-size HAT, random weights)",
             "", "Command: `python benchmarks/topk_eval_memory.py N ... [--ways memory,store]` "
             "(each row in its own fresh process; a run keeps the rows of other sizes/ways). "
             f"Config: hat_coco with {' '.join(OVERRIDES)}; eval.memory_budget "
             f"{BUDGET // MIB} MiB; 2 cores, shared with other work.", "",
             "| MALLOC_MMAP_THRESHOLD_ | images | captions | way | added peak MiB | "
             "per image MiB | seconds | rsum |", "|---|---|---|---|---|---|---|---|"]
    lines += [f"| {_key(r)[2]} | {r['n_images']} | {5 * r['n_images']} | {r['way']} | "
              f"{r['added_peak_mib']:.0f} | {r['per_image_mib']:.2f} | {r['seconds']:.0f} | "
              f"{r['rsum']:.1f} |" for r in rows]
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "topk_eval_memory.md").write_text("\n".join(lines) + "\n")
    (RESULTS / "topk_eval_memory.json").write_text(json.dumps(rows, indent=1) + "\n")


if __name__ == "__main__":
    if sys.argv[1:2] == ["--child"]:
        print(json.dumps(child(int(sys.argv[2]), sys.argv[3])))
    else:
        ways = tuple(sys.argv[sys.argv.index("--ways") + 1].split(",")) if "--ways" in sys.argv \
            else ("memory", "store")
        main([int(a) for a in sys.argv[1:] if a.isdigit()] or [8, 24], ways)
