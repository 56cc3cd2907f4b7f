"""The backends, one module each, and the registry the dispatcher reads."""

from __future__ import annotations

from .base import Backend
from .cpu import CpuBackend
from .cuda import CudaBackend
from .torch import TorchBackend
from .triton import TritonBackend

BACKENDS: dict[str, Backend] = {
    b.name: b for b in (TorchBackend(), CpuBackend(), TritonBackend(), CudaBackend())
}


def get_backend(name: str) -> Backend:
    return BACKENDS[name]


__all__ = ["BACKENDS", "Backend", "get_backend"]
