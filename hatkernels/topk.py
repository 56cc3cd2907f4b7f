"""``hier_topk``: exact top-k retrieval over a gallery streamed in chunks through ``hier_align``.

Each chunk of gallery items is scored against all queries with the public ``hier_align``
(so every backend serves it, with the same argument checks), and merged into a running
top-k. The merge is exact and has no ties: each score is packed with its gallery index
into one int64 key that orders by score first and by lower index second, and ``torch.topk``
over unique keys has one answer. The same keys merge the ranks' partial results when the
gallery is sharded over a ``torch.distributed`` group, so every rank returns what one
process would.

Key layout: high 32 bits the float32 score's bits mapped to an order-preserving signed int
(NaN below every number, ``-0.0`` read as ``0.0``), low 32 bits ``2**32 - 1 - index``.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import NamedTuple

import torch
from torch import Tensor

from . import topk_prune
from .api import (
    DEFAULT_MEMORY_BUDGET,
    LengthsArg,
    _as_lengths,
    _as_levels,
    _check_weights,
    hier_align,
)
from .store import TokenStore

QUERIES = ("texts", "images")
MAX_GALLERY = (1 << 32) - 2  # the key holds 32 bits of index; 2**32 - 1 is the padding slot
NAN_KEY = -(1 << 31)  # below the key of -inf
CHUNK_BYTES = 64 << 20  # default working size of one chunk's scores and keys
PAD_KEY = torch.iinfo(torch.int64).min  # an empty slot: below every key
PRUNE_BLOCK = 64  # queries scored together when pruning
# Pruning stops once a chunk's exact scoring would cover more than this share of its pairs
# (the blocks' items, whichever query kept them): a bounds pass costs about half an exact one.
PRUNE_SHARE = 0.35
PRUNE_HOPELESS = 0.9

Gallery = Tensor | Sequence[Tensor] | TokenStore


class TopK(NamedTuple):
    """``values`` float32 ``[Bq, k]`` (descending), ``indices`` int64 ``[Bq, k]`` (gallery)."""

    values: Tensor
    indices: Tensor


def _keys(values: Tensor, index: Tensor) -> Tensor:
    """int64 keys of float scores ``values`` of gallery items ``index`` (same shape)."""
    v = values.float() + 0.0  # -0.0 + 0.0 is +0.0: equal scores get equal keys
    bits = v.view(torch.int32).to(torch.int64)
    bits = torch.where(bits < 0, bits ^ 0x7FFFFFFF, bits)
    bits = torch.where(torch.isnan(v), NAN_KEY, bits)
    return bits * (1 << 32) + ((1 << 32) - 1 - index)


def _chunk_keys(scores: Tensor, index: Tensor, k: int) -> Tensor:
    """Keys of the ``k`` best of ``scores`` ``[Bq, c]`` (column ``j``: gallery item ``index[j]``).

    A float top-k of ``k + 1`` picks them; only rows whose ``k``-th and ``k + 1``-th values
    are equal (a tie at the cut, NaN or -inf included) are keyed in full, so the common case
    keys ``k`` items per row instead of ``c``."""
    c = scores.shape[1]
    k = min(k, c)
    v = scores.float()
    ranked = v.nan_to_num(nan=-torch.inf, posinf=torch.inf, neginf=-torch.inf)
    top = ranked.topk(min(k + 1, c), dim=1)
    cols = top.indices[:, :k]
    keys = _keys(v.gather(1, cols), index[cols])
    if c > k:
        tied = (top.values[:, k] == top.values[:, k - 1]).nonzero().squeeze(1)
        if len(tied):
            every = index.expand(len(tied), -1)
            keys[tied] = _keys(v[tied], every).topk(k, dim=1).values
    return keys


def _decode(keys: Tensor) -> TopK:
    high = keys >> 32
    bits = torch.where(high < 0, high ^ 0x7FFFFFFF, high).to(torch.int32)
    values = torch.where(high == NAN_KEY, torch.nan, bits.view(torch.float32))
    return TopK(values, (1 << 32) - 1 - (keys & 0xFFFFFFFF))


def _merge(best: Tensor | None, keys: Tensor, k: int) -> Tensor:
    """The ``k`` largest of ``best`` and ``keys`` (rows), descending."""
    keys = keys if best is None else torch.cat([best, keys], 1)
    return keys.topk(min(k, keys.shape[1]), dim=1).values


def _gallery_levels(gallery: Tensor | Sequence[Tensor], name: str) -> list[Tensor]:
    levels = [gallery] if isinstance(gallery, Tensor) else list(gallery)
    if not levels or not all(isinstance(t, Tensor) and t.dim() == 3 for t in levels):
        raise TypeError(f"{name}: expected a [B, T, D] tensor, a sequence of them or a "
                        "TokenStore")
    if any(t.shape[0] != levels[0].shape[0] for t in levels):
        raise ValueError(f"{name}: every level must hold the same number of items, got "
                         f"{[t.shape[0] for t in levels]}")
    return levels


def _slice_lengths(lengths: LengthsArg, n: int, a: int, b: int, name: str) -> LengthsArg:
    """Items ``a:b`` of gallery lengths given for ``n`` items (checked to be per-item)."""
    if lengths is None:
        return None
    per_level = [lengths] if isinstance(lengths, Tensor) else list(lengths)
    for t in per_level:
        if isinstance(t, Tensor) and (t.dim() != 1 or t.shape[0] != n):
            raise ValueError(f"{name}: expected one length per gallery item ({n},), "
                             f"got {tuple(t.shape)}")
    cut = [None if t is None else t[a:b] for t in per_level]
    return cut[0] if isinstance(lengths, Tensor) else cut


def _check_store(store: TokenStore, query: Tensor | Sequence[Tensor], lengths: LengthsArg,
                 name: str, other: str) -> None:
    q = [query] if isinstance(query, Tensor) else list(query)
    dims = [d for _, d in store.levels]
    qdims = [t.shape[-1] if isinstance(t, Tensor) else None for t in q]
    if qdims != dims:
        raise ValueError(f"{name}: the store {store.path} holds {len(dims)} levels of dims "
                         f"{dims}; {other} have {len(qdims)} of dims {qdims}")
    if lengths is not None:
        raise ValueError(f"{name[:-1]}_lengths: a TokenStore gallery carries its own lengths; "
                         "pass None")


def _chunks(gallery: Gallery, lengths: LengthsArg, chunk: int, offset: int, name: str,
            like: Tensor):
    """``(start, levels, lengths)`` of each chunk of the gallery, on ``like``'s device and in
    its dtype. Chunks end at global multiples of ``chunk`` (and at a store's shard ends), so
    a gallery split over ranks at such boundaries is scored in the same calls as in one
    process."""
    if isinstance(gallery, TokenStore):
        for start, levels, lens in gallery.chunks(chunk):
            yield (start, [t.to(like.device, like.dtype) for t in levels],
                   [n.to(like.device) for n in lens])
        return
    levels = _gallery_levels(gallery, name)
    n = levels[0].shape[0]
    a = 0
    while a < n:
        b = min(n, (offset + a) // chunk * chunk + chunk - offset)
        yield a, [t[a:b] for t in levels], _slice_lengths(lengths, n, a, b, f"{name[:-1]}_lengths")
        a = b


def _gallery_size(gallery: Gallery, name: str) -> int:
    if isinstance(gallery, TokenStore):
        return len(gallery)
    return _gallery_levels(gallery, name)[0].shape[0]


def _query_size(query: Tensor | Sequence[Tensor], name: str) -> tuple[int, Tensor]:
    first = query if isinstance(query, Tensor) else (list(query) or [None])[0]
    if not isinstance(first, Tensor) or first.dim() != 3:
        raise TypeError(f"{name}: expected a [B, T, D] tensor or a sequence of them")
    return first.shape[0], first


def _all_gather(t: Tensor, group) -> list[Tensor]:
    import torch.distributed as dist

    parts = [torch.empty_like(t) for _ in range(dist.get_world_size(group))]
    dist.all_gather(parts, t.contiguous(), group=group)
    return parts


@torch.no_grad()
def hier_topk(
    images: Gallery,
    texts: Gallery,
    k: int,
    *,
    query: str = "texts",
    image_lengths: LengthsArg = None,
    text_lengths: LengthsArg = None,
    pooling: str = "max",
    direction: str = "t2i",
    reduce: str = "mean",
    lambda_softmax: float = 9.0,
    weights: Sequence[float] | None = None,
    backend: str = "auto",
    memory_budget: int = DEFAULT_MEMORY_BUDGET,
    group=None,
    chunk: int | None = None,
    prune: bool = True,
) -> TopK:
    """The ``k`` best gallery items of every query item, exactly as ``hier_align`` ranks them.

    With ``query="texts"`` the captions are the queries and the images the gallery (text to
    image retrieval); with ``query="images"`` the reverse. The scoring arguments are those
    of ``hier_align`` (``pooling``, ``direction``, ... keep their meaning: ``direction``
    names the alignment, not the retrieval side). The result is what
    ``hier_align(images, texts, ...)`` followed by a top-k per query gives, ties broken
    toward the lower gallery index, without ever holding the dense matrix: the gallery is
    scored ``chunk`` items at a time (peak added memory ``O(Bq * (k + chunk))``).

    Args:
        images, texts: as for ``hier_align``; the gallery side may also be a
            :class:`~hatkernels.TokenStore` (or a slice of one), read shard by shard and cast
            to the query's dtype and device (its lengths come from the store).
        k: how many items per query, ``1 <= k <=`` the gallery's size (all ranks' together).
        query: ``"texts"`` or ``"images"``: which side holds the queries.
        group: a ``torch.distributed`` process group: each rank passes the same queries and
            its own contiguous slice of the gallery (rank ``r``'s slice follows the lower
            ranks'; a slice may be empty). Indices are global and every rank returns the
            merged result, identical to one process scoring the whole gallery.
        chunk: gallery items per ``hier_align`` call (default: about 64 MiB of scores and
            keys); a store's chunks also end at its shard boundaries.
        prune: with max pooling (``t2i`` or ``i2t``) on the cpu backend where the CPU screens
            with int8 codes, bound every score of a chunk first and score exactly, per block
            of queries, only the items that can still enter a query's top ``k``: the same
            items, their values computed in smaller batches (float32 rounding may differ in
            the last bits, as between chunkings). A chunk is scored whole when a probe on its
            first block of queries, or all its blocks, would still score more than a third of
            its pairs; the second such chunk, or one where they would score nearly all of
            them, ends pruning for the call.

    Returns:
        :class:`TopK` ``(values, indices)``: ``values`` float32 ``[Bq, k]`` descending (float64
        scores are rounded to float32 before ranking), ``indices`` int64 ``[Bq, k]``. NaN
        scores rank below every number, ``-inf`` included; among equal scores (or NaNs) the
        lower gallery index comes first.

    No autograd: it runs under ``torch.no_grad()`` (retrieval, not training).
    """
    if query not in QUERIES:
        raise ValueError(f"query: expected one of {QUERIES}, got {query!r}")
    if isinstance(k, bool) or not isinstance(k, int):
        raise TypeError(f"k: expected an int, got {type(k).__name__}")
    if chunk is not None and (isinstance(chunk, bool) or not isinstance(chunk, int) or chunk < 1):
        raise ValueError(f"chunk: expected a positive int or None, got {chunk!r}")
    if not isinstance(prune, bool):
        raise TypeError(f"prune: expected a bool, got {type(prune).__name__}")
    gname, qname = ("images", "texts") if query == "texts" else ("texts", "images")
    gallery, queries = (images, texts) if query == "texts" else (texts, images)
    glengths = image_lengths if query == "texts" else text_lengths
    n_query, first = _query_size(queries, qname)
    if isinstance(gallery, TokenStore):
        _check_store(gallery, queries, glengths, gname, qname)
    n_local = _gallery_size(gallery, gname)
    offset, total = 0, n_local
    if group is not None:
        counts = _all_gather(torch.tensor([n_local], device=first.device), group)
        rank = torch.distributed.get_rank(group)
        sizes = [int(c.item()) for c in counts]
        offset, total = sum(sizes[:rank]), sum(sizes)
    if not 1 <= k <= total:
        raise ValueError(f"k: expected 1 <= k <= {total} (the gallery's size), got {k}")
    if total > MAX_GALLERY:
        raise ValueError(f"{gname}: at most {MAX_GALLERY} gallery items, got {total}")
    if chunk is None:
        chunk = max(1, CHUNK_BYTES // (24 * max(1, n_query)))

    scoring = dict(pooling=pooling, direction=direction, reduce=reduce,
                   lambda_softmax=lambda_softmax, weights=weights, backend=backend,
                   memory_budget=memory_budget)
    q_levels = _as_levels(queries, qname)
    q_lengths = _as_lengths(text_lengths if query == "texts" else image_lengths, q_levels,
                            f"{qname[:-1]}_lengths")

    def score(g_levels: list[Tensor], g_lengths: list[Tensor], rows: slice) -> Tensor:
        """Exact scores ``[queries of rows, gallery items]``."""
        q, ql = [t[rows] for t in q_levels], [n[rows] for n in q_lengths]
        if query == "texts":
            return hier_align(g_levels, q, image_lengths=g_lengths, text_lengths=ql,
                              **scoring).t()
        return hier_align(q, g_levels, image_lengths=ql, text_lengths=g_lengths, **scoring)

    best = torch.full((n_query, k), PAD_KEY, dtype=torch.int64, device=first.device)
    every, misses = slice(None), 0
    for start, levels, lens in _chunks(gallery, glengths, chunk, offset, gname, first):
        lens = _as_lengths(lens, levels, f"{gname[:-1]}_lengths")
        index = torch.arange(offset + start, offset + start + levels[0].shape[0],
                             device=first.device)
        keep = None
        if prune:  # a probe on the first block of queries first: pruning costs a bounds pass
            probe = slice(0, PRUNE_BLOCK)
            keep = _candidates(levels, lens, q_levels, q_lengths, best, probe, query, k, scoring)
            if keep is not None and n_query > PRUNE_BLOCK and _work(keep) <= PRUNE_SHARE:
                keep = _candidates(levels, lens, q_levels, q_lengths, best, every, query, k,
                                   scoring)
            work = 1.0 if keep is None else _work(keep)
            if work > PRUNE_SHARE:
                # The first chunk may fail on its own (it has no exact scores to set the
                # thresholds); a second failure, a hopeless one (every item of a block kept
                # by some query) or no bounds at all ends pruning.
                misses += 1 if work < PRUNE_HOPELESS else 2
                prune, keep = keep is not None and misses < 2, None
        if keep is None:
            best = _merge(best, _chunk_keys(score(levels, lens, every), index, k), k)
            continue
        for q0 in range(0, n_query, PRUNE_BLOCK):
            rows = slice(q0, q0 + PRUNE_BLOCK)
            items = keep[rows].any(0).nonzero().squeeze(1)
            if len(items) == 0:
                continue
            s = score([t[items] for t in levels], [n[items] for n in lens], rows)
            s = s.masked_fill(~keep[rows][:, items], -torch.inf)
            best[rows] = _merge(best[rows], _chunk_keys(s, index[items], k), k)
    if group is not None:
        best = _merge(None, torch.cat(_all_gather(best, group), 1), k)
    return _decode(best)


def _work(keep: Tensor) -> float:
    """The share of a chunk's pairs that pruned scoring computes: per block of queries, every
    item that one of them keeps."""
    items = sum(int(keep[q0:q0 + PRUNE_BLOCK].any(0).sum()) * len(keep[q0:q0 + PRUNE_BLOCK])
                for q0 in range(0, keep.shape[0], PRUNE_BLOCK))
    return items / max(keep.numel(), 1)


def _candidates(levels: list[Tensor], lens: list[Tensor], q_levels: list[Tensor],
                q_lengths: list[Tensor], best: Tensor, rows: slice, query: str, k: int,
                scoring: dict) -> Tensor | None:
    """``[queries of rows, c]``: which (query, chunk item) pairs can still enter the top
    ``k``, from score bounds (``topk_prune``); None where there are none. The arguments are
    first checked as ``hier_align`` checks them (a call on none of the chunk's items)."""
    q_levels, q_lengths = [t[rows] for t in q_levels], [n[rows] for n in q_lengths]
    no_items, no_lengths = [t[:0] for t in levels], [n[:0] for n in lens]
    if query == "texts":
        hier_align(no_items, q_levels, image_lengths=no_lengths, text_lengths=q_lengths,
                   **scoring)
    else:
        hier_align(q_levels, no_items, image_lengths=q_lengths, text_lengths=no_lengths,
                   **scoring)
    weights = _check_weights(scoring["weights"], len(levels))
    settings = {key: scoring[key] for key in ("pooling", "direction", "reduce",
                                             "lambda_softmax", "backend", "memory_budget")}
    if query == "texts":
        bounds = topk_prune.hier_bounds(levels, q_levels, lens, q_lengths, weights, **settings)
    else:
        bounds = topk_prune.hier_bounds(q_levels, levels, q_lengths, lens, weights, **settings)
    if bounds is None:
        return None
    lower, upper = (b.t() for b in bounds) if query == "texts" else bounds
    kept = _decode(best[rows]).values.double()
    return upper >= topk_prune.thresholds(kept, lower, k)[:, None]


__all__ = ["TopK", "hier_topk"]
