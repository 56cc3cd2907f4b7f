"""``TokenStore``: a gallery's token sets on disk, read back memory-mapped, shard by shard.

A store is a folder::

    manifest.json            format, count, dtype, levels (tokens, dim), id kind,
                             fingerprint of the model that made it, shards (file, count, bytes)
    shard-00000.safetensors  tokens.<l> [n, T_l, D_l] (the store's dtype), lengths.<l> [n]
    shard-00001.safetensors  int64 for every level l; metadata "ids": the n ids as JSON
    ...

Items keep the order in which they were added; item ``i`` of the store is gallery index ``i``
for :func:`hatkernels.hier_topk`. A store is written into a hidden temporary folder beside its
destination and renamed into place only after the manifest (written last) is on disk, so a
writer that is killed never leaves a folder that opens as a store. Reading never unpickles
anything: tensors come from safetensors, everything else from JSON.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from collections.abc import Iterator, Sequence
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file
from torch import Tensor

FORMAT = "hatkernels-tokenstore-1"
MANIFEST = "manifest.json"
DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}
DEFAULT_SHARD_SIZE = 16384

Id = int | str


def _dtype_name(dtype: torch.dtype) -> str:
    for name, d in DTYPES.items():
        if d == dtype:
            return name
    raise TypeError(f"dtype: expected float32, float16 or bfloat16, got {dtype}")


def _check_shapes(levels: object, name: str) -> list[tuple[int, int]]:
    """``[(tokens, dim), ...]`` from a sequence of pairs of positive ints."""
    if isinstance(levels, (str, bytes)) or not isinstance(levels, Sequence) or not levels:
        raise TypeError(f"{name}: expected a non-empty sequence of (tokens, dim) pairs")
    out = []
    for level, pair in enumerate(levels):
        if (
            not isinstance(pair, Sequence)
            or len(pair) != 2
            or not all(isinstance(x, int) and not isinstance(x, bool) and x > 0 for x in pair)
        ):
            raise ValueError(f"{name}[{level}]: expected a (tokens, dim) pair of positive ints, "
                             f"got {pair!r}")
        out.append((int(pair[0]), int(pair[1])))
    return out


def temporary_folder(dest: Path) -> Path:
    """A new hidden folder beside ``dest`` (same file system, so it can be renamed to
    ``dest``), with the permissions of an ordinary new folder (not ``mkdtemp``'s 0700)."""
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=dest.parent, prefix=f".{dest.name}.tmp-"))
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(tmp, 0o777 & ~umask)
    return tmp


