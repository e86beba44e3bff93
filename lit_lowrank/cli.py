"""``python cli.py fit|validate|test|predict --config ...``: LightningCLI with tasks and data in subclass mode."""
from __future__ import annotations

import sys
import zipfile
from pathlib import Path
from typing import Literal

import lightning as L
import yaml
from lightning.pytorch.cli import LightningCLI
from lightning.pytorch.loggers import TensorBoardLogger
from lightning.pytorch.utilities import rank_zero_only, rank_zero_warn

from lit_lowrank.callbacks import AdapterExport, MetricsPlot
from lit_lowrank.checkpoint_io import DamagedCheckpointError, load_checkpoint_file, require_dict, use_by_default
from lit_lowrank.cli_errors import CLIConfigError, explain, report
from lit_lowrank.cli_resume import (
    RESUMABLE,
    RescaleResumedLR,
    describe,
    differences,
    flat_model_config,
    mismatch_message,
)
from lit_lowrank.cli_rundir import VersionedRunDir
from lit_lowrank.tasks import LowRankTask


class LowRankCLI(LightningCLI):
    """LightningCLI whose ``model`` is any :class:`~lit_lowrank.tasks.LowRankTask` and ``data`` any DataModule.

    Adds ``--test_after_fit`` (evaluate the best checkpoint on the test split when fit ends) and prints where
    every artefact went when fit ends. ``fit --ckpt_path`` stops when the command's model settings differ from the
    checkpoint's (``--resume_with_changed lr`` allows a new learning rate); errors raised while building the
    model name the config key and say the constructor's message first; runs without a logger get their own
    ``<default_root_dir>/version_<n>`` folder. Checkpoints are saved all-or-nothing
    (:class:`~lit_lowrank.checkpoint_io.AtomicCheckpointIO`) unless ``trainer.plugins`` configures a CheckpointIO.
    """

    def __init__(self, args: list | None = None, run: bool = True, **kwargs) -> None:
        kwargs.setdefault("save_config_kwargs", {"overwrite": True})
        self._resume_callbacks: list = []
        super().__init__(LowRankTask, L.LightningDataModule, subclass_mode_model=True, subclass_mode_data=True,
                         auto_configure_optimizers=False, args=args, run=run, **kwargs)

    def add_arguments_to_parser(self, parser) -> None:
        parser.add_argument("--test_after_fit", type=bool, default=False,
                            help="After fit, run the test split with the best checkpoint and report its metrics.")
        names = Literal[tuple(RESUMABLE)]
        parser.add_argument("--resume_with_changed", type=names | list[names], default=[],
                            help="fit --ckpt_path only: model settings that may differ from the checkpoint's; 'lr' "
                                 "resumes with the command's learning rate (the restored optimizer and scheduler "
                                 "rates are rescaled to it). Any other difference stops fit with a list of them.")

    def _parse_ckpt_path(self) -> None:
        # LightningCLI parses the checkpoint's hyper-parameters over the command's model config: compare first, so
        # that no setting given on the command line is dropped silently (see lit_lowrank/cli_resume.py).
        subcommand = self.config.get("subcommand")
        ckpt_path = self.config[subcommand].get("ckpt_path") if subcommand else None
        if not ckpt_path or not Path(ckpt_path).is_file():
            return super()._parse_ckpt_path()
        # mmap reads only the hyper-parameters, but refuses the pre-zip format (and says so misleadingly for a
        # damaged file): used for zip archives only; a damaged or foreign file stops here with its path and the fix
        loaded = load_checkpoint_file(ckpt_path, weights_only=True, map_location="cpu",
                                      mmap=zipfile.is_zipfile(ckpt_path))
        saved = require_dict(ckpt_path, loaded).get("hyper_parameters")
        if not saved:
            return super()._parse_ckpt_path()
        dumped = yaml.safe_load(self.parser.dump(self.config, skip_link_targets=False, skip_none=False))
        command = flat_model_config(dumped[subcommand]["model"])
        if "_class_path" not in saved:  # saved by a task built from Python: only some arguments were recorded
            command = {name: value for name, value in command.items() if name in saved}
        found = differences(command, dict(saved))
        if subcommand != "fit":  # evaluating: the checkpoint's settings match its weights, so they win
            if found:
                rank_zero_warn(f"{subcommand} --ckpt_path {ckpt_path}: using the checkpoint's model settings "
                               f"instead of the command's for:\n{describe(found)}")
            return super()._parse_ckpt_path()
        opted_in = self.config[subcommand].get("resume_with_changed") or []
        allowed = {RESUMABLE[name] for name in ([opted_in] if isinstance(opted_in, str) else opted_in)}
        blocked = [key for key in found if key not in allowed]
        if blocked:
            raise CLIConfigError(mismatch_message(str(ckpt_path), found))
        # Only opted-in settings differ: keep the command's config (the checkpoint's in all else) and make them count.
        if RESUMABLE["lr"] in found:
            new_lr, old_lr = found[RESUMABLE["lr"]]
            self._resume_callbacks.append(RescaleResumedLR(old_lr, new_lr))

    def instantiate_classes(self) -> None:
        try:
            super().instantiate_classes()
        except Exception as error:
            explained = explain(error)  # jsonargparse buries a constructor's message in nested Union errors
            if explained is None:
                raise
            raise explained from explained.__cause__

    def instantiate_trainer(self, **kwargs) -> L.Trainer:
        trainer = super().instantiate_trainer(**kwargs)
        use_by_default(trainer.strategy)  # a kill during a save must leave the previous checkpoint usable
        # first, so that its setup picks the run folder before the config saver and ModelCheckpoint read it
        trainer.callbacks.insert(0, VersionedRunDir())
        trainer.callbacks.extend(self._resume_callbacks)
        return trainer

    def after_fit(self) -> None:
        test_metrics = {}
        if self.config[self.config.subcommand].get("test_after_fit"):
            has_best = bool(getattr(self.trainer.checkpoint_callback, "best_model_path", ""))
            results = self.trainer.test(self.model, datamodule=self.datamodule, ckpt_path="best" if has_best else None)
            test_metrics = results[0] if results else {}
        # trainer.log_dir is a collective under DDP/FSDP: read it on every rank, print on rank zero only.
        print_summary(self.trainer, self.trainer.log_dir, test_metrics)


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


def main(args: list | None = None) -> None:
    """Console entry point (``lit-lowrank`` and ``python cli.py``)."""
    argv = sys.argv[1:] if args is None else list(args)
    if argv[:1] == ["memory"]:  # not a LightningCLI subcommand: per-GPU memory tables (lit_lowrank/memory_cli.py)
        from lit_lowrank.memory_cli import main as memory_main

        sys.exit(memory_main(argv[1:]))
    try:
        LowRankCLI(args=args)
    except (CLIConfigError, DamagedCheckpointError) as error:  # its message first, not a page of traceback
        report(error)
        sys.exit(2)
    close_process_group()


def close_process_group() -> None:
    """Destroy the default process group after a successful run (DDP / FSDP), while the interpreter is still whole.

    Lightning leaves it to the process's exit, where gloo's worker threads can outlive the interpreter and abort a
    finished run ("terminate called without an active exception", exit status -6, seen in CI on a 2-process CPU DDP
    run). Only on success: after an exception another rank may be inside a collective, and destroying would hang.
    """
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


if __name__ == "__main__":
    main()
