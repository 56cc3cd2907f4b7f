"""Run configuration: YAML files (a path, or the bare name of a packaged config in
``hatmodel/configs``) merged over :data:`DEFAULTS`, then ``key.sub=value`` overrides.

A config is a plain nested dict. Its sections: ``model`` (``model.name`` picks the model
factory, see :mod:`hatmodel.models`), ``data``, ``loss``, ``train``, ``eval``. Every key a run
reads is listed in :data:`DEFAULTS`, so a typo in a file or an override is an error.
"""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import yaml

DEFAULT_CONFIG = "hat_scenes"
CONFIG_DIR = Path(__file__).resolve().parent / "configs"

DEFAULTS: dict[str, Any] = {
    "seed": 0,
    "model": {
        "name": "hat",
        "embed_dim": 768,
        "image": {
            "arch": "swin_base_patch4_window7_224",
            "kwargs": {},
            "stages": [1, 2, 3],
            "checkpoint": None,
        },
        "text": {
            "pretrained": None,
            "config": None,
            "layers": [4, 10, 12],
        },
        "align": {
            "pooling": "scan",
            "direction": "i2t",
            "reduce": "mean",
            "lambda_softmax": 9.0,
            "weights": None,
            "backend": "auto",
        },
        # TERAN only (SPEC 3; region_dim null = the feature size, as in the paper).
        "teran": {
            "region_dim": None,
            "region_layers": 4,
            "region_heads": 4,
            "region_ff": 2048,
            "box_hidden": 256,
            "shared_layers": 2,
            "shared_heads": 4,
            "shared_ff": 2048,
            "shared": True,
            "dropout": 0.1,
            "drop_last_tokens": 2,
        },
    },
    "data": {
        "kind": "scenes",
        "root": None,
        "json": None,
        "image_size": 224,
        "max_tokens": 32,
        "tokenizer": None,
        "scenes": {
            "seed": 0,
            "train_images": 10000,
            "val_images": 500,
            "test_images": 1000,
            "min_objects": 2,
            "max_objects": 3,
        },
        "restval": False,
        "num_workers": 0,
        # Region features instead of pixels (TERAN; see hatmodel/data/regions.py).
        "regions": {
            "format": None,
            "root": None,
            "feature_dim": 2048,
            "max_regions": None,
            "split_names": {"train": "train", "val": "dev", "test": "test"},
            "background": 3,
            "noise": 1.0,
        },
    },
    "loss": {
        "name": "hinge",
        "margin": 0.2,
        "hardest_negative": True,
        "temperature": 0.05,
    },
    "train": {
        "epochs": 100,
        "batch_size": 58,
        "sample": "captions",
        "lr": 1e-4,
        "weight_decay": 0.0,
        "warmup_steps": 0,
        "schedule": "step",
        "lr_step_epochs": 10,
        "lr_gamma": 0.1,
        "freeze_encoders_epochs": 10,
        "encoder_lr_scale": 1.0,
        "grad_clip": 2.0,
        "amp": True,
        "device": "auto",
        "threads": 0,
        "log_every": 50,
        "max_steps_per_epoch": 0,
        "time_limit_s": 0,
        # Several processes under torchrun (hatmodel/distributed.py); ignored in one process.
        "distributed": {
            "backend": None,  # None: nccl on GPUs, gloo on CPUs
            "timeout_s": 1800,  # any collective (rank 0's evaluations included) waits this long
        },
    },
    "eval": {
        "batch_size": 128,
        "protocol": "5k",
        "memory_budget": 1 << 30,
        "val_images": 0,
    },
}


# Mappings passed through to outside libraries (timm kwargs, BertConfig fields): any key.
FREE_FORM = ("kwargs", "config")


def _merge(base: dict[str, Any], update: dict[str, Any], where: str,
           free: bool = False) -> dict[str, Any]:
    out = copy.deepcopy(base)
    for key, value in update.items():
        name = f"{where}.{key}" if where else key
        if key not in base and not free:
            raise ValueError(f"config: unknown key {name!r}")
        if isinstance(base.get(key), dict) and isinstance(value, dict):
            out[key] = _merge(base[key], value, name, key in FREE_FORM or free)
        elif isinstance(base.get(key), dict) and base[key] and key not in FREE_FORM:
            raise ValueError(f"config: {name!r} must be a mapping, got {value!r}")
        else:
            out[key] = copy.deepcopy(value)
    return out


def config_path(name_or_path: str | Path) -> Path:
    """The YAML file for a path, or for the bare name of a packaged config."""
    path = Path(name_or_path)
    if path.suffix in (".yaml", ".yml") and path.exists():
        return path
    stem = path.name[: -len(path.suffix)] if path.suffix in (".yaml", ".yml") else path.name
    packaged = CONFIG_DIR / f"{stem}.yaml"
    if packaged.is_file():
        return packaged
    raise ValueError(
        f"config: {str(name_or_path)!r} is neither a YAML file nor a packaged config; "
        f"packaged: {', '.join(list_configs())}"
    )


def list_configs() -> list[str]:
    """Names of the configs shipped in ``hatmodel/configs``."""
    return sorted(p.stem for p in CONFIG_DIR.glob("*.yaml"))


def parse_override(text: str) -> tuple[list[str], Any]:
    """``a.b=value`` -> (["a", "b"], value parsed as YAML)."""
    if "=" not in text:
        raise ValueError(f"override {text!r}: expected key.sub=value")
    key, raw = text.split("=", 1)
    return key.strip().split("."), yaml.safe_load(raw)


def load_config(
    name_or_path: str | Path | None = None, overrides: list[str] | None = None
) -> dict[str, Any]:
    """DEFAULTS <- the YAML file (default: the embedded scenes run) <- overrides."""
    path = config_path(name_or_path or DEFAULT_CONFIG)
    with open(path) as f:
        loaded = yaml.safe_load(f) or {}
    if not isinstance(loaded, dict):
        raise ValueError(f"config: {path} must hold a mapping")
    return apply_overrides(_merge(DEFAULTS, loaded, ""), overrides)


def apply_overrides(cfg: dict[str, Any], overrides: list[str] | None) -> dict[str, Any]:
    """``cfg`` with each ``key.sub=value`` applied in turn (unknown keys are errors)."""
    for text in overrides or []:
        keys, value = parse_override(text)
        update: Any = value
        for key in reversed(keys):
            update = {key: update}
        cfg = _merge(cfg, update, "")
    return cfg


def merge_config(cfg: dict[str, Any]) -> dict[str, Any]:
    """A stored config (e.g. from a checkpoint) completed with today's defaults."""
    return _merge(DEFAULTS, cfg, "")
