"""The one place that picks a backend for a call, and says why the others were not picked.

Backends are tried in order of speed for the tensors' device type; the first with no reason
against the call wins. Reasons cover the environment (not built, device, dtype, feature size)
and the call's shapes; a call that needs gradients needs a backend that can run its backward
too, so a limit of a backend's backward rules it out for the whole call. A forced backend
(``backend=`` or ``HATKERNELS_BACKEND``) goes through the same check and raises with its
reasons when it cannot serve the call.
"""

from __future__ import annotations

import os
from collections.abc import Sequence

import torch

from .backends import BACKENDS, Backend
from .inputs import AlignInputs

BACKEND_NAMES = ("auto", "torch", "cpu", "triton", "cuda")

# Fastest first. On CPU the interpreted Triton backend is a test vehicle, hence last.
PREFERENCE = {
    "cuda": ("triton", "cuda", "torch"),
    "cpu": ("cpu", "torch", "triton"),
}
_DEFAULT_ORDER = ("torch",)


def _order(device: torch.device) -> tuple[str, ...]:
    return PREFERENCE.get(device.type, _DEFAULT_ORDER)


def _all_reasons(device: torch.device, why) -> dict[str, list[str]]:
    """``why(backend)`` for every backend, the device's preference order first; backends
    outside that order get a reason saying so."""
    order = _order(device)
    reasons = {}
    for name in list(order) + [n for n in BACKENDS if n not in order]:
        reasons[name] = why(BACKENDS[name])
        if name not in order:
            reasons[name] = reasons[name] or [f"not used for device type {device.type!r}"]
    return reasons


def not_supported_reasons(
    device: torch.device, dtype: torch.dtype, dims: Sequence[int]
) -> dict[str, list[str]]:
    """For each backend, the reasons it cannot serve tensors of this device, dtype and
    feature sizes, whatever their shapes (empty list: it can serve some)."""
    return _all_reasons(device, lambda b: b.environment_reasons(device, dtype, dims))


def call_reasons(inp: AlignInputs) -> dict[str, list[str]]:
    """For each backend, the reasons it cannot serve this call (empty list: it can)."""
    return _all_reasons(inp.device, lambda b: b.not_supported_reasons(inp))


def _requested(requested: str) -> str:
    if requested == "auto":
        requested = os.environ.get("HATKERNELS_BACKEND", "auto") or "auto"
        if requested not in BACKEND_NAMES:
            raise ValueError(
                f"HATKERNELS_BACKEND: expected one of {BACKEND_NAMES}, got {requested!r}"
            )
    return requested


def _describe(inp: AlignInputs) -> str:
    grads = ", with gradients" if inp.needs_grad else ""
    return (
        f"device {inp.device}, dtype {inp.dtype}, {inp.pooling} {inp.direction}, "
        f"images {tuple(inp.images.shape)}, texts {tuple(inp.texts.shape)}{grads}"
    )


def select_backend(inp: AlignInputs, requested: str = "auto") -> Backend:
    """The backend that runs the call ``inp``, or ValueError listing the reasons."""
    requested = _requested(requested)
    if requested != "auto":
        why = BACKENDS[requested].not_supported_reasons(inp)
        if why:
            raise ValueError(
                f"backend: {requested!r} cannot run this call ({_describe(inp)}): "
                + "; ".join(why)
            )
        return BACKENDS[requested]
    reasons = call_reasons(inp)
    for name in _order(inp.device):
        if not reasons[name]:
            return BACKENDS[name]
    detail = "; ".join(f"{n}: {', '.join(r)}" for n, r in reasons.items())
    raise ValueError(f"backend: no backend can run this call ({_describe(inp)}): {detail}")


def available_backends(device: str | torch.device = "cpu") -> list[str]:
    """Backends that can run on ``device`` with float32 inputs, fastest first (some may still
    decline particular shapes: see ``call_reasons``)."""
    device = torch.device(device)
    reasons = not_supported_reasons(device, torch.float32, ())
    return [name for name in _order(device) if not reasons[name]]
