"""``python cli.py fit|validate|test|predict --config ...``: LightningCLI with tasks and data in subclass mode."""
from __future__ import annotations

import sys
from typing import Literal

import lightning as L
import yaml
from jsonargparse import Namespace
from lightning.pytorch.cli import LightningCLI
from lightning.pytorch.utilities.exceptions import MisconfigurationException

import lit_lowrank.data  # noqa: F401  (registers the data modules, so --data and --data.help take short names)
from lit_lowrank.checkpoint_io import use_by_default
from lit_lowrank.cli.arguments import with_nulls_as_configs
from lit_lowrank.cli.callback_lists import warn_dropped_callbacks
from lit_lowrank.cli.errors import explain
from lit_lowrank.cli.lightning_private import CheckpointConfigHook
from lit_lowrank.cli.nested_help import answer_nested_help, nested_help_epilog
from lit_lowrank.cli.parser import LowRankArgumentParser
from lit_lowrank.cli.preflight import FitPreflight, explain_loop_error
from lit_lowrank.cli.resume import RESUMABLE, ResumeCheckpoint
from lit_lowrank.cli.rundir import VersionedRunDir
from lit_lowrank.cli.summary import print_summary
from lit_lowrank.tasks import LowRankTask


class LowRankCLI(CheckpointConfigHook, LightningCLI):
    """LightningCLI whose ``model`` is any :class:`~lit_lowrank.tasks.LowRankTask` and ``data`` any DataModule.

    Adds ``--test_after_fit`` (evaluate the best checkpoint on the test split when fit ends) and prints where
    every artefact went when fit ends. ``fit --ckpt_path`` reads the checkpoint once and stops when the command's
    model settings differ from it (``--resume_with_changed lr`` allows a new learning rate). Options are never
    abbreviated; a parse error is a few lines with the closest option; ``--X=null`` works at any depth; every part
    has its help (``--model.backbone.help NAME``, see the end of ``fit --help``). Errors raised while building the
    model name the config key and say the constructor's message (or the missing package) first. The Trainer's loop
    settings are checked against the data before anything is computed; callbacks that a later ``--config`` drops
    are named. Runs without a logger get their own ``<default_root_dir>/version_<n>`` folder. Checkpoints are saved
    all-or-nothing (:class:`~lit_lowrank.checkpoint_io.AtomicCheckpointIO`) unless ``trainer.plugins`` configures
    a CheckpointIO.

    Example:
        >>> try:  # every part of the run has its help; this is LoRA's
        ...     LowRankCLI(args=["fit", "--model.lora.help"])
        ... except SystemExit as done:
        ...     print("exit status", done.code)  # doctest: +ELLIPSIS
        usage: ... fit [--config CONFIG] [--model.lora.ARGUMENT VALUE ...]
        ...
          --model.lora.r R ...
        exit status 0
    """

    def __init__(self, args: list | None = None, run: bool = True, **kwargs) -> None:
        kwargs.setdefault("save_config_kwargs", {"overwrite": True})
        kwargs.setdefault("parser_class", LowRankArgumentParser)
        self.resume: ResumeCheckpoint | None = None
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
        # argparse's usage lists all ~50 options again above the list itself
        parser.usage = "%(prog)s [-h] [-c CONFIG] [--print_config[=flags]] [--OPTION VALUE ...]"
        parser.description = (f"{parser.description}\nThe options are below; those of the model, data, callbacks "
                              "and loggers: see the nested help at the end.")
        parser.epilog = nested_help_epilog()

    def parse_arguments(self, parser, args) -> None:
        if isinstance(args, (dict, Namespace)):
            return super().parse_arguments(parser, args)
        argv = list(sys.argv[1:] if args is None else args)
        subcommand = argv[0] if argv and argv[0] in self.subcommands() else ""
        answer_nested_help(argv, prog=f"{parser.prog} {subcommand}".strip())
        argv = with_nulls_as_configs(argv)
        if args is None:  # Lightning's parse_arguments would warn that args and sys.argv are both given
            self.config = parser.parse_args(argv)
        else:
            super().parse_arguments(parser, argv)
        warn_dropped_callbacks(argv, self.config)

    def read_checkpoint_config(self) -> None:
        # LightningCLI would read the checkpoint's hyper-parameters over the command's model config, silently
        # dropping settings given on the command line: compare first (lit_lowrank/cli/resume.py), reading it once.
        subcommand = self.config.get("subcommand")
        if not subcommand:
            return
        settings = self.config[subcommand]
        self.resume = ResumeCheckpoint.read(settings.get("ckpt_path"), settings.get("weights_only"))
        if self.resume is None:
            return
        dumped = yaml.safe_load(self.parser.dump(self.config, skip_link_targets=False, skip_none=False))
        if self.resume.check(subcommand, dumped[subcommand]["model"], settings.get("resume_with_changed")):
            self.config = self.parser.parse_object({subcommand: {"model": self.resume.model_config()}}, self.config)

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
        # before any other on_fit_start (a task's test_before_fit): the loop settings fail in seconds, not after it
        trainer.callbacks.insert(1, FitPreflight())
        if self.resume is not None:
            trainer.callbacks.extend(self.resume.callbacks)
            self.resume.hand_over(trainer.strategy)
        return trainer

    def fit(self, **kwargs) -> None:
        try:
            self.trainer.fit(**kwargs)
        except (ValueError, MisconfigurationException) as error:
            explained = explain_loop_error(error)  # a loop setting that does not fit the data: the fix, not a page
            if explained is None:
                raise
            raise explained from None

    def after_fit(self) -> None:
        test_metrics = {}
        if self.config[self.config.subcommand].get("test_after_fit"):
            has_best = bool(getattr(self.trainer.checkpoint_callback, "best_model_path", ""))
            results = self.trainer.test(self.model, datamodule=self.datamodule, ckpt_path="best" if has_best else None)
            test_metrics = results[0] if results else {}
        # trainer.log_dir is a collective under DDP/FSDP: read it on every rank, print on rank zero only.
        print_summary(self.trainer, self.trainer.log_dir, test_metrics)
