"""What the GPU report scripts (``cuda_report.py``, ``gpu_report.py``) share."""

from __future__ import annotations

from pathlib import Path


def write_report(out: Path, report: list[str]) -> None:
    """Write the markdown ``report`` (one line an entry) to ``out``, creating its folder, and
    print it."""
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text("\n".join(report) + "\n")
    print("\n".join(report))
