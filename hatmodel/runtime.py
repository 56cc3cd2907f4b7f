"""Execution environment shared by training and evaluation: which device runs, how every
random generator is seeded, when mixed precision is on, and the learning-rate schedules.

Training and evaluation both import this module (and never each other), so each can be used
and tested alone.
"""

from __future__ import annotations

import math
import random
from typing import Any

import numpy as np
import torch

SCHEDULES = ("step", "cosine")


def pick_device(name: str) -> torch.device:
    """``"auto"``: CUDA when available, else the CPU; any other name as torch spells it."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def seed_everything(seed: int) -> None:
    """Seed python's, numpy's and torch's generators (CPU and every GPU)."""
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def amp_autocast(device: torch.device, amp: bool) -> torch.autocast:
    """Mixed precision on GPU when ``amp`` (bfloat16 where supported, else float16); a no-op
    on CPU, so CPU runs stay in float32 and reproducible."""
    if amp and device.type == "cuda":
        dtype = torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
        return torch.autocast("cuda", dtype=dtype)
    return torch.autocast(device.type, enabled=False)


def needs_grad_scaler(device: torch.device, amp: bool) -> bool:
    """Loss scaling is needed only for float16 autocast (a GPU without bfloat16)."""
    return amp and device.type == "cuda" and not torch.cuda.is_bf16_supported()


def lr_factor(cfg: dict[str, Any], step: int, steps_per_epoch: int) -> float:
    """Multiplier of the base learning rate at global ``step``: linear warmup, then HAT's
    step decay (x ``lr_gamma`` every ``lr_step_epochs``) or a cosine to 0 over the run."""
    t = cfg["train"]
    warm = int(t["warmup_steps"])
    factor = min(1.0, (step + 1) / warm) if warm > 0 else 1.0
    if t["schedule"] == "step":
        decays = (step // steps_per_epoch) // int(t["lr_step_epochs"])
        return factor * float(t["lr_gamma"]) ** decays
    if t["schedule"] == "cosine":
        total = max(1, int(t["epochs"]) * steps_per_epoch - warm)
        progress = min(1.0, max(0, step - warm) / total)
        return factor * 0.5 * (1 + math.cos(math.pi * progress))
    raise ValueError(f"train.schedule: expected 'step' or 'cosine', got {t['schedule']!r}")


__all__ = ["SCHEDULES", "amp_autocast", "lr_factor", "needs_grad_scaler", "pick_device",
           "seed_everything"]
