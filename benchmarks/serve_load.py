"""Load test of the search server: ``python benchmarks/serve_load.py [--run runs/hat_scenes]
[--index RUN/index_images] [--queries 200] [--clients 8] [-k 10]``.

Starts ``python -m hatmodel.serve`` on 127.0.0.1 (a free port) over the run's image index,
sends ``--queries`` captions of the index's split from ``--clients`` concurrent clients (then
the same queries from one client, for the time a query takes alone), and checks every answer
against :func:`hatkernels.hier_topk` called directly in this process on
the same model and store (same ids in the same order). Writes latency percentiles and
queries per second to ``benchmarks/results/serve_load.md`` (``--out``) and exits non-zero if
any answer was wrong or the server did not stop cleanly on SIGINT.
"""

from __future__ import annotations

import argparse
import os
import platform
import queue
import signal
import socket
import subprocess
import sys
import threading
import time
from datetime import datetime, timezone
from pathlib import Path

import httpx
import numpy as np
import torch

from hatkernels import TokenStore, hier_topk
from hatmodel.checkpoint import load_for_eval
from hatmodel.data import build_dataset, build_tokenizer
from hatmodel.index import read_index

ROOT = Path(__file__).resolve().parents[1]
START_TIMEOUT_S = 300


def expected_ids(run: Path, index: Path, captions: list[str], k: int) -> list[list[int]]:
    """Each caption's top-k image positions from ``hier_topk`` over the index's store."""
    model, cfg, _ = load_for_eval(run)
    tokenizer = build_tokenizer(cfg)
    store = TokenStore.open(index / "tokens")
    a = model.align
    out = []
    with torch.no_grad():
        for caption in captions:  # one at a time, as the server encodes them
            query = model.encode_texts(*tokenizer([caption]))
            top = hier_topk(store, query.levels, k, query="texts", text_lengths=query.lengths,
                            pooling=a["pooling"], direction=a["direction"], reduce=a["reduce"],
                            lambda_softmax=float(a["lambda_softmax"]), weights=a["weights"],
                            backend=a["backend"])
            out.append(top.indices[0].tolist())
    return out


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_server(run: Path, index: Path, port: int, threads: int) -> subprocess.Popen:
    proc = subprocess.Popen(
        [sys.executable, "-m", "hatmodel.serve", str(index), "--checkpoint", str(run),
         "--port", str(port), "--threads", str(threads)],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
        env=os.environ | {"PYTHONUNBUFFERED": "1"},
    )
    deadline = time.monotonic() + START_TIMEOUT_S
    while True:
        if proc.poll() is not None:
            raise RuntimeError(f"the server exited:\n{proc.communicate()[0]}")
        if time.monotonic() > deadline:
            proc.kill()
            raise RuntimeError(f"the server did not answer in {START_TIMEOUT_S} s")
        try:
            httpx.get(f"http://127.0.0.1:{port}/api/info", timeout=5).raise_for_status()
            return proc
        except httpx.TransportError:
            time.sleep(0.5)


def run_clients(url: str, captions: list[str], k: int, clients: int
                ) -> tuple[list[float | None], list[list[str] | str], float]:
    """Send every caption once from ``clients`` threads; per query its latency (s) and the
    ids answered (or the error), and the wall time of the whole run."""
    work: queue.Queue[int] = queue.Queue()
    for i in range(len(captions)):
        work.put(i)
    latency: list[float | None] = [None] * len(captions)
    answers: list[list[str] | str] = ["not sent"] * len(captions)

    def client() -> None:
        with httpx.Client(base_url=url, timeout=120) as http:
            while True:
                try:
                    i = work.get_nowait()
                except queue.Empty:
                    return
                start = time.perf_counter()
                try:
                    r = http.get("/api/search", params={"text": captions[i], "k": k})
                    answers[i] = [h["id"] for h in r.json()["hits"]] if r.status_code == 200 \
                        else f"{r.status_code} {r.text[:200]}"
                except httpx.HTTPError as err:
                    answers[i] = f"{type(err).__name__}: {err}"
                latency[i] = time.perf_counter() - start

    threads = [threading.Thread(target=client) for _ in range(clients)]
    start = time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return latency, answers, time.perf_counter() - start


