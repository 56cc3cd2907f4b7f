"""Data-parallel training over several processes (``torchrun``), exact to the one-process run.

``train.batch_size`` is the global batch. Every rank encodes its own slice of it (rank ``r``
takes rows ``[r * b, (r + 1) * b)``, ``b = batch_size / world_size``), then:

1. the caption tokens of every level, and their lengths, are all-gathered with gradients
   (:func:`gather_with_grad`); captions of another rank may be longer, so each level is padded
   to the longest one first (the lengths say which tokens are valid);
2. each rank scores its own images against all captions (one ``model.score`` call: a
   ``[b, B]`` block of rows of the batch's score matrix);
3. the rows are all-gathered with gradients into the whole ``[B, B]`` matrix, and every rank
   computes the one-process loss on it (a few ``B * B`` scalars: cheaper than splitting any
   loss into per-rank pieces, and exact for every loss, hardest negatives included).

The gathers' backward sums the gradients of all ranks onto the rank that owns the rows, so
each rank's parameter gradient is ``world_size`` times its share of the one-process gradient;
:func:`average_gradients` (one all-reduce, then divided by the world size) leaves every rank
with the one-process gradient, in any training phase (frozen parameters have no gradient on
any rank). Clipping, loss scaling and the optimizer then act identically on every rank.

Only rank 0 writes (logs, plots, checkpoints) and evaluates; the others wait for it in
:func:`agree` / :func:`share`, which run on a CPU (gloo) group of their own with no practical
timeout, so an evaluation longer than ``train.distributed.timeout_s`` never cuts the run. Every
training collective is bounded by ``train.distributed.timeout_s``, so a rank that hangs in a
step ends the others with an error instead of a silent wait, and a rank that dies is noticed at
once (its connections close). Ranks draw dropout and
augmentations from their own generators, reseeded at each epoch from
``(seed, epoch, rank)``, so a resumed run matches an uninterrupted one for any rank count.
"""

from __future__ import annotations

import hashlib
import json
import os
import sys
from dataclasses import dataclass
from datetime import timedelta
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
from torch import Tensor, nn

from .data import Batch
from .models import RetrievalModel, Tokens
from .runtime import seed_everything

#: how long ranks wait for rank 0's evaluation and writing (no practical limit: a dead rank 0
#: is noticed by its closed connections, not by a timeout)
WAIT_TIMEOUT = timedelta(days=30)

#: environment variables that torchrun (and any launcher following its protocol) sets
ENV_KEYS = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")


