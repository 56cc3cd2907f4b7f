"""Run configuration: :data:`DEFAULTS` (the default run), a YAML file over it (a path, or the
bare name of a packaged config in ``hatmodel/configs``), then ``key.sub=value`` overrides, and
one validation of the result against :data:`SCHEMA`.

A config is a plain nested dict. Its sections: ``model`` (``model.name`` picks the model
factory, see :mod:`hatmodel.models`), ``data``, ``loss``, ``train``, ``eval``. Every key a run
reads is listed in :data:`DEFAULTS` and has one rule in :data:`SCHEMA` (type, range or
choices, and whether it names a file or folder that must exist), so a typo, a value of the
wrong type or out of range is an error naming the key and the value before anything is built
or written. Two keys hold mappings passed to outside libraries as they are
(``model.image.kwargs`` for timm, ``model.text.config`` for ``BertConfig``): a mapping given
for them replaces the previous one, ``model.image.kwargs.window_size=3`` sets one entry.
"""

from __future__ import annotations

import copy
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import yaml

from hatkernels.api import DIRECTIONS, POOLINGS, REDUCES
from hatkernels.constants import MAX_LAMBDA_SOFTMAX
from hatkernels.dispatch import BACKEND_NAMES

from .data import KINDS, SAMPLES
from .data.regions import FORMATS
from .losses import LOSSES
from .models import MODELS
from .runtime import SCHEDULES

DEFAULT_CONFIG = "hat_scenes"
PROTOCOLS = ("1k", "5k")  # COCO 1K: five folds of 1,000 images; 5K: all at once
CONFIG_DIR = Path(__file__).resolve().parent / "configs"

