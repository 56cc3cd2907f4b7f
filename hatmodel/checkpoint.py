"""Checkpoints of a run folder, committed atomically as a whole, read without pickle.

Layout (``RUN`` is the run folder)::

    RUN/checkpoints/latest.json            the commit point: which epoch folder is complete
    RUN/checkpoints/epoch_0003/
        last.safetensors                   model weights; metadata: config (JSON) and epoch
        best.safetensors                   the best validation rsum so far (a hard link to
                                           the earlier file while it stays the best)
        state.safetensors                  training-state tensors (optimizer moments, torch
                                           RNG states)
        state.json                         everything else: epoch, history, best rsum,
                                           scheduler, AMP scaler, python / numpy RNG states,
                                           optimizer hyper-parameters, the config
        manifest.json                      size and SHA-256 of each file above, written last
    RUN/best.safetensors, RUN/last.safetensors   the committed epoch's weights (hard links)
    RUN/history.json                       the committed epoch's history (per-epoch records)

How an epoch commits: every file of epoch ``N`` is written into ``epoch_N/`` (each through a
temporary file, flushed to disk and renamed), then ``manifest.json``, then ``latest.json`` is
replaced in one ``os.replace``: that rename is the commit. Only then are the older epoch
folders and stale temporary files removed, ``RUN/best.safetensors`` / ``RUN/last.safetensors``
replaced by links to the committed files and ``RUN/history.json`` rewritten. A process killed at any
instant therefore leaves ``latest.json`` naming either the previous complete epoch or the new
one; :func:`find_checkpoint` verifies every file of it against the manifest before anything is
read, and :func:`tidy` removes what a killed writer left behind.

Nothing here unpickles: weights and tensors are safetensors, the rest JSON. A file that is
corrupted, foreign or crafted raises ``ValueError`` naming the file.
"""

from __future__ import annotations

import hashlib
import json
import os
import random
import re
import shutil
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from hatkernels.store import fsync_dir

from .config import apply_overrides, merge_config, validate_config
from .models import RetrievalModel, build_model

FORMAT = "hatmodel-checkpoint-1"
WEIGHTS_FORMAT = "hatmodel-1"
CHECKPOINTS = "checkpoints"
POINTER = "latest.json"
MANIFEST = "manifest.json"
TMP_SUFFIX = ".tmp"
#: the files of one epoch folder besides the manifest
EPOCH_FILES = ("last.safetensors", "best.safetensors", "state.safetensors", "state.json")
#: what a run writes at the top of its folder (a fresh run in an old run's folder removes them;
#: ``last_state.pt`` is the training state of the earlier, pickle-based layout)
RUN_OUTPUTS = ("best.safetensors", "last.safetensors", "history.json", "metrics.json",
               "curves.png", "last_state.pt")
_EPOCH_DIR = re.compile(r"epoch_\d{4,}")
_HASH_CHUNK = 1 << 20


# --- files -------------------------------------------------------------------------------