@dataclass(frozen=True)
class Context:
    """Where this process stands: its rank among ``world_size`` processes, its rank on its
    own machine, and the device that collective buffers live on (the GPU under NCCL, else
    the CPU). ``Context()`` is the one-process run."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    comm_device: torch.device = torch.device("cpu")
    #: a CPU (gloo) group without a practical timeout, for waiting on rank 0's evaluation
    wait_group: Any = None

    @property
    def active(self) -> bool:
        """More than one process: the collectives below do something."""
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        """Rank 0: the process that logs, evaluates and writes the run folder."""
        return self.rank == 0


SINGLE = Context()


def launched() -> bool:
    """Whether this process was started by torchrun with more than one process."""
    return int(os.environ.get("WORLD_SIZE", "1")) > 1


def restarted() -> bool:
    """Whether torchrun restarted this worker group after a failure (elastic restarts)."""
    return int(os.environ.get("TORCHELASTIC_RESTART_COUNT", "0")) > 0


def setup(cfg: dict[str, Any], device: torch.device,
          resume: bool = False) -> tuple[Context, torch.device]:
    """Join the process group torchrun describes (or reuse one already joined) and return the
    context and this rank's device (``cuda:LOCAL_RANK`` when ``device`` is an unnumbered GPU).

    Without torchrun (or with one process) nothing happens: ``(SINGLE, device)``. Checks
    that the global batch splits evenly, and that every rank runs the same config and the
    same ``resume`` (a mismatch would otherwise hang at the first differing collective).
    """
    if not launched() and not (dist.is_available() and dist.is_initialized()):
        return SINGLE, device
    missing = [k for k in ENV_KEYS if k not in os.environ]
    if missing and not dist.is_initialized():
        raise ValueError(f"{missing[0]}: not set; start several processes with torchrun")
    world = int(os.environ["WORLD_SIZE"]) if not dist.is_initialized() else dist.get_world_size()
    batch = int(cfg["train"]["batch_size"])
    if batch % world:
        raise ValueError(f"train.batch_size: the global batch ({batch}) must be divisible by "
                         f"the number of processes ({world})")
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if device.type == "cuda" and device.index is None:
        device = torch.device("cuda", local_rank)
    if device.type == "cuda":
        torch.cuda.set_device(device)
    settings = cfg["train"]["distributed"]
    if not dist.is_initialized():
        backend = settings["backend"] or ("nccl" if device.type == "cuda" else "gloo")
        dist.init_process_group(backend, timeout=timedelta(seconds=float(settings["timeout_s"])))
    comm = device if dist.get_backend() == "nccl" else torch.device("cpu")
    wait_group = dist.new_group(backend="gloo", timeout=WAIT_TIMEOUT)
    ctx = Context(dist.get_rank(), dist.get_world_size(), local_rank, comm, wait_group)
    _check_same_everywhere({"config": cfg, "resume": bool(resume)}, ctx)
    return ctx, device


def shutdown() -> None:
    """Leave the process group, if this process joined one.

    After a normal end every rank first waits for the others: a rank that tears down its
    connections while another still finishes the last collective can make that one abort
    (gloo: "terminate called without an active exception"). Called while an exception
    propagates (from a ``finally``), it leaves at once instead of waiting for ranks that may be
    gone."""
    if dist.is_available() and dist.is_initialized():
        if sys.exc_info()[0] is None:
            dist.barrier()
        dist.destroy_process_group()


def _check_same_everywhere(value: Any, ctx: Context) -> None:
    digest = hashlib.sha256(json.dumps(value, sort_keys=True, default=str).encode()).digest()
    mine = torch.tensor([int.from_bytes(digest[:8], "little", signed=True)],
                        device=ctx.comm_device)
    everyone = [torch.empty_like(mine) for _ in range(ctx.world_size)]
    dist.all_gather(everyone, mine)
    differ = [r for r, h in enumerate(everyone) if int(h) != int(everyone[0])]
    if differ:
        raise ValueError(f"config: rank {differ[0]} runs another config or --resume than rank "
                         f"0; start every rank with the same --config, overrides and flags")


def seed_epoch(seed: int, epoch: int, ctx: Context) -> None:
    """Reseed this rank's generators from ``(seed, epoch, rank)`` (several processes only:
    a one-process run keeps one stream through the whole run, as it always did)."""
    if ctx.active:
        seed_everything(int(np.random.SeedSequence([seed, epoch, ctx.rank]).generate_state(1)[0]))


def shard_batches(pairs: Tensor, batch_size: int, ctx: Context) -> Tensor:
    """This rank's rows of each global batch of ``pairs`` (whole batches of ``batch_size``),
    in order: batch ``k`` of the result is rows ``[r * b, (r + 1) * b)`` of global batch
    ``k``."""
    if not ctx.active:
        return pairs
    if len(pairs) < batch_size or len(pairs) % batch_size:
        raise ValueError(f"train.batch_size: {len(pairs)} training pairs do not make whole "
                         f"global batches of {batch_size} to split across processes")
    b = batch_size // ctx.world_size
    return pairs.view(-1, batch_size, *pairs.shape[1:])[:, ctx.rank * b:(ctx.rank + 1) * b
                                                         ].reshape(-1, *pairs.shape[1:])


class _GatherWithGrad(torch.autograd.Function):
    """All-gather along dim 0 (equal shapes on every rank); the backward sums the gradients
    of every rank and returns this rank's slice (a reduce-scatter written as an all-reduce,
    which every backend has)."""

    @staticmethod
    def forward(ctx, tensor: Tensor) -> Tensor:  # type: ignore[override]
        tensor = tensor.contiguous()
        parts = [torch.empty_like(tensor) for _ in range(dist.get_world_size())]
        dist.all_gather(parts, tensor)
        ctx.rows = tensor.shape[0]
        return torch.cat(parts)

    @staticmethod
    def backward(ctx, grad: Tensor) -> Tensor:  # type: ignore[override]
        grad = grad.contiguous().clone()
        dist.all_reduce(grad)
        return grad.narrow(0, dist.get_rank() * ctx.rows, ctx.rows)


def gather_with_grad(tensor: Tensor, ctx: Context) -> Tensor:
    """Every rank's ``tensor`` concatenated along dim 0 in rank order; gradients flow back to
    the rank that owns each slice (summed over the ranks that used it)."""
    return _GatherWithGrad.apply(tensor) if ctx.active else tensor


def gather(tensor: Tensor, ctx: Context) -> Tensor:
    """Every rank's ``tensor`` concatenated along dim 0 in rank order, without gradients."""
    if not ctx.active:
        return tensor
    parts = [torch.empty_like(tensor) for _ in range(ctx.world_size)]
    dist.all_gather(parts, tensor.contiguous())
    return torch.cat(parts)