# The default run (``python -m hatmodel.train``): a small HAT trained from scratch on the
# embedded generated scenes in minutes on a 2-core CPU. The packaged configs state every
# value in which they differ from it (the paper configs: their whole recipe).
DEFAULTS: dict[str, Any] = {
    "seed": 0,
    "model": {
        "name": "hat",
        "embed_dim": 64,
        "image": {
            "arch": "swin_tiny_patch4_window7_224",
            # 64 px, patch 8, window 4, width 32, one block per stage: stages 1, 2, 3 give
            # 4x4, 2x2 and 1x1 tokens of 64 / 128 / 256 dims.
            "kwargs": {"img_size": 64, "patch_size": 8, "window_size": 4, "embed_dim": 32,
                       "depths": [1, 1, 1, 1], "num_heads": [1, 2, 4, 8]},
            "stages": [1, 2, 3],
            "checkpoint": None,
        },
        "text": {
            "pretrained": None,
            "config": {"hidden_size": 64, "num_hidden_layers": 3, "num_attention_heads": 2,
                       "intermediate_size": 128, "max_position_embeddings": 32},
            "layers": [1, 2, 3],
        },
        "align": {
            "pooling": "scan",
            "direction": "i2t",
            "reduce": "mean",
            "lambda_softmax": 9.0,
            "weights": None,
            "backend": "auto",
        },
        # TERAN only (region_dim null = the feature size, as in the paper).
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
        "image_size": 64,
        "max_tokens": 32,
        "tokenizer": None,
        "scenes": {
            "seed": 0,
            "train_images": 10000,
            "val_images": 200,
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
    # From scratch, scan pooling with the hardest-negative hinge collapses to constant scores;
    # InfoNCE over the whole batch does not.
    "loss": {
        "name": "infonce",
        "margin": 0.2,
        "hardest_negative": True,
        "temperature": 0.05,
    },
    "train": {
        "epochs": 5,
        "batch_size": 32,
        "sample": "images",  # every image once per epoch, one of its captions at random
        "lr": 3e-4,
        "weight_decay": 0.0,
        "warmup_steps": 50,
        "schedule": "cosine",
        "lr_step_epochs": 10,
        "lr_gamma": 0.1,
        "freeze_encoders_epochs": 0,  # nothing pretrained to protect
        "encoder_lr_scale": 1.0,
        "grad_clip": 2.0,
        "amp": True,
        "device": "auto",
        "threads": 1,  # small ops: one thread is nearly as fast, and robust when shared
        "log_every": 100,
        "max_steps_per_epoch": 0,
        "time_limit_s": 420,  # safety net on a slow machine: stop training, still evaluate
        # Several processes under torchrun (hatmodel/distributed.py); ignored in one process.
        "distributed": {
            "backend": None,  # None: nccl on GPUs, gloo on CPUs
            "timeout_s": 1800,  # any collective (rank 0's evaluations included) waits this long
        },
    },
    "eval": {
        "batch_size": 250,
        "protocol": "5k",
        "memory_budget": 1 << 30,
        "val_images": 0,
        # Token stores on disk for evaluation (hatmodel/store_eval.py): a folder to keep them
        # in; None: only when the caption tokens would exceed memory_budget (a temporary one).
        "store": None,
    },
}

# Mappings passed through to outside libraries (timm kwargs, BertConfig fields): any key.
FREE_FORM = ("model.image.kwargs", "model.text.config")


@dataclass(frozen=True)
class Rule:
    """What one config key accepts.

    ``kind``: ``int``, ``float``, ``bool``, ``str``, ``choice``, ``ints`` (a non-empty list of
    integers), ``floats`` (a list of numbers), ``mapping``, ``file`` or ``dir`` (a path that
    must exist when paths are checked). ``low``/``high`` bound numbers and list entries
    (inclusive). ``runtime``: the key may change when a run is resumed (it does not change
    what is computed: devices, threads, logging, where files live).
    """

    kind: str
    low: float | None = None
    high: float | None = None
    choices: tuple[Any, ...] = ()
    nullable: bool = False
    runtime: bool = False


def _int(low: int | None = 0, high: int | None = None, **kw: Any) -> Rule:
    return Rule("int", low, high, **kw)


def _float(low: float | None = 0.0, high: float | None = None, **kw: Any) -> Rule:
    return Rule("float", low, high, **kw)


def _choice(*choices: Any, **kw: Any) -> Rule:
    return Rule("choice", choices=tuple(choices), **kw)


SCHEMA: dict[str, Rule] = {
    "seed": _int(0),
    "model.name": _choice(*MODELS),
    "model.embed_dim": _int(1),
    "model.image.arch": Rule("str"),
    "model.image.kwargs": Rule("mapping"),
    "model.image.stages": Rule("ints", 0),
    "model.image.checkpoint": Rule("file", nullable=True, runtime=True),
    "model.text.pretrained": Rule("dir", nullable=True, runtime=True),
    "model.text.config": Rule("mapping", nullable=True),
    "model.text.layers": Rule("ints", 0),
    "model.align.pooling": _choice(*POOLINGS),
    "model.align.direction": _choice(*DIRECTIONS),
    "model.align.reduce": _choice(*REDUCES),
    "model.align.lambda_softmax": _float(0.0, MAX_LAMBDA_SOFTMAX),
    "model.align.weights": Rule("floats", nullable=True),
    "model.align.backend": _choice(*BACKEND_NAMES, runtime=True),
    "model.teran.region_dim": _int(1, nullable=True),
    "model.teran.region_layers": _int(1),
    "model.teran.region_heads": _int(1),
    "model.teran.region_ff": _int(1),
    "model.teran.box_hidden": _int(1),
    "model.teran.shared_layers": _int(1),
    "model.teran.shared_heads": _int(1),
    "model.teran.shared_ff": _int(1),
    "model.teran.shared": Rule("bool"),
    "model.teran.dropout": _float(0.0, 1.0),
    "model.teran.drop_last_tokens": _int(0),
    "data.kind": _choice(*KINDS),
    "data.root": Rule("dir", nullable=True, runtime=True),
    "data.json": Rule("file", nullable=True, runtime=True),
    "data.image_size": _int(1),
    "data.max_tokens": _int(3),
    "data.tokenizer": Rule("dir", nullable=True, runtime=True),
    "data.scenes.seed": _int(0),
    "data.scenes.train_images": _int(1),
    "data.scenes.val_images": _int(1),
    "data.scenes.test_images": _int(1),
    "data.scenes.min_objects": _int(1, 9),
    "data.scenes.max_objects": _int(1, 9),
    "data.restval": Rule("bool"),
    "data.num_workers": _int(0, runtime=True),
    "data.regions.format": _choice(*FORMATS, nullable=True),
    "data.regions.root": Rule("dir", nullable=True, runtime=True),
    "data.regions.feature_dim": _int(1),
    "data.regions.max_regions": _int(1, nullable=True),
    "data.regions.split_names.train": Rule("str"),
    "data.regions.split_names.val": Rule("str"),
    "data.regions.split_names.test": Rule("str"),
    "data.regions.background": _int(0),
    "data.regions.noise": _float(0.0),
    "loss.name": _choice(*LOSSES),
    "loss.margin": _float(0.0),
    "loss.hardest_negative": Rule("bool"),
    "loss.temperature": _float(1e-6),
    "train.epochs": _int(1),
    "train.batch_size": _int(2),  # a contrastive batch needs at least one negative
    "train.sample": _choice(*SAMPLES),
    "train.lr": _float(0.0),
    "train.weight_decay": _float(0.0),
    "train.warmup_steps": _int(0),
    "train.schedule": _choice(*SCHEDULES),
    "train.lr_step_epochs": _int(1),
    "train.lr_gamma": _float(0.0),
    "train.freeze_encoders_epochs": _int(0),
    "train.encoder_lr_scale": _float(0.0),
    "train.grad_clip": _float(0.0),  # 0: no clipping
    "train.amp": Rule("bool"),
    "train.device": Rule("str", runtime=True),
    "train.threads": _int(0, runtime=True),  # 0: torch's default
    "train.log_every": _int(1, runtime=True),
    "train.max_steps_per_epoch": _int(0),  # 0: no limit
    "train.time_limit_s": _float(0.0, runtime=True),  # 0: none
    "train.distributed.backend": _choice("gloo", "nccl", "mpi", "ucc", nullable=True, runtime=True),
    "train.distributed.timeout_s": _float(1.0, runtime=True),
    "eval.batch_size": _int(1, runtime=True),
    "eval.protocol": _choice(*PROTOCOLS, runtime=True),
    "eval.memory_budget": _int(1, runtime=True),
    "eval.val_images": _int(0),
    "eval.store": Rule("str", nullable=True, runtime=True),
}


def _describe(rule: Rule) -> str:
    """``an integer >= 1``, ``one of 'max', 'scan'``, ... (for error messages)."""
    what = {"int": "an integer", "float": "a number", "bool": "true or false",
            "str": "a string", "ints": "a non-empty list of integers",
            "floats": "a list of numbers", "mapping": "a mapping", "file": "a file path",
            "dir": "a folder path"}.get(rule.kind, "one of " + ", ".join(map(repr, rule.choices)))
    bounds = [f">= {rule.low:g}"] if rule.low is not None else []
    bounds += [f"<= {rule.high:g}"] if rule.high is not None else []
    if bounds:
        lead = " with entries " if rule.kind in ("ints", "floats") else " "
        what += lead + " and ".join(bounds)
    return what + (" or null" if rule.nullable else "")


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _as_number(value: Any) -> float | None:
    """A finite number from an int, a float or a numeric string (YAML reads ``1e-5`` as a
    string); ``None`` for anything else."""
    if isinstance(value, bool):
        return None
    if isinstance(value, str):
        try:
            value = float(value)
        except ValueError:
            return None
    if isinstance(value, (int, float)) and math.isfinite(value):
        return value
    return None


def _check_value(key: str, rule: Rule, value: Any) -> Any:
    """``value`` checked against ``rule`` (numbers given as strings become floats)."""
    def fail(error: type[Exception] = ValueError) -> None:
        raise error(f"{key}: expected {_describe(rule)}, got {value!r}")

    if value is None:
        return None if rule.nullable else fail(TypeError)
    if rule.kind == "choice":
        return value if value in rule.choices and type(value) is not bool else fail()
    if rule.kind in ("bool", "mapping") or rule.kind in ("str", "file", "dir"):
        wanted = {"bool": bool, "mapping": dict}.get(rule.kind, str)
        return value if isinstance(value, wanted) and (wanted is not str or value) \
            else fail(TypeError)
    if rule.kind in ("ints", "floats"):
        if not isinstance(value, list) or (rule.kind == "ints" and not value):
            fail(TypeError)
        try:
            return [_check_value(key, Rule(rule.kind[:-1], rule.low, rule.high), v)
                    for v in value]
        except (TypeError, ValueError) as err:
            raise type(err)(f"{key}: expected {_describe(rule)}, got {value!r}") from None
    number = value if _is_int(value) else (None if rule.kind == "int" else _as_number(value))
    if number is None:
        fail(TypeError)
    if (rule.low is not None and number < rule.low) or \
            (rule.high is not None and number > rule.high):
        fail()
    return number if rule.kind == "int" else float(number)


def _check_path(key: str, rule: Rule, value: str | None) -> None:
    if value is None or rule.kind not in ("file", "dir"):
        return
    exists = Path(value).is_file() if rule.kind == "file" else Path(value).is_dir()
    if not exists:
        what = "file" if rule.kind == "file" else "folder"
        raise ValueError(f"{key}: no {what} at {value!r} (relative to {Path.cwd()})")


def _get(cfg: dict[str, Any], key: str) -> Any:
    for part in key.split("."):
        cfg = cfg[part]
    return cfg


def _set(cfg: dict[str, Any], key: str, value: Any) -> None:
    *parents, leaf = key.split(".")
    for part in parents:
        cfg = cfg[part]
    cfg[leaf] = value


def _cross_checks(cfg: dict[str, Any]) -> None:
    """Rules between keys (each error names the keys involved)."""
    m, d, t = cfg["model"], cfg["data"], cfg["model"]["teran"]
    sc = d["scenes"]
    if sc["min_objects"] > sc["max_objects"]:
        raise ValueError(f"data.scenes.min_objects / max_objects: min {sc['min_objects']} is "
                         f"above max {sc['max_objects']}")
    if m["name"] == "hat" and len(m["image"]["stages"]) != len(m["text"]["layers"]):
        raise ValueError(f"model.image.stages / model.text.layers: HAT needs one text layer per "
                         f"image stage, got {m['image']['stages']} and {m['text']['layers']}")
    if m["name"] == "teran":
        if len(m["text"]["layers"]) != 1 or m["text"]["layers"][0] < 1:
            raise ValueError(f"model.text.layers: TERAN uses one BERT layer's output (e.g. [6]: "
                             f"the first six layers), got {m['text']['layers']}")
        width = t["region_dim"] or d["regions"]["feature_dim"]
        if width % t["region_heads"]:
            raise ValueError(f"model.teran.region_heads: the region width {width} is not "
                             f"divisible by {t['region_heads']} heads")
        if m["embed_dim"] % t["shared_heads"]:
            raise ValueError(f"model.teran.shared_heads: model.embed_dim {m['embed_dim']} is not "
                             f"divisible by {t['shared_heads']} heads")
        if d["regions"]["format"] is None:
            raise ValueError("data.regions.format: TERAN reads region features: expected one of "
                             f"{', '.join(map(repr, FORMATS))}, got None")
    if cfg["train"]["device"] != "auto":
        try:
            torch.device(cfg["train"]["device"])
        except (RuntimeError, ValueError):
            raise ValueError(f"train.device: expected 'auto' or a torch device such as 'cpu' "
                             f"or 'cuda:0', got {cfg['train']['device']!r}") from None
    levels = 1 if m["name"] == "teran" else len(m["image"]["stages"])
    weights = m["align"]["weights"]
    if weights is not None and len(weights) != levels:
        raise ValueError(f"model.align.weights: expected one weight per level ({levels}), "
                         f"got {weights}")


def _required_paths(cfg: dict[str, Any]) -> None:
    """The files and folders a run needs for its data (a model alone needs none of them)."""
    m, d = cfg["model"], cfg["data"]
    fmt = d["regions"]["format"]
    if fmt in ("npz", "scan") and not d["regions"]["root"]:
        raise ValueError(f"data.regions.root: required for data.regions.format={fmt!r}")
    if fmt == "npz" and not d["json"]:
        raise ValueError("data.json: the Karpathy split file is required for npz regions")
    if fmt is None and d["kind"] != "scenes" and not (d["json"] and d["root"]):
        raise ValueError(f"data.json and data.root: required for data.kind={d['kind']!r}")
    if d["kind"] != "scenes" and not (d["tokenizer"] or m["text"]["pretrained"]):
        raise ValueError("data.tokenizer: real captions need a BERT tokenizer folder "
                         "(data.tokenizer or model.text.pretrained)")


def validate_config(cfg: dict[str, Any], check_paths: bool = False) -> dict[str, Any]:
    """``cfg`` checked key by key against :data:`SCHEMA` and across keys; numbers given as
    strings become floats. ``check_paths``: the files and folders it names must exist and
    those its data needs must be named (a run checks them before it builds anything; a config
    loaded only to build a model does not).
    Raises ``TypeError``/``ValueError`` whose message starts with the key."""
    out = copy.deepcopy(cfg)
    for key, rule in SCHEMA.items():
        value = _check_value(key, rule, _get(out, key))
        _set(out, key, value)
        if check_paths:
            _check_path(key, rule, value)
    _cross_checks(out)
    if check_paths:
        _required_paths(out)
    return out


def resume_differences(stored: dict[str, Any], cfg: dict[str, Any]) -> list[str]:
    """``key: stored -> new`` for every key that differs between a run's stored config and
    ``cfg`` and may not change on resume (those that change what is computed)."""
    changed = []
    for key, rule in SCHEMA.items():
        old, new = _get(stored, key), _get(cfg, key)
        if not rule.runtime and old != new:
            changed.append(f"{key}: {old!r} -> {new!r}")
    return changed


def _merge(base: dict[str, Any], update: dict[str, Any], where: str) -> dict[str, Any]:
    out = copy.deepcopy(base)
    if not isinstance(update, dict):
        raise TypeError(f"{where or 'config'}: expected a mapping, got {update!r}")
    for key, value in update.items():
        name = f"{where}.{key}" if where else str(key)
        if key not in base:
            raise ValueError(f"{name}: unknown config key")
        if isinstance(base[key], dict) and name not in FREE_FORM:
            out[key] = _merge(base[key], value, name)
        else:
            out[key] = copy.deepcopy(value)
    return out


def config_path(name_or_path: str | Path) -> Path:
    """The YAML file at a path, or the packaged config of a bare name (no folder, no suffix).
    A path that does not exist is an error, never a packaged config of the same name."""
    path = Path(name_or_path)
    if path.is_file():
        return path
    if path.name == str(name_or_path) and not path.suffix:
        packaged = CONFIG_DIR / f"{path.name}.yaml"
        if packaged.is_file():
            return packaged
        raise ValueError(f"config: {str(name_or_path)!r} is not a packaged config; packaged: "
                         f"{', '.join(list_configs())}")
    hint = f" (the packaged config is --config {path.stem})" \
        if (CONFIG_DIR / f"{path.stem}.yaml").is_file() else ""
    raise ValueError(f"config: no YAML file at {str(name_or_path)!r}{hint}")


def list_configs() -> list[str]:
    """Names of the configs shipped in ``hatmodel/configs``."""
    return sorted(p.stem for p in CONFIG_DIR.glob("*.yaml"))


def parse_override(text: str) -> tuple[str, Any]:
    """``a.b=value`` -> ("a.b", value parsed as YAML)."""
    if "=" not in text:
        raise ValueError(f"override {text!r}: expected key.sub=value")
    key, raw = text.split("=", 1)
    return key.strip(), yaml.safe_load(raw)


def _override(cfg: dict[str, Any], key: str, value: Any) -> dict[str, Any]:
    """``cfg`` with ``key`` set to ``value`` (a mapping merges into a section; a key inside a
    free-form mapping sets that entry)."""
    for free in FREE_FORM:
        if key.startswith(free + "."):
            out = copy.deepcopy(cfg)
            target = _get(out, free)
            if target is None:
                target = {}
                _set(out, free, target)
            *parents, leaf = key[len(free) + 1:].split(".")
            for part in parents:
                target = target.setdefault(part, {})
            target[leaf] = value
            return out
    update: Any = value
    for part in reversed(key.split(".")):
        update = {part: update}
    return _merge(cfg, update, "")


def apply_overrides(cfg: dict[str, Any], overrides: list[str] | None) -> dict[str, Any]:
    """``cfg`` with each ``key.sub=value`` applied in turn, then validated (unknown keys and
    bad values are errors)."""
    for text in overrides or []:
        cfg = _override(cfg, *parse_override(text))
    return validate_config(cfg)


def load_config(
    name_or_path: str | Path | None = None, overrides: list[str] | None = None
) -> dict[str, Any]:
    """DEFAULTS <- the YAML file (default: the embedded scenes run) <- overrides, validated
    (paths are checked by the run that uses them: :func:`validate_config`)."""
    path = config_path(name_or_path or DEFAULT_CONFIG)
    try:
        loaded = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as err:
        raise ValueError(f"config: {path} is not valid YAML ({err})") from None
    if not isinstance(loaded, dict):
        raise ValueError(f"config: {path} must hold a mapping")
    return apply_overrides(_merge(DEFAULTS, loaded, ""), overrides)


def merge_config(cfg: dict[str, Any]) -> dict[str, Any]:
    """A stored config (e.g. from a checkpoint) completed with today's defaults."""
    return _merge(DEFAULTS, cfg, "")


__all__ = ["DEFAULTS", "DEFAULT_CONFIG", "FREE_FORM", "SCHEMA", "Rule", "apply_overrides",
           "config_path", "list_configs", "load_config", "merge_config", "parse_override",
           "resume_differences", "validate_config"]