def fsync_dir(path: Path) -> None:
    """Flush the folder ``path`` itself to disk, so that the names created, renamed or
    removed in it last through a crash."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


class TokenStoreWriter:
    """Adds batches of items to a new store; :meth:`close` makes it appear at ``path``.

    Use :meth:`TokenStore.writer`. As a context manager, an exception inside the block removes
    the temporary folder and leaves ``path`` untouched.
    """

    def __init__(self, path: str | Path, levels: Sequence[tuple[int, int]], *,
                 dtype: torch.dtype = torch.float16, fingerprint: str = "",
                 shard_size: int = DEFAULT_SHARD_SIZE, overwrite: bool = False) -> None:
        self.path = Path(path)
        self.levels = _check_shapes(levels, "levels")
        self.dtype_name = _dtype_name(dtype)
        self.dtype = dtype
        if not isinstance(fingerprint, str):
            raise TypeError(f"fingerprint: expected a string, got {type(fingerprint).__name__}")
        if isinstance(shard_size, bool) or not isinstance(shard_size, int) or shard_size < 1:
            raise ValueError(f"shard_size: expected a positive int, got {shard_size!r}")
        if self.path.exists() and not overwrite and (
            not self.path.is_dir() or any(self.path.iterdir())
        ):
            raise ValueError(f"path: {self.path} already exists (pass overwrite=True to replace)")
        self.fingerprint = fingerprint
        self.shard_size = shard_size
        self.overwrite = overwrite
        self._tmp = temporary_folder(self.path)
        self._pending: list[tuple[list[Tensor], list[Tensor], list[Id]]] = []
        self._pending_count = 0
        self._shards: list[dict] = []
        self._count = 0
        self._id_kind: str | None = None
        self._closed = False

    def add(self, levels: Tensor | Sequence[Tensor], lengths: Tensor | Sequence[Tensor | None]
            | None = None, ids: Sequence[Id] | Tensor | None = None) -> None:
        """Append ``B`` items: ``levels[l]`` is ``[B, t, D_l]`` with ``t <= T_l`` (zero-padded
        to the store's ``T_l``), ``lengths`` as in ``hier_align`` (``None``: all ``t`` valid),
        ``ids`` ``B`` ints or strings (default: the items' running index)."""
        if self._closed:
            raise ValueError("writer: already closed")
        tokens = [levels] if isinstance(levels, Tensor) else list(levels)
        if len(tokens) != len(self.levels):
            raise ValueError(f"levels: expected {len(self.levels)} levels, got {len(tokens)}")
        batch = tokens[0].shape[0] if isinstance(tokens[0], Tensor) else -1
        padded = []
        for level, (t, (size, dim)) in enumerate(zip(tokens, self.levels)):
            if not isinstance(t, Tensor) or not t.dtype.is_floating_point:
                raise TypeError(f"levels[{level}]: expected a floating-point tensor")
            if t.dim() != 3 or t.shape[0] != batch or t.shape[2] != dim or t.shape[1] > size:
                raise ValueError(f"levels[{level}]: expected shape [{batch}, <= {size}, {dim}], "
                                 f"got {tuple(t.shape)}")
            t = t.detach().to("cpu", self.dtype)
            padded.append(torch.nn.functional.pad(t, (0, 0, 0, size - t.shape[1])).contiguous())
        per_level = lengths if isinstance(lengths, Sequence) else [lengths] * len(tokens)
        if len(per_level) != len(tokens):
            raise ValueError(f"lengths: expected {len(tokens)} entries (one per level), "
                             f"got {len(per_level)}")
        lens = []
        for level, (n, t) in enumerate(zip(per_level, tokens)):
            if n is None:
                n = torch.full((batch,), t.shape[1], dtype=torch.int64)
            if not isinstance(n, Tensor) or n.dtype.is_floating_point or n.shape != (batch,):
                raise ValueError(f"lengths[{level}]: expected an integer tensor of shape "
                                 f"({batch},)")
            n = n.detach().to("cpu", torch.int64)
            if batch and (int(n.min()) < 1 or int(n.max()) > t.shape[1]):
                raise ValueError(f"lengths[{level}]: values must lie in [1, {t.shape[1]}]")
            lens.append(n)
        if ids is None:
            ids = list(range(self._count + self._pending_count,
                             self._count + self._pending_count + batch))
        ids = ids.tolist() if isinstance(ids, Tensor) else list(ids)
        if len(ids) != batch:
            raise ValueError(f"ids: expected {batch} ids, got {len(ids)}")
        kinds = {"int" if isinstance(i, int) and not isinstance(i, bool) else
                 "str" if isinstance(i, str) else "bad" for i in ids}
        if "bad" in kinds or len(kinds | ({self._id_kind} if self._id_kind else set())) > 1:
            raise TypeError("ids: expected all ints or all strings (one kind per store)")
        if kinds:
            self._id_kind = kinds.pop()
        self._pending.append((padded, lens, ids))
        self._pending_count += batch
        while self._pending_count >= self.shard_size:
            self._flush(self.shard_size)

    def _flush(self, count: int) -> None:
        """Write the first ``count`` pending items as the next shard."""
        levels = [torch.cat([p[0][l] for p in self._pending]) for l in range(len(self.levels))]
        lens = [torch.cat([p[1][l] for p in self._pending]) for l in range(len(self.levels))]
        ids = [i for p in self._pending for i in p[2]]
        tensors = {}
        for l in range(len(self.levels)):
            tensors[f"tokens.{l}"] = levels[l][:count].contiguous()
            tensors[f"lengths.{l}"] = lens[l][:count].contiguous()
        name = f"shard-{len(self._shards):05d}.safetensors"
        file = self._tmp / name
        save_file(tensors, str(file), metadata={"format": FORMAT, "ids": json.dumps(ids[:count])})
        os.chmod(file, os.stat(self._tmp).st_mode & 0o666)
        self._shards.append({"file": name, "count": count, "bytes": file.stat().st_size})
        self._count += count
        rest = self._pending_count - count
        self._pending = ([([t[count:] for t in levels], [n[count:] for n in lens], ids[count:])]
                         if rest else [])
        self._pending_count = rest

    def close(self) -> TokenStore:
        """Write the last shard and the manifest, then move the store to ``path``."""
        if self._closed:
            raise ValueError("writer: already closed")
        if self._pending_count:
            self._flush(self._pending_count)
        manifest = {
            "format": FORMAT, "count": self._count, "dtype": self.dtype_name,
            "levels": [{"tokens": t, "dim": d} for t, d in self.levels],
            "ids": self._id_kind or "int", "fingerprint": self.fingerprint,
            "shards": self._shards,
        }
        with open(self._tmp / MANIFEST, "w") as f:
            json.dump(manifest, f, indent=1)
            f.flush()
            os.fsync(f.fileno())
        fsync_dir(self._tmp)
        old = None
        if self.path.exists():
            old = Path(tempfile.mkdtemp(dir=self.path.parent, prefix=f".{self.path.name}.old-"))
            os.replace(self.path, old / "store")
        os.replace(self._tmp, self.path)
        fsync_dir(self.path.parent)
        if old is not None:
            shutil.rmtree(old)
        self._closed = True
        return TokenStore.open(self.path)

    def abort(self) -> None:
        """Drop everything written so far; ``path`` stays as it was."""
        self._closed = True
        shutil.rmtree(self._tmp, ignore_errors=True)

    def __enter__(self) -> TokenStoreWriter:
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is not None:
            self.abort()
        elif not self._closed:
            self.close()


class TokenStore:
    """Items ``[start, stop)`` of a store folder (the whole store from :meth:`open`; slicing
    with ``store[a:b]`` gives a view). Tensors are read lazily, shard by shard, through
    ``safetensors.safe_open`` (memory-mapped)."""

    def __init__(self, path: Path, manifest: dict, start: int, stop: int) -> None:
        self.path = path
        self.manifest = manifest
        self.start, self.stop = start, stop

    # --- opening and writing -------------------------------------------------------------
    @classmethod
    def open(cls, path: str | Path, *, fingerprint: str | None = None) -> TokenStore:
        """The store at ``path``, checked: manifest, every shard present at its full size,
        and (when given) the fingerprint of the model that must have made it."""
        path = Path(path)
        file = path / MANIFEST
        if not file.is_file():
            raise ValueError(f"path: {path} is not a token store (no {MANIFEST})")
        try:
            manifest = json.loads(file.read_text())
            levels = _check_shapes([(e["tokens"], e["dim"]) for e in manifest["levels"]],
                                   "manifest levels")
            if manifest["format"] != FORMAT or manifest["dtype"] not in DTYPES:
                raise ValueError(f"format {manifest['format']!r}, dtype {manifest['dtype']!r}")
            counts = [int(s["count"]) for s in manifest["shards"]]
            if sum(counts) != int(manifest["count"]) or manifest["ids"] not in ("int", "str"):
                raise ValueError("shard counts do not add up to the count")
        except (KeyError, TypeError, ValueError, json.JSONDecodeError) as e:
            raise ValueError(f"path: {file} is not a valid token store manifest ({e})") from e
        for shard in manifest["shards"]:
            f = path / shard["file"]
            if Path(shard["file"]).name != shard["file"]:
                raise ValueError(f"path: {file} names a shard outside the store: {shard['file']}")
            if not f.is_file():
                raise ValueError(f"path: shard {f} is missing")
            if f.stat().st_size != int(shard["bytes"]):
                raise ValueError(f"path: shard {f} is truncated or altered "
                                 f"({f.stat().st_size} bytes, expected {shard['bytes']})")
        if fingerprint is not None and manifest["fingerprint"] != fingerprint:
            raise ValueError(f"fingerprint: the store at {path} was made by model "
                             f"{manifest['fingerprint']!r}, not by {fingerprint!r}")
        manifest["levels"] = levels
        return cls(path, manifest, 0, int(manifest["count"]))

    @staticmethod
    def writer(path: str | Path, levels: Sequence[tuple[int, int]], *,
               dtype: torch.dtype = torch.float16, fingerprint: str = "",
               shard_size: int = DEFAULT_SHARD_SIZE, overwrite: bool = False
               ) -> TokenStoreWriter:
        """A writer of a new store at ``path`` with ``levels`` ``[(T_l, D_l), ...]``."""
        return TokenStoreWriter(path, levels, dtype=dtype, fingerprint=fingerprint,
                                shard_size=shard_size, overwrite=overwrite)

    @classmethod
    def write(cls, path: str | Path, levels: Tensor | Sequence[Tensor],
              lengths: Tensor | Sequence[Tensor | None] | None = None,
              ids: Sequence[Id] | None = None, *, dtype: torch.dtype = torch.float16,
              fingerprint: str = "", shard_size: int = DEFAULT_SHARD_SIZE,
              overwrite: bool = False) -> TokenStore:
        """Write in-memory token sets (as for ``hier_align``) as a store in one call."""
        tokens = [levels] if isinstance(levels, Tensor) else list(levels)
        if not tokens or not all(isinstance(t, Tensor) and t.dim() == 3 for t in tokens):
            raise TypeError("levels: expected a [B, T, D] tensor or a sequence of them")
        shapes = [(int(t.shape[1]), int(t.shape[2])) for t in tokens]
        with cls.writer(path, shapes, dtype=dtype, fingerprint=fingerprint,
                        shard_size=shard_size, overwrite=overwrite) as w:
            w.add(tokens, lengths, ids)
            return w.close()

    # --- what it holds --------------------------------------------------------------------
    def __len__(self) -> int:
        return self.stop - self.start

    def __getitem__(self, index: slice) -> TokenStore:
        if not isinstance(index, slice) or index.step not in (None, 1):
            raise TypeError("index: a store slices with store[a:b] (contiguous) only")
        a, b, _ = index.indices(len(self))
        return TokenStore(self.path, self.manifest, self.start + a, self.start + max(a, b))

    def __repr__(self) -> str:
        return (f"TokenStore({str(self.path)!r}, items {self.start}:{self.stop} of "
                f"{self.manifest['count']}, {self.manifest['dtype']}, levels {self.levels})")

    @property
    def levels(self) -> list[tuple[int, int]]:
        """``[(T_l, D_l), ...]``: padded tokens and feature size per level."""
        return list(self.manifest["levels"])

    @property
    def dtype(self) -> torch.dtype:
        return DTYPES[self.manifest["dtype"]]

    @property
    def fingerprint(self) -> str:
        return self.manifest["fingerprint"]

    def split(self, rank: int, world: int) -> TokenStore:
        """Rank ``rank``'s contiguous part of ``world`` parts (lower ranks first), cut at shard
        boundaries (near-equal in shards), so that :func:`hatkernels.hier_topk` scores each
        rank's part in the same chunks as one process scoring the whole view would."""
        if not 0 <= rank < world:
            raise ValueError(f"rank: expected 0 <= rank < {world}, got {rank}")
        cuts = [self.start] + [first + a for _, first, a, _ in self._shards()][1:] + [self.stop]
        n = len(cuts) - 1
        a, b = cuts[rank * n // world], cuts[(rank + 1) * n // world]
        return TokenStore(self.path, self.manifest, a, b)

    def _shards(self) -> Iterator[tuple[Path, int, int, int]]:
        """(file, first global index, local start, local stop) of each shard overlapping."""
        first = 0
        for shard in self.manifest["shards"]:
            a, b = max(self.start, first), min(self.stop, first + shard["count"])
            if a < b:
                yield self.path / shard["file"], first, a - first, b - first
            first += shard["count"]

    def chunks(self, size: int | None = None) -> Iterator[tuple[int, list[Tensor], list[Tensor]]]:
        """``(offset, levels, lengths)`` blocks in order, ``offset`` counted from this view's
        first item. Blocks end at every shard's end and, within a shard, at multiples of
        ``size`` from the shard's start (default: whole shards), whatever the view, so two
        views cut at such boundaries yield the same blocks. Each block is read from its
        shard file when it is reached."""
        for file, first, a, b in self._shards():
            with safe_open(str(file), framework="pt") as f:
                step = b if size is None else size
                s = a
                while s < b:
                    e = min(b, s // step * step + step)
                    levels = [f.get_slice(f"tokens.{l}")[s:e] for l in range(len(self.levels))]
                    lens = [f.get_slice(f"lengths.{l}")[s:e] for l in range(len(self.levels))]
                    yield first + s - self.start, levels, lens
                    s = e

    def read(self) -> tuple[list[Tensor], list[Tensor]]:
        """All of this view's items in memory: ``(levels, lengths)``."""
        parts = list(self.chunks())
        if not parts:
            return ([torch.empty(0, t, d, dtype=self.dtype) for t, d in self.levels],
                    [torch.empty(0, dtype=torch.int64) for _ in self.levels])
        return ([torch.cat([p[1][l] for p in parts]) for l in range(len(self.levels))],
                [torch.cat([p[2][l] for p in parts]) for l in range(len(self.levels))])

    @property
    def ids(self) -> list[Id]:
        """The ids of this view's items, in order."""
        out: list[Id] = []
        for file, _, a, b in self._shards():
            with safe_open(str(file), framework="pt") as f:
                out.extend(json.loads((f.metadata() or {})["ids"])[a:b])
        return out


__all__ = ["TokenStore", "TokenStoreWriter"]
