"""A fresh ``<default_root_dir>/version_<n>`` folder for each run that has no logger.

Without a logger, Lightning's ``trainer.log_dir`` is ``trainer.default_root_dir`` itself (the working directory by
default), so the CLI's ``config.yaml``, the adapter export and the checkpoints of one run would land there and be
overwritten by the next run. Loggers number their runs ``version_<n>``; this does the same for logger-less runs.
"""
from __future__ import annotations

import re
from pathlib import Path

from lightning.pytorch.callbacks import Callback

from lit_lowrank.cli.lightning_private import set_default_root_dir


def next_version(root: Path) -> int:
    taken = [int(m.group(1)) for p in root.glob("version_*") if (m := re.fullmatch(r"version_(\d+)", p.name))]
    return max(taken, default=-1) + 1


class VersionedRunDir(Callback):
    """Point ``trainer.default_root_dir`` (and so ``trainer.log_dir``) at ``<default_root_dir>/version_<n>``.

    Must run its ``setup`` before the callbacks that read the directory there (the CLI's config saver and
    ModelCheckpoint); the CLI puts it first. Rank zero picks the number and broadcasts it, so all ranks agree.
    """

    def __init__(self) -> None:
        self.run_dir = None

    def setup(self, trainer, pl_module, stage: str) -> None:
        # a logger numbers the run itself; test_after_fit's second setup keeps this run's folder; remote roots
        # (s3://...) are left as they are
        if trainer.loggers or self.run_dir is not None or "://" in str(trainer.default_root_dir):
            return
        root = Path(trainer.default_root_dir)
        version = trainer.strategy.broadcast(next_version(root) if trainer.is_global_zero else None)
        self.run_dir = root / f"version_{version}"
        if trainer.is_global_zero:  # reserve the number against a run started next to this one
            self.run_dir.mkdir(parents=True, exist_ok=True)
        set_default_root_dir(trainer, str(self.run_dir))
