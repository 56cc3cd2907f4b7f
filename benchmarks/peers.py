"""Optional peer libraries timed beside the kernels on max t2i (each caption's words query an
image's tokens): ``numkong`` and ``maxsim-cpu`` (``pip install .[peers]``). Neither is a
dependency: a peer that is not importable is reported as skipped, and the smoke run and CI
pass without them.

Both compute ColBERT's MaxSim of one query against documents, the sum over the query's vectors
of their best match; with the caption as the query and the image as the document that is max
t2i with ``reduce="sum"``, turned into ``"mean"`` here by dividing by the caption's length.

- ``numkong.maxsim_packed(q, d)``: one (query, document) pair per call, both packed beforehand
  by ``maxsim_pack`` (packing is not timed); returns the sum over the query's vectors of the
  smallest angular distance ``1 - cos``, so the t2i mean similarity is ``1 - distance / n``.
  It picks each word's best token by an int8-quantised screening and refines only that winner
  in float32, so when the screening picks a wrong winner the score is lower than the exact
  one: an approximation. Ragged lengths are handled by packing each item's valid tokens. It
  releases the GIL: the pairs of one image per task, on a pool of as many threads as torch
  uses.
- ``maxsim_cpu.maxsim_scores(q, docs)``: one query ``[n, D]`` against ``[B, M, D]`` documents
  (``maxsim_scores_variable`` for a list of ragged ones), returning the ``B`` sums of best dot
  products (multithreaded inside). Its JIT kernels crash the process (SIGSEGV) or return
  garbage when ``n * M * D`` passes about 2^18 (n = 21 words against 49 tokens at D = 256
  crashes; 20 words do not), so it is given only the captions with ``n * M * D <= 2^18``
  (the row says how many), and those shapes are first run in a child process, so that a
  crash is reported instead of ending the benchmark.
"""

from __future__ import annotations

import importlib
import json
import signal
import subprocess
import sys
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import torch
from torch import Tensor

MAXSIM_CPU_LIMIT = 1 << 18  # n * M * D above it: maxsim_cpu crashes or returns garbage


@dataclass
class PeerRun:
    """A peer set up on some inputs: ``fn()`` returns ``[Bi, len(cols)]`` float32 t2i mean
    scores of every image against the captions ``cols``; ``note`` says what was timed."""

    fn: Callable[[], Tensor]
    cols: Tensor
    note: str


def _valid(x: Tensor, lengths: Tensor) -> list:
    """Each item's valid tokens as a C-contiguous float32 numpy array."""
    return [x[i, :k].contiguous().numpy() for i, k in enumerate(lengths.tolist())]


def numkong_run(x, threads: int) -> PeerRun:
    nk = importlib.import_module("numkong")
    images = [nk.maxsim_pack(a) for a in _valid(x.images, x.image_lengths)]
    captions = [nk.maxsim_pack(a) for a in _valid(x.texts, x.text_lengths)]
    n = x.text_lengths.double()

    def row(image) -> list[float]:
        return [nk.maxsim_packed(c, image) for c in captions]

    def run() -> Tensor:
        with ThreadPoolExecutor(threads) as pool:
            distance = torch.tensor(list(pool.map(row, images)), dtype=torch.float64)
        return (1 - distance.reshape(len(images), len(captions)) / n).float()

    note = (f"1 - angular distance / n; one call per pair on {threads} threads; "
            "packed beforehand (not timed); int8-screened winners: approximate")
    return PeerRun(run, torch.arange(len(captions)), note)


def maxsim_cpu_cols(x) -> Tensor:
    """The captions maxsim_cpu can score against these images."""
    m, d = int(x.image_lengths.max()), x.images.shape[2]
    return torch.nonzero(x.text_lengths * m * d <= MAXSIM_CPU_LIMIT).flatten()


