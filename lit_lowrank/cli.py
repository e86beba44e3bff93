"""``python cli.py fit|validate|test|predict --config ...``: LightningCLI with tasks and data in subclass mode."""
from __future__ import annotations

from pathlib import Path
from typing import Optional

import lightning as L
from lightning.pytorch.cli import LightningCLI
from lightning.pytorch.loggers import TensorBoardLogger
from lightning.pytorch.utilities import rank_zero_only

from lit_lowrank.callbacks import AdapterExport, MetricsPlot
from lit_lowrank.tasks import LowRankTask


class LowRankCLI(LightningCLI):
    """LightningCLI whose ``model`` is any :class:`~lit_lowrank.tasks.LowRankTask` and ``data`` any DataModule.

    Adds ``--test_after_fit`` (evaluate the best checkpoint on the test split when fit ends) and prints where
    every artefact went when fit ends.
    """

    def __init__(self, args: Optional[list] = None, run: bool = True, **kwargs) -> None:
        kwargs.setdefault("save_config_kwargs", {"overwrite": True})
        super().__init__(LowRankTask, L.LightningDataModule, subclass_mode_model=True, subclass_mode_data=True,
                         auto_configure_optimizers=False, args=args, run=run, **kwargs)

    def add_arguments_to_parser(self, parser) -> None:
        parser.add_argument("--test_after_fit", type=bool, default=False,
                            help="After fit, run the test split with the best checkpoint and report its metrics.")

    def after_fit(self) -> None:
        test_metrics = {}
        if self.config[self.config.subcommand].get("test_after_fit"):
            has_best = bool(getattr(self.trainer.checkpoint_callback, "best_model_path", ""))
            results = self.trainer.test(self.model, datamodule=self.datamodule, ckpt_path="best" if has_best else None)
            test_metrics = results[0] if results else {}
        # trainer.log_dir is a collective under DDP/FSDP: read it on every rank, print on rank zero only.
        print_summary(self.trainer, self.trainer.log_dir, test_metrics)


@rank_zero_only
def print_summary(trainer: L.Trainer, log_dir: Optional[str], test_metrics: dict) -> None:
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
                lines.append(f"  adapter ({name:5s})     {path.resolve()}  (PEFT format)")
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


def main(args: Optional[list] = None) -> None:
    """Console entry point (``lit-lowrank`` and ``python cli.py``)."""
    LowRankCLI(args=args)


if __name__ == "__main__":
    main()
