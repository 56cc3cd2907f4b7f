"""Evaluation that never holds a split's tokens in memory, on one process or several.

Each side is encoded batch by batch into a :class:`hatkernels.TokenStore` (float32, so the
scores are those of the in-memory evaluation), then the score matrix is filled one block of
image rows at a time (the blocks of ``hatmodel.evaluate.score_matrix``, made smaller when
their tokens would exceed half the memory budget), each block scored against the captions
one chunk at a time (as many as fit in half the memory budget). Host memory holds the
``[n_images, n_captions]`` float32 score matrix (the metrics' input), one block of image
tokens and one chunk of captions, instead of every token of the split. When each side fits
in half the budget, every ``model.score`` call is the in-memory evaluation's, so the matrix
is bit-identical to it; the blocks and chunks never depend on the number of ranks.

Under ``torchrun`` (``WORLD_SIZE`` > 1) every rank encodes its own contiguous run of whole
batches (the batches of the one-process run) into its own part of the store folder, which
all ranks must see (one machine, or a shared file system). Then each rank scores its own
blocks of image rows (the blocks of the one-process run), the blocks are all-gathered, and
every rank computes the metrics of the whole matrix: the same numbers as one process.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path

import torch
import torch.distributed as dist
from torch import Tensor
from tqdm import tqdm

from hatkernels import TokenStore

from .index import caption_tokens, image_tokens, write_store
from .models import RetrievalModel, Tokens


def init_distributed(device: str | None = None):
    """The default process group under torchrun (``WORLD_SIZE`` > 1), else None: NCCL when
    ``device`` is (or defaults to) CUDA, else gloo."""
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1:
        return None
    if not dist.is_initialized():
        cuda = (device or "").startswith("cuda") or (device is None and torch.cuda.is_available())
        if cuda:
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
        dist.init_process_group("nccl" if cuda else "gloo")
    return dist.group.WORLD


def _rank_world(group) -> tuple[int, int]:
    return (0, 1) if group is None else (dist.get_rank(group), dist.get_world_size(group))


def _my_range(n: int, batch_size: int, rank: int, world: int) -> tuple[int, int]:
    """Items ``[a, b)`` of rank ``rank``: a contiguous run of whole batches."""
    batches = (n + batch_size - 1) // batch_size
    lo, hi = rank * batches // world, (rank + 1) * batches // world
    return min(n, lo * batch_size), min(n, hi * batch_size)


def _image_batches(dataset, a: int, b: int, batch_size: int) -> Iterator[Tensor]:
    for start in range(a, b, batch_size):
        yield torch.stack([dataset.image(i, train=False) for i in range(start, min(b, start +
                                                                                    batch_size))])


def _item_bytes(tokens: Tokens) -> int:
    return sum(t[0].numel() * 4 for t in tokens.levels)


def _sized(batches: Iterator[Tokens], shard_size: int | None, shard_bytes: int
           ) -> tuple[Iterator[Tokens], int]:
    """(the same batches, items per shard): ``shard_size``, else ``shard_bytes`` of float32
    tokens (the writer holds up to a shard before writing it)."""
    first = next(batches)
    size = shard_size or max(1, shard_bytes // _item_bytes(first))

    def again() -> Iterator[Tokens]:
        yield first
        yield from batches

    return again(), size


def _parts(folder: Path, side: str, world: int) -> list[TokenStore]:
    parts = []
    for r in range(world):
        path = folder / f"{side}.{r}"
        parts.append(TokenStore.open(path) if path.exists() else None)
    return [p for p in parts if p is not None]


def _read(parts: list[TokenStore], a: int, b: int) -> Tokens:
    """Items ``[a, b)`` of the concatenated parts, in memory."""
    pieces, first = [], 0
    for part in parts:
        lo, hi = max(a, first), min(b, first + len(part))
        if lo < hi:
            levels, lengths = part[lo - first:hi - first].read()
            pieces.append(Tokens(levels, list(lengths)))
        first += len(part)
    return Tokens.cat(pieces)


def _trim(tokens: Tokens) -> Tokens:
    """Padding cut to the longest item of each level (as ``Tokens.cat`` pads in memory)."""
    levels = [t[:, :max(1, int(n.max()))] for t, n in zip(tokens.levels, tokens.lengths)]
    return Tokens(levels, tokens.lengths)


def encode_to_store(model: RetrievalModel, dataset, tokenizer, device: torch.device,
                    folder: Path, *, batch_size: int, count: int | None = None,
                    amp: bool = False, progress: bool = True, group=None,
                    shard_size: int | None = None, memory_budget: int = 1 << 30) -> None:
    """Encode this rank's batches of images and captions into ``folder/{images,texts}.<rank>``
    (shards of ``shard_size`` items, else of a quarter of ``memory_budget``)."""
    rank, world = _rank_world(group)
    n_img = dataset.n_images if count is None else count
    cpi = dataset.captions_per_image
    a, b = _my_range(n_img, batch_size, rank, world)
    if a < b:
        batches, size = _sized(image_tokens(model, _image_batches(dataset, a, b, batch_size),
                                            device, amp), shard_size, memory_budget // 4)
        with tqdm(total=b - a, desc="encode images", disable=not progress, leave=False) as bar:
            write_store(folder / f"images.{rank}", batches, dtype=torch.float32,
                        ids=list(range(a, b)), shard_size=size, progress=bar)
    a, b = _my_range(n_img * cpi, batch_size, rank, world)
    if a < b:
        captions = dataset.captions[a:b]
        batches, size = _sized(caption_tokens(model, tokenizer, captions, batch_size, device,
                                              amp), shard_size, memory_budget // 4)
        with tqdm(total=b - a, desc="encode captions", disable=not progress, leave=False) as bar:
            write_store(folder / f"texts.{rank}", batches, tokens=tokenizer.max_tokens,
                        dtype=torch.float32,
                        ids=list(range(a, b)), shard_size=size, progress=bar)


@torch.no_grad()
def score_from_store(model: RetrievalModel, folder: Path, device: torch.device, *,
                     memory_budget: int = 1 << 30, progress: bool = True, group=None) -> Tensor:
    """The ``[n_images, n_captions]`` float32 score matrix (CPU) of the stores in
    ``folder``; under ``group`` each rank scores its blocks of rows, then all gather."""
    rank, world = _rank_world(group)
    images, texts = _parts(folder, "images", world), _parts(folder, "texts", world)
    n_img, n_cap = sum(len(p) for p in images), sum(len(p) for p in texts)
    image_bytes = sum(t * d * 4 for t, d in images[0].levels)
    caption_bytes = sum(t * d * 4 for t, d in texts[0].levels)
    rows = max(1, min(n_img, memory_budget // max(1, 4 * n_cap), memory_budget // 2 // image_bytes))
    cols = max(1, min(n_cap, memory_budget // 2 // caption_bytes))
    starts = list(range(0, n_img, rows))
    mine = starts[rank::world]
    out = torch.zeros(max(1, (len(starts) + world - 1) // world) * rows, n_cap)
    for n, start in enumerate(tqdm(mine, desc="score", disable=not progress, leave=False)):
        block = _trim(_read(images, start, min(n_img, start + rows))).to(device)
        for first in range(0, n_cap, cols):
            chunk = _trim(_read(texts, first, min(n_cap, first + cols))).to(device)
            s = model.score(block, chunk, memory_budget).float().cpu()
            out[n * rows:n * rows + len(block), first:first + len(chunk)] = s
    if group is None:
        return out[:n_img]
    comm = (torch.device("cuda", torch.cuda.current_device())
            if dist.get_backend(group) == "nccl" else torch.device("cpu"))
    parts = [torch.empty_like(out, device=comm) for _ in range(world)]
    dist.all_gather(parts, out.to(comm), group=group)
    sims = torch.empty(n_img, n_cap)
    for j, start in enumerate(starts):
        r, n = j % world, j // world
        sims[start:start + rows] = parts[r][n * rows:n * rows + min(rows, n_img - start)].cpu()
    return sims


def score_with_store(model: RetrievalModel, dataset, tokenizer, device: torch.device, *,
                     folder: str | Path | None = None, batch_size: int = 128,
                     count: int | None = None, memory_budget: int = 1 << 30,
                     amp: bool = False, progress: bool = True, group=None,
                     shard_size: int | None = None) -> Tensor:
    """The score matrix of the first ``count`` images of ``dataset`` and their captions, as
    ``hatmodel.evaluate.score_matrix`` gives it, through token stores in ``folder`` (kept;
    default: a temporary folder, removed). Under ``group`` every rank passes the same
    arguments and returns the whole matrix."""
    rank, world = _rank_world(group)
    was_training = model.training
    model.eval()
    tmp = None
    try:
        if folder is None:  # the same name on every rank, from torchrun's rendezvous
            run = f"{os.environ.get('MASTER_PORT', '')}-{os.environ.get('TORCHELASTIC_RUN_ID', '')}"
            tmp = (tempfile.mkdtemp(prefix="hatmodel-eval-") if group is None else
                   os.path.join(tempfile.gettempdir(), f"hatmodel-eval-{run}"))
            folder = tmp
        folder = Path(folder)
        if folder.exists() and any(folder.iterdir()):  # checked by every rank, before writing
            raise ValueError(f"eval.store: {folder} is not empty (give a new or empty folder)")
        if group is not None:
            dist.barrier(group)
        folder.mkdir(parents=True, exist_ok=True)
        encode_to_store(model, dataset, tokenizer, device, folder, batch_size=batch_size,
                        count=count, amp=amp, progress=progress, group=group,
                        shard_size=shard_size, memory_budget=memory_budget)
        if group is not None:
            dist.barrier(group)
        sims = score_from_store(model, folder, device, memory_budget=memory_budget,
                                progress=progress, group=group)
    finally:
        model.train(was_training)
        if group is not None:
            dist.barrier(group)
        if tmp and rank == 0:
            shutil.rmtree(tmp, ignore_errors=True)
    return sims


def wants_store(model: RetrievalModel, tokenizer, n_captions: int, memory_budget: int,
                device: torch.device) -> bool:
    """Whether the caption tokens alone (``n_captions`` x ``max_tokens`` x the level dims,
    float32) would exceed ``memory_budget``: then evaluation goes through a store."""
    was_training = model.training
    model.eval()  # no dropout: the probe draws no random numbers
    try:
        (probe,) = caption_tokens(model, tokenizer, ["a"], 1, device)
    finally:
        model.train(was_training)
    size = n_captions * tokenizer.max_tokens * sum(t.shape[2] for t in probe.levels) * 4
    return size > memory_budget


__all__ = ["encode_to_store", "score_with_store", "init_distributed", "score_from_store",
           "wants_store"]
