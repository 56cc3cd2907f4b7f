"""Checkpoints of a run folder, each written to a temporary file and moved into place with
``os.replace`` (a crash never leaves a half-written file):

- ``best.safetensors`` / ``last.safetensors``: model weights; the metadata holds the config
  (JSON) and the epoch, so a weights file alone rebuilds its model;
- ``last_state.pt``: what ``--resume`` needs besides the weights: optimizer, scheduler,
  epoch, step, history, best rsum and every RNG state (python, numpy, torch, CUDA).
"""

from __future__ import annotations

import json
import os
import random
import tempfile
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from .config import apply_overrides, merge_config
from .models import RetrievalModel, build_model


def _atomic(path: Path, write) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    try:
        write(tmp)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise


def save_weights(path: str | Path, model: RetrievalModel, cfg: dict[str, Any],
                 epoch: int) -> None:
    """Model weights + config + epoch as one safetensors file, atomically."""
    tensors = {k: v.detach().contiguous().cpu() for k, v in model.state_dict().items()}
    meta = {"config": json.dumps(cfg), "epoch": str(epoch), "format": "hatmodel-1"}
    _atomic(Path(path), lambda tmp: save_file(tensors, tmp, metadata=meta))


def read_metadata(path: str | Path) -> tuple[dict[str, Any], int]:
    """(config, epoch) stored in a weights file."""
    path = Path(path)
    if not path.is_file():
        raise ValueError(f"checkpoint: no file at {path}")
    with safe_open(str(path), framework="pt") as f:
        meta = f.metadata() or {}
    if "config" not in meta:
        raise ValueError(f"checkpoint: {path} is not a hatmodel checkpoint (no config metadata)")
    return json.loads(meta["config"]), int(meta.get("epoch", -1))


def load_weights(path: str | Path, model: RetrievalModel) -> None:
    model.load_state_dict(load_file(str(path)), strict=True)


def rng_states() -> dict[str, Any]:
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


def save_state(path: str | Path, state: dict[str, Any]) -> None:
    _atomic(Path(path), lambda tmp: torch.save(state, tmp))


def load_state(path: str | Path) -> dict[str, Any]:
    path = Path(path)
    if not path.is_file():
        raise ValueError(f"resume: no training state at {path}")
    return torch.load(path, map_location="cpu", weights_only=False)


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
    cfg, _ = read_metadata(path)
    cfg = apply_overrides(merge_config(cfg), overrides)
    # The weights come from the checkpoint: skip loading the pretrained image trunk.
    cfg["model"]["image"]["checkpoint"] = None
    model = build_model(cfg, build_tokenizer(cfg).vocab_size)
    load_weights(path, model)
    return model.eval(), cfg, path


__all__ = ["load_for_eval", "load_state", "load_weights", "read_metadata",
           "resolve_checkpoint", "rng_states", "save_state", "save_weights", "set_rng_states"]