_PROBE = """
import json, sys
import numpy as np
import maxsim_cpu
job = json.loads(sys.argv[1])
rng = np.random.default_rng(0)
def unit(*shape):
    a = rng.standard_normal(shape).astype(np.float32)
    return a / np.linalg.norm(a, axis=-1, keepdims=True)
lengths, d = job["image_lengths"], job["dim"]
uniform = len(set(lengths)) == 1
docs = unit(len(lengths), lengths[0], d) if uniform else [unit(k, d) for k in lengths]
for n in job["query_lengths"]:
    fn = maxsim_cpu.maxsim_scores if uniform else maxsim_cpu.maxsim_scores_variable
    fn(unit(n, d), docs)
"""


def _probe_maxsim_cpu(x, cols: Tensor) -> str | None:
    """Run maxsim_cpu on random data of the timed shapes in a child process; why not, if it
    crashed there."""
    job = dict(image_lengths=x.image_lengths.tolist(), dim=x.images.shape[2],
               query_lengths=sorted(set(x.text_lengths[cols].tolist())))
    try:
        proc = subprocess.run([sys.executable, "-c", _PROBE, json.dumps(job)],
                              capture_output=True, text=True, timeout=300, check=False)
    except subprocess.TimeoutExpired:
        return "its probe on these shapes ran past 300 s in a child process: not run"
    if proc.returncode == 0:
        return None
    how = (f"signal {signal.Signals(-proc.returncode).name}" if proc.returncode < 0
           else f"exit status {proc.returncode}")
    return f"crashed ({how}) on these shapes in a child process: not run"


def maxsim_cpu_run(x, threads: int) -> PeerRun:
    ms = importlib.import_module("maxsim_cpu")
    cols = maxsim_cpu_cols(x)
    if len(cols) == 0:
        raise RuntimeError(cannot_score("maxsim-cpu", x))
    why = _probe_maxsim_cpu(x, cols)
    if why:
        raise RuntimeError(why)
    images = _valid(x.images, x.image_lengths)
    uniform = len(set(x.image_lengths.tolist())) == 1
    docs = torch.stack([torch.from_numpy(a) for a in images]).numpy() if uniform else images
    score = ms.maxsim_scores if uniform else ms.maxsim_scores_variable
    queries = _valid(x.texts[cols], x.text_lengths[cols])
    n = x.text_lengths[cols].double()

    def run() -> Tensor:
        sums = torch.stack([torch.from_numpy(score(q, docs)).double() for q in queries], 1)
        return (sums / n).float()

    m, d = int(x.image_lengths.max()), x.images.shape[2]
    most = MAXSIM_CPU_LIMIT // (m * d)
    note = (f"sum of best dot products / n; one call per caption; only the {len(cols)} of "
            f"{len(x.text_lengths)} captions with n*M*D <= 2^18 (n <= {most} at M={m}, D={d}: "
            "longer ones crash its JIT or give garbage)")
    return PeerRun(run, cols, note)


PEERS = {"numkong": ("numkong", numkong_run), "maxsim-cpu": ("maxsim_cpu", maxsim_cpu_run)}


def available(name: str) -> str | None:
    """Why peer ``name`` cannot run here (not importable), or None."""
    module = PEERS[name][0]
    try:
        importlib.import_module(module)
    except Exception as exc:  # ImportError, or a library that fails to load
        return f"not installed ({type(exc).__name__}: {exc}; pip install .[peers])"
    return None


def cannot_score(name: str, x) -> str | None:
    """Why peer ``name`` has nothing to score on ``x`` (maxsim-cpu: no caption short enough),
    or None."""
    if name == "maxsim-cpu" and len(maxsim_cpu_cols(x)) == 0:
        m, d = int(x.image_lengths.max()), x.images.shape[2]
        return (f"no caption short enough for maxsim-cpu (n*M*D <= 2^18 needs n <= "
                f"{MAXSIM_CPU_LIMIT // (m * d)} words at M={m}, D={d}; longer ones crash its "
                "JIT or give garbage)")
    return None


def peer_run(name: str, x) -> PeerRun:
    return PEERS[name][1](x, torch.get_num_threads())
