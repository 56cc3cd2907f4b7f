"""Training curves (loss, validation rsum, score spread per epoch) as a PNG, written
atomically like every file of a run folder."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from .checkpoint import write_file


def plot_history(history: list[dict[str, Any]], path: str | Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    epochs = [r["epoch"] for r in history]
    fig, axes = plt.subplots(1, 3, figsize=(12, 3.5))
    for ax, key, title in zip(axes, ("loss", "val_rsum", "spread"),
                              ("training loss", "validation rsum", "score spread")):
        ax.plot(epochs, [r[key] for r in history], marker="o")
        ax.set_title(title)
        ax.set_xlabel("epoch")
        ax.grid(alpha=0.3)
    fig.tight_layout()
    write_file(path, lambda tmp: fig.savefig(tmp, dpi=100, format="png"))
    plt.close(fig)