def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(_HASH_CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


def write_file(path: str | Path, write: Callable[[str], None]) -> str:
    """Write ``path`` atomically: ``write(tmp)`` fills a temporary file beside it, which is
    flushed to disk and renamed over ``path``. Returns the SHA-256 of what was written."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}{TMP_SUFFIX}")
    try:
        write(str(tmp))
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        digest = _sha256(tmp)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return digest


def write_text(path: str | Path, text: str) -> str:
    """:func:`write_file` of a text (JSON, YAML)."""
    return write_file(path, lambda tmp: Path(tmp).write_text(text))


def _write_json(path: Path, obj: Any) -> str:
    return write_text(path, json.dumps(obj, indent=1) + "\n")


def _link(src: Path, dst: Path) -> None:
    """``dst`` atomically replaced by a hard link to ``src`` (a copy where links fail)."""
    def place(tmp: str) -> None:
        try:
            os.link(src, tmp)
        except OSError:
            shutil.copyfile(src, tmp)

    write_file(dst, place)


def read_json(path: str | Path, what: str = "checkpoint") -> Any:
    """The JSON in ``path``; anything else is a ``ValueError`` naming the file."""
    path = Path(path)
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise ValueError(f"{what}: no file at {path}") from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        raise ValueError(f"{what}: {path} is not a readable JSON file ({err})") from None


# --- weights -----------------------------------------------------------------------------

def save_weights(path: str | Path, model: RetrievalModel, cfg: dict[str, Any],
                 epoch: int) -> str:
    """Model weights + config + epoch as one safetensors file, atomically; returns its
    SHA-256."""
    tensors = {k: v.detach().contiguous().cpu() for k, v in model.state_dict().items()}
    meta = {"config": json.dumps(cfg), "epoch": str(epoch), "format": WEIGHTS_FORMAT}
    return write_file(path, lambda tmp: save_file(tensors, tmp, metadata=meta))


def _safetensors_error(path: Path, err: Exception) -> ValueError:
    return ValueError(f"checkpoint: {path} is not a readable safetensors file "
                      f"({type(err).__name__}: {err})")


def read_metadata(path: str | Path) -> tuple[dict[str, Any], int]:
    """(config, epoch) stored in a weights file."""
    path = Path(path)
    if not path.is_file():
        raise ValueError(f"checkpoint: no file at {path}")
    try:
        with safe_open(str(path), framework="pt") as f:
            meta = f.metadata() or {}
    except Exception as err:  # safetensors raises its own error types for foreign bytes
        raise _safetensors_error(path, err) from None
    if "config" not in meta:
        raise ValueError(f"checkpoint: {path} is not a hatmodel checkpoint (no config metadata)")
    try:
        cfg, epoch = json.loads(meta["config"]), int(meta.get("epoch", -1))
    except ValueError as err:
        raise ValueError(f"checkpoint: {path} has unreadable metadata ({err})") from None
    if not isinstance(cfg, dict):
        raise ValueError(f"checkpoint: {path}: its config metadata is not a mapping")
    return cfg, epoch


def _load_tensors(path: Path) -> dict[str, torch.Tensor]:
    try:
        return load_file(str(path))
    except Exception as err:  # safetensors raises its own error types for foreign bytes
        raise _safetensors_error(path, err) from None


def load_weights(path: str | Path, model: RetrievalModel) -> None:
    """Load a weights file into ``model`` (every tensor must fit, none may be missing)."""
    path = Path(path)
    try:
        model.load_state_dict(_load_tensors(path), strict=True)
    except RuntimeError as err:
        raise ValueError(f"checkpoint: {path} does not fit the model its config builds "
                         f"({err})") from None


# --- training state as JSON + tensors ----------------------------------------------------

def _encode(obj: Any, tensors: dict[str, torch.Tensor], name: str) -> Any:
    """``obj`` as JSON, its tensors moved into ``tensors`` (referenced by name); tuples and
    dicts with non-string keys (optimizer state) are tagged so that they come back as they
    were."""
    if isinstance(obj, torch.Tensor):
        tensors[name] = obj.detach().cpu().contiguous()
        return {"__tensor__": name}
    if isinstance(obj, np.ndarray):
        return {"__array__": obj.tolist(), "dtype": str(obj.dtype)}
    if isinstance(obj, tuple):
        return {"__tuple__": [_encode(v, tensors, f"{name}.{i}") for i, v in enumerate(obj)]}
    if isinstance(obj, list):
        return [_encode(v, tensors, f"{name}.{i}") for i, v in enumerate(obj)]
    if isinstance(obj, dict):
        if all(isinstance(k, str) and not k.startswith("__") for k in obj):
            return {k: _encode(v, tensors, f"{name}.{k}") for k, v in obj.items()}
        return {"__items__": [[k, _encode(v, tensors, f"{name}.{k}")] for k, v in obj.items()]}
    if obj is None or isinstance(obj, (bool, int, float, str)):
        return obj
    raise TypeError(f"checkpoint: cannot store a {type(obj).__name__} at {name}")


def _decode(obj: Any, tensors: dict[str, torch.Tensor], path: Path) -> Any:
    """Inverse of :func:`_encode`; an unknown tag or tensor is a ``ValueError`` naming
    ``path``."""
    if isinstance(obj, list):
        return [_decode(v, tensors, path) for v in obj]
    if not isinstance(obj, dict):
        return obj
    if "__tensor__" in obj:
        if obj["__tensor__"] not in tensors:
            raise ValueError(f"checkpoint: {path} refers to tensor {obj['__tensor__']!r}, "
                             "which state.safetensors does not hold")
        return tensors[obj["__tensor__"]]
    if "__array__" in obj:
        return np.asarray(obj["__array__"], dtype=np.dtype(obj["dtype"]))
    if "__tuple__" in obj:
        return tuple(_decode(v, tensors, path) for v in obj["__tuple__"])
    if "__items__" in obj:
        return {k: _decode(v, tensors, path) for k, v in obj["__items__"]}
    if any(k.startswith("__") for k in obj):
        raise ValueError(f"checkpoint: {path} holds an unknown entry {sorted(obj)}")
    return {k: _decode(v, tensors, path) for k, v in obj.items()}


def rng_states() -> dict[str, Any]:
    """Every random generator's state (python, numpy, torch CPU and CUDA)."""
    state = {"python": random.getstate(), "numpy": np.random.get_state(),
             "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_states(state: dict[str, Any]) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


# --- epochs ------------------------------------------------------------------------------

@dataclass
class Checkpoint:
    """A committed, verified epoch of a run folder (``state``: its ``state.json``, tensors
    not yet loaded)."""

    folder: Path
    epoch: int
    state: dict[str, Any]

    @property
    def config(self) -> dict[str, Any]:
        return self.state["config"]


def _checkpoints(out_dir: Path) -> Path:
    return Path(out_dir) / CHECKPOINTS


def _committed_folder(out_dir: Path) -> Path | None:
    """The epoch folder ``latest.json`` names (unverified), or ``None`` before any commit."""
    pointer = _checkpoints(out_dir) / POINTER
    if not pointer.is_file():
        return None
    entry = read_json(pointer, "resume")
    folder = entry.get("folder") if isinstance(entry, dict) else None
    if not isinstance(folder, str) or not _EPOCH_DIR.fullmatch(folder) \
            or entry.get("format") != FORMAT or not isinstance(entry.get("epoch"), int):
        raise ValueError(f"resume: {pointer} is not a hatmodel checkpoint pointer "
                         f"(expected format {FORMAT!r} and an epoch folder)")
    return pointer.parent / folder


def save_checkpoint(out_dir: str | Path, *, epoch: int, model: RetrievalModel,
                    cfg: dict[str, Any], optimizer: torch.optim.Optimizer, scheduler: Any,
                    scaler: Any, history: list[dict[str, Any]], best_rsum: float,
                    improved: bool) -> Path:
    """Write and commit epoch ``epoch`` (``improved``: its weights are the new best), then
    :func:`tidy`. Returns the committed folder."""
    out_dir = Path(out_dir)
    root = _checkpoints(out_dir)
    folder = root / f"epoch_{epoch:04d}"
    previous = _committed_folder(out_dir)
    if previous == folder:
        raise ValueError(f"checkpoint: epoch {epoch} is already committed in {folder}")
    if folder.exists():  # a killed attempt at this epoch
        shutil.rmtree(folder)
    folder.mkdir(parents=True)
    files = {"last.safetensors": save_weights(folder / "last.safetensors", model, cfg, epoch)}
    if improved or previous is None:
        _link(folder / "last.safetensors", folder / "best.safetensors")
    else:
        _link(previous / "best.safetensors", folder / "best.safetensors")
    files["best.safetensors"] = _sha256(folder / "best.safetensors")
    tensors: dict[str, torch.Tensor] = {}
    state = {
        "format": FORMAT, "epoch": epoch, "best_rsum": best_rsum, "history": history,
        "config": cfg, "optimizer": _encode(optimizer.state_dict(), tensors, "optimizer"),
        "scheduler": _encode(scheduler.state_dict(), tensors, "scheduler"),
        "scaler": _encode(scaler.state_dict(), tensors, "scaler"),
        "rng": _encode(rng_states(), tensors, "rng"),
    }
    files["state.safetensors"] = write_file(folder / "state.safetensors",
                                            lambda tmp: save_file(tensors, tmp))
    files["state.json"] = _write_json(folder / "state.json", state)
    manifest = {"format": FORMAT, "epoch": epoch,
                "files": {name: {"bytes": (folder / name).stat().st_size, "sha256": digest}
                          for name, digest in files.items()}}
    manifest_sha = _write_json(folder / MANIFEST, manifest)
    fsync_dir(folder)
    _write_json(root / POINTER, {"format": FORMAT, "epoch": epoch, "folder": folder.name,
                                 "manifest_sha256": manifest_sha})
    fsync_dir(root)
    tidy(out_dir)
    return folder


def find_checkpoint(out_dir: str | Path) -> Checkpoint | None:
    """The committed epoch of ``out_dir``, every file verified against its manifest, or
    ``None`` when no epoch has committed yet (a run killed during its first epoch)."""
    out_dir = Path(out_dir)
    folder = _committed_folder(out_dir)
    if folder is None:
        if (out_dir / "last_state.pt").exists():
            raise ValueError(
                f"resume: {out_dir} holds a run in the earlier checkpoint layout "
                "(last_state.pt, a pickle file, which is not read); run without --resume to "
                "start it afresh, or evaluate its best.safetensors"
            )
        return None
    pointer = read_json(folder.parent / POINTER, "resume")
    manifest_path = folder / MANIFEST
    if not manifest_path.is_file():
        raise ValueError(f"resume: {manifest_path}: missing (named by {folder.parent / POINTER})")
    if _sha256(manifest_path) != pointer.get("manifest_sha256"):
        raise ValueError(f"resume: {manifest_path} does not match the SHA-256 that "
                         f"{folder.parent / POINTER} records (modified or corrupted)")
    manifest = read_json(manifest_path, "resume")
    entries = manifest.get("files") if isinstance(manifest, dict) else None
    if not isinstance(entries, dict) or sorted(entries) != sorted(EPOCH_FILES):
        raise ValueError(f"resume: {manifest_path} does not list the files {EPOCH_FILES}")
    for name in EPOCH_FILES:
        path, entry = folder / name, entries[name]
        if not path.is_file():
            raise ValueError(f"resume: {path}: missing (listed in {manifest_path})")
        if not isinstance(entry, dict) or path.stat().st_size != entry.get("bytes") \
                or _sha256(path) != entry.get("sha256"):
            raise ValueError(f"resume: {path} does not match its size and SHA-256 in "
                             f"{manifest_path} (modified or corrupted)")
    for name in ("last.safetensors", "best.safetensors"):
        _, epoch = read_metadata(folder / name)
        if epoch > pointer.get("epoch", -1) or (name == "last.safetensors"
                                                and epoch != pointer.get("epoch")):
            raise ValueError(f"resume: {folder / name} holds the weights of epoch {epoch}, "
                             f"not those of epoch {pointer.get('epoch')} or before")
    state = read_json(folder / "state.json", "resume")
    needed = ("epoch", "best_rsum", "history", "config", "optimizer", "scheduler", "scaler",
              "rng")
    if not isinstance(state, dict) or state.get("format") != FORMAT \
            or any(k not in state for k in needed) or state["epoch"] != pointer.get("epoch"):
        raise ValueError(f"resume: {folder / 'state.json'} is not the training state of a "
                         f"hatmodel checkpoint of epoch {pointer.get('epoch')}")
    return Checkpoint(folder, int(state["epoch"]), state)


def restore(checkpoint: Checkpoint, model: RetrievalModel, optimizer: torch.optim.Optimizer,
            scheduler: Any, scaler: Any) -> None:
    """Load a checkpoint's weights, optimizer, scheduler, scaler and RNG states."""
    load_weights(checkpoint.folder / "last.safetensors", model)
    path = checkpoint.folder / "state.json"
    tensors = _load_tensors(checkpoint.folder / "state.safetensors")
    try:
        parts = {k: _decode(checkpoint.state[k], tensors, path)
                 for k in ("optimizer", "scheduler", "scaler", "rng")}
        optimizer.load_state_dict(parts["optimizer"])
        scheduler.load_state_dict(parts["scheduler"])
        scaler.load_state_dict(parts["scaler"])
        set_rng_states(parts["rng"])
    except (AttributeError, KeyError, TypeError, ValueError, RuntimeError) as err:
        raise ValueError(f"resume: {path} does not fit this run's optimizer, scheduler or "
                         f"random generators ({type(err).__name__}: {err})") from None


def tidy(out_dir: str | Path) -> None:
    """Remove what killed writers left (epoch folders other than the committed one,
    temporary files), link ``best.safetensors`` / ``last.safetensors`` at the top of the run
    folder to the committed epoch's files and write its history to ``history.json``."""
    out_dir = Path(out_dir)
    root = _checkpoints(out_dir)
    committed = _committed_folder(out_dir)
    for path in root.iterdir() if root.is_dir() else ():
        if path.is_dir() and path != committed:
            shutil.rmtree(path)
    for folder in (out_dir, root, committed):
        for tmp in folder.glob(f".*{TMP_SUFFIX}") if folder and folder.is_dir() else ():
            tmp.unlink(missing_ok=True)
    if committed is not None:
        for name in ("best.safetensors", "last.safetensors"):
            if not (out_dir / name).is_file() or \
                    not (out_dir / name).samefile(committed / name):
                _link(committed / name, out_dir / name)
        history = json.dumps(read_json(committed / "state.json")["history"], indent=1) + "\n"
        if not (out_dir / "history.json").is_file() or \
                (out_dir / "history.json").read_text() != history:
            write_text(out_dir / "history.json", history)


def discard(out_dir: str | Path) -> list[str]:
    """Remove a previous run's checkpoints and outputs from ``out_dir`` (a fresh run in an
    old run's folder): the commit point first, so a kill half-way leaves no checkpoint to
    resume. Returns the names removed."""
    out_dir = Path(out_dir)
    root = _checkpoints(out_dir)
    removed = []
    if (root / POINTER).exists():
        (root / POINTER).unlink()
        removed.append(f"{CHECKPOINTS}/{POINTER}")
    if root.is_dir():
        shutil.rmtree(root)
        removed.append(f"{CHECKPOINTS}/")
    for name in RUN_OUTPUTS:
        if (out_dir / name).exists():
            (out_dir / name).unlink()
            removed.append(name)
    tidy(out_dir)
    return removed


# --- evaluation ----------------------------------------------------------------------------

def resolve_checkpoint(path: str | Path, name: str = "best") -> Path:
    """A weights file, or ``<name>.safetensors`` inside a run folder."""
    path = Path(path)
    if path.is_dir():
        path = path / f"{name}.safetensors"
    if not path.is_file():
        raise ValueError(f"checkpoint: no file at {path}")
    return path


def load_for_eval(path: str | Path, overrides: list[str] | None = None
                  ) -> tuple[RetrievalModel, dict[str, Any], Path]:
    """Model (weights loaded, eval mode), config and file of a checkpoint or run folder.
    ``overrides`` (``key.sub=value``) adjust the stored config, e.g. a new ``data.root``."""
    from .data import build_tokenizer

    path = resolve_checkpoint(path)
    stored, _ = read_metadata(path)
    try:
        cfg = merge_config(stored)
    except (TypeError, ValueError) as err:
        raise ValueError(f"checkpoint: {path}: its config does not fit ({err})") from None
    cfg = apply_overrides(cfg, overrides)
    # The weights come from the checkpoint: skip loading the pretrained image trunk. Data
    # paths are checked by whatever reads the data (pictures of one's own need none).
    cfg["model"]["image"]["checkpoint"] = None
    cfg = validate_config(cfg)
    model = build_model(cfg, build_tokenizer(cfg).vocab_size)
    load_weights(path, model)
    return model.eval(), cfg, path


__all__ = ["Checkpoint", "discard", "find_checkpoint", "load_for_eval", "load_weights",
           "read_json", "read_metadata", "resolve_checkpoint", "restore", "rng_states",
           "save_checkpoint", "save_weights", "set_rng_states", "tidy", "write_file",
           "write_text"]
