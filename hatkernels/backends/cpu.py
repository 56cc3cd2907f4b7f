"""The ``cpu`` backend: fused C++ kernels (``csrc/cpu``), OpenMP over tiles of whole images x
whole captions, GEMM-sized tiles of packed valid tokens pooled while in cache."""

from __future__ import annotations

from .base import ExtensionBackend, load_extension

_EXT, LOAD_ERROR = load_extension(
    "hatkernels._C_cpu", "build it with `pip install --no-build-isolation -e .`"
)


class CpuBackend(ExtensionBackend):
    name = "cpu"
    device_types = ("cpu",)
    extension = _EXT
    load_error = LOAD_ERROR
