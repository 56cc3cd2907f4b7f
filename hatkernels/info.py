"""``python -m hatkernels.info``: versions, compiled extensions and each backend's status, the
CPU kernels' instruction-set level, and the ``HATKERNELS_*`` environment variables set."""

from __future__ import annotations

import importlib
import os
import platform

import torch

import hatkernels
from hatkernels.dispatch import BACKEND_NAMES, not_supported_reasons


def report() -> str:
    lines = [
        f"hatkernels {hatkernels.__version__}",
        f"python     {platform.python_version()}",
        f"torch      {torch.__version__} (CUDA {torch.version.cuda}, "
        f"GPU available: {torch.cuda.is_available()})",
    ]
    try:
        import triton

        lines.append(f"triton     {triton.__version__}")
    except ImportError:
        lines.append("triton     not installed")
    devices = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
    for device in devices + ([] if "cuda" in devices else ["cuda"]):
        lines.append(f"\nbackends for {device} (float32), fastest first:")
        reasons = not_supported_reasons(torch.device(device), torch.float32, ())
        for name in reasons:
            status = "available" if not reasons[name] else "no: " + "; ".join(reasons[name])
            lines.append(f"  {name:<7} {status}")
    lines.append(f"\nbackend names: {', '.join(BACKEND_NAMES)}")
    lines.append(f"cpu kernels: {cpu_isa_report()}")
    settings = {k: v for k, v in sorted(os.environ.items()) if k.startswith("HATKERNELS_")}
    lines.append("\nHATKERNELS_* environment variables set:" + ("" if settings else " none"))
    lines += [f"  {k}={v}" for k, v in settings.items()]
    return "\n".join(lines)


def cpu_isa_report() -> str:
    """The instruction-set level the compiled CPU kernels run at and the levels this CPU
    supports (the best is the default; ``HATKERNELS_CPU_ISA`` forces one), whether the max
    forward screens with int8 codes (on by default where the CPU has AVX-512 VNNI;
    ``HATKERNELS_CPU_SCREEN=0`` turns it off), or why not known."""
    try:
        ext = importlib.import_module("hatkernels._C_cpu")
    except ImportError as exc:
        return f"not built ({exc})"
    supported = ", ".join(ext.supported_cpu_isas())
    try:
        level = ext.cpu_isa()
        screen = ext.cpu_screen()
    except ValueError as exc:
        return f"error: {exc}"
    return (f"instruction set {level} (this CPU supports: {supported}); "
            f"max screening {screen}")


def main() -> None:
    print(report())


if __name__ == "__main__":
    main()
