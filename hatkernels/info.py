"""``python -m hatkernels.info``: versions, compiled extensions and each backend's status."""

from __future__ import annotations

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
    return "\n".join(lines)


def main() -> None:
    print(report())


if __name__ == "__main__":
    main()
