"""What the CLI prints when fit ends: where each artefact of the run is, and the held-out metrics."""
from __future__ import annotations

from pathlib import Path

import lightning as L
from lightning.pytorch.loggers import TensorBoardLogger
from lightning.pytorch.utilities import rank_zero_only

from lit_lowrank.callbacks import AdapterExport, MetricsPlot


@rank_zero_only
def print_summary(trainer: L.Trainer, log_dir: str | None, test_metrics: dict) -> None:
    """Where each artefact of the run is, and the held-out metrics."""
    lines = ["", "=" * 72, "Run finished. Artefacts:"]
    if log_dir:
        lines.append(f"  log directory       {Path(log_dir).resolve()}")
        metrics_csv = Path(log_dir) / "metrics.csv"
        if metrics_csv.exists():
            lines.append(f"  metrics (CSV)       {metrics_csv.resolve()}")
    for logger in trainer.loggers:
        if isinstance(logger, TensorBoardLogger):
            lines.append(f"  TensorBoard logs    {Path(logger.log_dir).resolve()}  (tensorboard --logdir ...)")
    for callback in trainer.callbacks:
        if isinstance(callback, MetricsPlot) and callback.path:
            lines.append(f"  metrics plot (PNG)  {callback.path.resolve()}")
        if isinstance(callback, AdapterExport):
            for name, path in callback.exported.items():
                lines.append(f"  adapter ({name:5s})     {path.resolve()}  ({callback.format_label(name)})")
    best = getattr(trainer.checkpoint_callback, "best_model_path", "")
    if best:
        lines.append(f"  best checkpoint     {Path(best).resolve()}")
    validation = {k: float(v) for k, v in trainer.callback_metrics.items() if k.startswith("val/")}
    if validation:
        lines.append("Validation metrics (last evaluation):")
        lines.extend(f"  {key:18s}  {value:.4f}" for key, value in sorted(validation.items()))
    if test_metrics:
        lines.append("Held-out (test split) metrics:")
        lines.extend(f"  {key:18s}  {value:.4f}" for key, value in sorted(test_metrics.items()))
    lines.append("=" * 72)
    print("\n".join(lines), flush=True)