def git_commit() -> str:
    try:
        return subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, text=True,
                              capture_output=True, check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--run", default="runs/hat_scenes", help="run folder (default %(default)s)")
    p.add_argument("--index", default=None, help="image index (default RUN/index_images)")
    p.add_argument("--queries", type=int, default=200)
    p.add_argument("--clients", type=int, default=8)
    p.add_argument("-k", type=int, default=10)
    p.add_argument("--threads", type=int, default=1, help="the server's torch threads")
    p.add_argument("--out", default=str(ROOT / "benchmarks/results/serve_load.md"))
    args = p.parse_args(argv)
    run = Path(args.run)
    index = Path(args.index) if args.index else run / "index_images"
    if args.queries < 1 or args.clients < 1:
        raise SystemExit("--queries and --clients: expected positive counts")

    info, _, _ = read_index(index)
    _, cfg, _ = load_for_eval(run)
    captions_all = build_dataset(cfg, info["source"]["split"]).captions
    step = max(1, len(captions_all) // args.queries)
    captions = [captions_all[(i * step) % len(captions_all)] for i in range(args.queries)]
    torch.set_num_threads(1)
    want = [[f"image-{n}" for n in ids] for ids in expected_ids(run, index, captions, args.k)]

    load_before = os.getloadavg()
    port = free_port()
    server = start_server(run, index, port, args.threads)
    url = f"http://127.0.0.1:{port}"
    try:
        httpx.get(f"{url}/api/search", params={"text": captions[0], "k": args.k}, timeout=120)
        passes = [(n, *run_clients(url, captions, args.k, n)) for n in (args.clients, 1)]
    finally:
        server.send_signal(signal.SIGINT)
        log = server.communicate(timeout=60)[0]
    wrong = [(n, i) for n, _, answers, _ in passes for i in range(len(captions))
             if answers[i] != want[i]]
    rows = []
    for n, latency, _, wall in passes:
        times = np.array([t for t in latency if t is not None]) * 1000
        p50, p95 = np.percentile(times, [50, 95])
        right = len(captions) - sum(1 for m, _ in wrong if m == n)
        rows.append(f"| {n} | {len(captions)} | {right} | {p50:.0f} ms | {p95:.0f} ms | "
                    f"{times.max():.0f} ms | {len(captions) / wall:.1f} |")
    clean = server.returncode == 0 and "Finished server process" in log

    lines = [
        "# Search server load test",
        "",
        f"`python benchmarks/serve_load.py --run {args.run} --queries {args.queries} "
        f"--clients {args.clients} -k {args.k} --threads {args.threads}`",
        "",
        f"- when: {datetime.now(timezone.utc):%Y-%m-%d %H:%M} UTC, commit {git_commit()}",
        f"- machine: {platform.machine()}, {os.cpu_count()} cores (shared), load average "
        f"{load_before[0]:.1f} before the run; torch {torch.__version__}",
        f"- server: `python -m hatmodel.serve {index} --checkpoint {run} --threads "
        f"{args.threads}` on 127.0.0.1, {info['count']} images ({info['dtype']} tokens, "
        f"{info['source'].get('split')} split)",
        f"- queries: {len(captions)} captions of that split, `GET /api/search?text=...&k="
        f"{args.k}` (httpx), from {args.clients} concurrent clients, then the same queries "
        "from one client; one warm-up query before",
        "",
        "| clients | queries | correct | p50 latency | p95 latency | max latency | queries/s |",
        "|---:|---:|---:|---:|---:|---:|---:|",
        *rows,
        "",
        "Correct: the ids and their order equal `hier_topk` called directly on the same "
        "model and store in the load-test process. Latency is per request as a client sees "
        "it (queueing behind the model lock included: the server scores one query at a "
        "time). The server stopped on SIGINT "
        + ("cleanly (exit status 0)." if clean else f"with exit status {server.returncode}."),
        "",
    ]
    Path(args.out).write_text("\n".join(lines))
    print("\n".join(lines))
    for n, i in wrong[:5]:
        answer = next(a for m, _, a, _ in passes if m == n)[i]
        print(f"wrong answer for {captions[i]!r} ({n} clients): {answer} != {want[i]}",
              file=sys.stderr)
    return 1 if wrong or not clean else 0


if __name__ == "__main__":
    sys.exit(main())
