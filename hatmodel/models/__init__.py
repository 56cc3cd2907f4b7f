"""Model factory: ``cfg["model"]["name"]`` -> a :class:`RetrievalModel`.

To add a model (as TERAN was added): write ``models/<name>.py`` with a ``RetrievalModel``
subclass and a ``build_<name>(cfg, vocab_size)`` function, and add it to :data:`MODELS`.
Training, evaluation, checkpoints and both CLIs then work unchanged.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from .base import RetrievalModel, Tokens
from .hat import HAT, build_hat
from .teran import TERAN, build_teran

MODELS: dict[str, Callable[..., RetrievalModel]] = {"hat": build_hat, "teran": build_teran}


def build_model(cfg: dict[str, Any], vocab_size: int | None = None) -> RetrievalModel:
    """The model named by ``cfg["model"]["name"]``, built from the config."""
    name = cfg["model"]["name"]
    if name not in MODELS:
        raise ValueError(f"model.name: expected one of {sorted(MODELS)}, got {name!r}")
    return MODELS[name](cfg, vocab_size)


__all__ = ["HAT", "MODELS", "TERAN", "RetrievalModel", "Tokens", "build_model"]
