"""The training report: `training_report.json` (settings, statistics, histories) and `loss_curves.png`."""

from __future__ import annotations

import json
import warnings
from collections.abc import Sequence
from pathlib import Path

from ..eraser import Eraser
from ..extras import require


def momentum_curve(losses: Sequence[float], alpha: float, start: float = 0.0) -> list[float]:
    """`L_mom` of Eq. 4 after each iteration (`start`: its value before the first; rho starts at 1)."""
    momentum, smoothed = start, []
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
    matplotlib = require("matplotlib", "the training report's loss-curve plot")
    matplotlib.use("Agg")  # a plotting backend is chosen before pyplot is imported
    import matplotlib.pyplot as plt

    figure, axes = plt.subplots(1, 2, figsize=(11, 4))
    taus = set()
    for index, eraser in enumerate(erasers):
        color = f"C{index}"
        history = eraser.metadata.get("history", {})
        config = eraser.metadata.get("training", {}).get("config", {})
        on_rho = config.get("stop_on") == "rho" and history.get("rho")
        values = history["rho"] if on_rho else history.get("l_cor") or history.get("loss", [])  # baselines: own loss
        certificate = "" if eraser.certificate is None else f", certificate {eraser.certificate:.1e}"
        axes[0].plot(values, alpha=0.3, color=color)
        axes[0].plot(momentum_curve(values, config.get("alpha", 0.9), 1.0 if on_rho else 0.0), color=color,
                     label=f"{eraser.name} ({'rho' if on_rho else 'L_cor'} momentum{certificate})")
        axes[1].plot(history.get("regulariser", []), label=eraser.name, color=color)
        if "tau" in config:
            taus.add(config["tau"])
    for tau in taus:
        axes[0].axhline(tau, color="black", linewidth=0.8, linestyle="--")
    axes[0].set(title="stop statistic and its momentum (Eq. 2, 4; dashed: tau)", xlabel="iteration")
    axes[1].set(title="||w||_1 / M (Eq. 11)", xlabel="iteration")
    for axis in axes:
        axis.legend(fontsize=8)
    figure.tight_layout()
    figure.savefig(path, dpi=100)
    plt.close(figure)
    return path


def write_report(erasers: Sequence[Eraser], folder: str | Path) -> tuple[Path, Path | None]:
    """`training_report.json` (settings, statistics, loss histories) and `loss_curves.png`; without matplotlib
    (the `[train]` extra) the curves are left out with a warning (None), the JSON is written all the same."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    json_path = _write_json(erasers, folder)
    try:
        return json_path, _plot_curves(erasers, folder / "loss_curves.png")
    except ImportError as error:
        if error.name != "matplotlib":
            raise
        warnings.warn(f"no loss_curves.png: {error}", stacklevel=2)
        return json_path, None
