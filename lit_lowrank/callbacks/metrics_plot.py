"""A PNG of chosen metrics against the step, drawn from the CSV log at the end of fit."""
from __future__ import annotations

import csv
from collections.abc import Sequence
from pathlib import Path

import lightning as L
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.loggers import CSVLogger
from lightning.pytorch.utilities import rank_zero_only, rank_zero_warn
from typing_extensions import override


def read_metrics(csv_path: Path) -> dict[str, list[tuple[int, float]]]:
    """``{metric: [(step, value), ...]}`` from a Lightning ``metrics.csv``, skipping empty cells."""
    series: dict[str, list[tuple[int, float]]] = {}
    with open(csv_path, newline="") as handle:
        for row in csv.DictReader(handle):
            step = int(float(row.get("step") or 0))
            for key, value in row.items():
                if key not in ("step", "epoch") and value not in ("", None):
                    series.setdefault(key, []).append((step, float(value)))
    return series


def plot_metrics(csv_path: Path, metrics: Sequence[str], output: Path, title: str | None = None) -> Path:
    """Draw one panel per metric found in ``csv_path`` (missing ones are skipped) into ``output``."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    series = read_metrics(csv_path)
    present = [m for m in metrics if m in series]
    if not present:
        raise ValueError(f"none of {list(metrics)} were logged in {csv_path}; logged: {sorted(series)}")
    figure, axes = plt.subplots(1, len(present), figsize=(4.5 * len(present), 3.4), squeeze=False)
    for axis, name in zip(axes[0], present):
        steps, values = zip(*series[name])
        axis.plot(steps, values, marker="o" if len(steps) < 30 else None, markersize=3)
        axis.set_xlabel("step")
        axis.set_title(name)
        axis.grid(alpha=0.3)
    if title:
        figure.suptitle(title)
    figure.tight_layout()
    output.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(output, dpi=110)
    plt.close(figure)
    return output


class MetricsPlot(Callback):
    """Save ``<log_dir>/<filename>``: the chosen metrics against the step, read from the CSVLogger's file.

    The plot never fails a finished fit (callbacks after it, such as ``AdapterExport``, still run at the end):
    metric names that were never logged are skipped with a warning that lists the logged ones, and when none of
    them was logged no plot is drawn.

    Args:
        metrics: metric names as logged (e.g. ``train/loss``, ``val/acc``): the defaults are the lit_lowrank tasks'
            names; for a module that logs ``self.log("train_loss", ...)`` pass ``metrics=["train_loss"]``.
        filename: PNG file name inside the CSV logger's directory.

    Example:
        >>> MetricsPlot(metrics=["train_loss", "val_loss"]).metrics
        ['train_loss', 'val_loss']
    """

    def __init__(self, metrics: Sequence[str] = ("train/loss", "val/loss", "val/acc"),
                 filename: str = "metrics.png") -> None:
        self.metrics = list(metrics)
        self.filename = filename
        self.path: Path | None = None

    @override
    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        # Say it before training, not after: a run without a CSV log has nothing to plot.
        if stage == "fit" and _csv_logger(trainer) is None:
            rank_zero_warn("MetricsPlot draws from the CSV log, and trainer.logger has no CSVLogger: no plot will be "
                           "drawn. HINT: add lightning.pytorch.loggers.CSVLogger to trainer.logger, or drop "
                           "MetricsPlot from trainer.callbacks.")

    @override
    @rank_zero_only
    def on_fit_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        csv_logger = _csv_logger(trainer)
        if csv_logger is None:
            return
        csv_logger.save()
        csv_path = Path(csv_logger.experiment.metrics_file_path)
        if not csv_path.exists():  # e.g. a resumed run that ended before its next logging step
            rank_zero_warn(f"MetricsPlot: nothing was logged to {csv_path} in this run, so no plot was drawn.")
            return
        logged = sorted(read_metrics(csv_path))
        missing = [name for name in self.metrics if name not in logged]
        if missing:
            drawn = [name for name in self.metrics if name in logged]
            outcome = f"drew {drawn} only" if drawn else "no plot was drawn"
            example = sorted(logged, key=lambda name: "loss" not in name)[:3]  # losses first: the likely intent
            rank_zero_warn(f"MetricsPlot: {missing} were never logged in this run, so {outcome}; the logged metrics "
                           f"are {logged}. HINT: name the metrics to plot as the module logs them, e.g. "
                           f"MetricsPlot(metrics={example}) (YAML: init_args: {{metrics: [...]}}).")
            if not drawn:
                return
        self.path = plot_metrics(csv_path, self.metrics, Path(csv_logger.log_dir) / self.filename,
                                 title=type(pl_module).__name__)


def _csv_logger(trainer: L.Trainer) -> CSVLogger | None:
    return next((logger for logger in trainer.loggers if isinstance(logger, CSVLogger)), None)