def gather_tokens(tokens: Tokens, ctx: Context) -> Tokens:
    """Every rank's token sets, level by level, concatenated in rank order (with gradients).

    Levels shorter than another rank's are padded with zeros; lengths are then filled in
    where they were ``None`` (all valid), so padding is never aligned.
    """
    if not ctx.active:
        return tokens
    sizes = gather(torch.tensor([[t.shape[1] for t in tokens.levels]], device=ctx.comm_device),
                   ctx)
    longest, shortest = sizes.amax(0), sizes.amin(0)
    levels, lengths = [], []
    for level, n, size, low in zip(tokens.levels, tokens.lengths, longest.tolist(),
                                   shortest.tolist()):
        padded = nn.functional.pad(level, (0, 0, 0, size - level.shape[1]))
        levels.append(gather_with_grad(padded, ctx))
        if n is None and low == size:
            lengths.append(None)
            continue
        if n is None:
            n = torch.full((len(level),), level.shape[1], dtype=torch.int64)
        lengths.append(gather(n.to(ctx.comm_device), ctx).to(level.device))
    return Tokens(levels, lengths)


def batch_scores(model: RetrievalModel, batch: Batch, ctx: Context) -> tuple[Tensor, Tensor]:
    """The global batch's ``[B, B]`` score matrix (rows images, columns captions, with
    gradients) and its ``[B]`` image indices.

    One process: ``model(...)`` on the batch. Several: this rank's images against every
    rank's captions, rows gathered (see the module's description).
    """
    if not ctx.active:
        return model(batch.images, batch.input_ids, batch.attention_mask), batch.image_index
    images = model.encode_images(batch.images)
    captions = gather_tokens(model.encode_texts(batch.input_ids, batch.attention_mask), ctx)
    rows = model.score(images, captions)
    index = gather(batch.image_index.to(ctx.comm_device), ctx).to(batch.image_index.device)
    return gather_with_grad(rows, ctx), index


def average_gradients(model: nn.Module, ctx: Context) -> None:
    """Average the parameters' gradients over the ranks (one all-reduce per dtype); with the
    gathers above this makes every rank's gradient the one-process gradient."""
    if not ctx.active:
        return
    grads = [p.grad for p in model.parameters() if p.grad is not None]
    for dtype in sorted({g.dtype for g in grads}, key=str):
        same = [g for g in grads if g.dtype == dtype]
        flat = torch.cat([g.reshape(-1) for g in same]).to(ctx.comm_device)
        dist.all_reduce(flat)
        flat /= ctx.world_size
        for g, part in zip(same, flat.split([g.numel() for g in same])):
            g.copy_(part.view_as(g))


def broadcast_module(model: nn.Module, ctx: Context) -> None:
    """Copy rank 0's parameters and buffers to every rank (they start identical anyway, being
    built from the same seed; this makes it certain)."""
    if not ctx.active:
        return
    with torch.no_grad():
        for t in [*model.parameters(), *model.buffers()]:
            buf = t.detach().to(ctx.comm_device)
            dist.broadcast(buf, 0)
            t.copy_(buf)


def agree(flag: bool, ctx: Context) -> bool:
    """Rank 0's ``flag`` on every rank (a decision such as "the time limit is reached" must be
    the same everywhere). Also a synchronisation point: other ranks wait here for rank 0."""
    if not ctx.active:
        return flag
    t = torch.tensor([int(flag)])
    dist.broadcast(t, 0, group=ctx.wait_group)
    return bool(t.item())


def share(values: dict[str, float], ctx: Context) -> dict[str, float]:
    """Rank 0's ``values`` on every rank (the others pass placeholders under the same keys)."""
    if not ctx.active:
        return values
    keys = sorted(values)
    t = torch.tensor([float(values[k]) for k in keys], dtype=torch.float64)
    dist.broadcast(t, 0, group=ctx.wait_group)
    shared = dict(zip(keys, t.tolist()))
    return {k: shared[k] for k in values}


__all__ = [
    "SINGLE", "Context", "agree", "average_gradients", "batch_scores", "broadcast_module",
    "gather", "gather_tokens", "gather_with_grad", "launched", "restarted", "seed_epoch",
    "setup", "share", "shard_batches", "shutdown",
]
