"""The one place that picks a backend for a call, and says why the others were not picked.

Backends are tried in order of speed for the tensors' device type; the first with no reason
against it wins. A forced backend (``backend=`` or ``HATKERNELS_BACKEND``) goes through the
same check and raises with its reasons when it cannot serve the call.
"""

from __future__ import annotations

import os
from collections.abc import Sequence

import torch

from .backends import BACKENDS, Backend

BACKEND_NAMES = ("auto", "torch", "cpu", "triton", "cuda")

# Fastest first. On CPU the interpreted Triton backend is a test vehicle, hence last.
PREFERENCE = {
    "cuda": ("triton", "cuda", "torch"),
    "cpu": ("cpu", "torch", "triton"),
}
_DEFAULT_ORDER = ("torch",)


def _order(device: torch.device) -> tuple[str, ...]:
    return PREFERENCE.get(device.type, _DEFAULT_ORDER)


def not_supported_reasons(
    device: torch.device, dtype: torch.dtype, dims: Sequence[int]
) -> dict[str, list[str]]:
    """For each backend, the reasons it cannot serve this call (empty list: it can)."""
    order = _order(device)
    names = list(order) + [n for n in BACKENDS if n not in order]
    reasons = {}
    for name in names:
        why = BACKENDS[name].not_supported_reasons(device, dtype, dims)
        if name not in order:
            why = why or [f"not used for device type {device.type!r}"]
        reasons[name] = why
    return reasons


def select_backend(
    device: torch.device, dtype: torch.dtype, dims: Sequence[int], requested: str = "auto"
) -> Backend:
    """The backend that runs a call, or ValueError listing every backend's reasons."""
    if requested == "auto":
        requested = os.environ.get("HATKERNELS_BACKEND", "auto") or "auto"
        if requested not in BACKEND_NAMES:
            raise ValueError(
                f"HATKERNELS_BACKEND: expected one of {BACKEND_NAMES}, got {requested!r}"
            )
    if requested != "auto":
        why = BACKENDS[requested].not_supported_reasons(device, dtype, dims)
        if why:
            raise ValueError(
                f"backend: {requested!r} cannot run this call (device {device}, dtype "
                f"{dtype}, D {list(dims)}): " + "; ".join(why)
            )
        return BACKENDS[requested]
    reasons = not_supported_reasons(device, dtype, dims)
    for name in _order(device):
        if not reasons[name]:
            return BACKENDS[name]
    detail = "; ".join(f"{n}: {', '.join(r)}" for n, r in reasons.items())
    raise ValueError(f"backend: no backend can run on device {device} with dtype {dtype}: {detail}")


def available_backends(device: str | torch.device = "cpu") -> list[str]:
    """Backends that can run on ``device`` with float32 inputs, fastest first."""
    device = torch.device(device)
    reasons = not_supported_reasons(device, torch.float32, ())
    return [name for name in _order(device) if not reasons[name]]
