"""The training report: `training_report.json` (settings, statistics, histories) and `loss_curves.png`."""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path

from ..eraser import Eraser


def momentum_curve(losses: Sequence[float], alpha: float) -> list[float]:
    """`L_mom` of Eq. 4 after each iteration."""
    momentum, smoothed = 0.0, []
    for value in losses:
        momentum = alpha * momentum + (1 - alpha) * value
        smoothed.append(momentum)
    return smoothed


def _write_json(erasers: Sequence[Eraser], folder: Path) -> Path:
    report = {e.name: {"prompt": e.prompt, "known": e.known, "protected": e.protected, **e.metadata}
              for e in erasers}
    for entry in report.values():
        entry.pop("fingerprint", None)
    path = folder / "training_report.json"
    path.write_text(json.dumps(report, indent=2, default=str))
    return path


def _plot_curves(erasers: Sequence[Eraser], path: Path) -> Path:
    import matplotlib  # a plotting backend is chosen before pyplot is imported

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axes = plt.subplots(1, 2, figsize=(11, 4))
    for index, eraser in enumerate(erasers):
        color = f"C{index}"
        history = eraser.metadata.get("history", {})
        l_cor = history.get("l_cor") or history.get("loss", [])  # baselines record their own loss
        alpha = eraser.metadata.get("training", {}).get("config", {}).get("alpha", 0.9)
        axes[0].plot(l_cor, alpha=0.3, color=color)
        axes[0].plot(momentum_curve(l_cor, alpha), label=f"{eraser.name} (L_mom)", color=color)
        axes[1].plot(history.get("regulariser", []), label=eraser.name, color=color)
    axes[0].axhline(0.0, color="black", linewidth=0.8)
    axes[0].set(title="L_cor per iteration and its momentum (Eq. 2, 4)", xlabel="iteration")
    axes[1].set(title="||w||_1 / M (Eq. 11)", xlabel="iteration")
    for axis in axes:
        axis.legend(fontsize=8)
    figure.tight_layout()
    figure.savefig(path, dpi=100)
    plt.close(figure)
    return path


def write_report(erasers: Sequence[Eraser], folder: str | Path) -> tuple[Path, Path]:
    """`training_report.json` (settings, statistics, loss histories) and `loss_curves.png`."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    return _write_json(erasers, folder), _plot_curves(erasers, folder / "loss_curves.png")
