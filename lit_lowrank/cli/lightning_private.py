"""Every private Lightning API that lit_lowrank relies on, in one place.

Lightning offers no public way to do these four things; each is used here and nowhere else, and
``tests/lightning/test_lightning_private.py`` checks each against the installed Lightning, so that a release that
renames or reorders one fails that test by name instead of breaking a run.

- ``LightningCLI._parse_ckpt_path``: called by ``LightningCLI.__init__`` right after parsing, to read the
  ``--ckpt_path`` checkpoint's hyper-parameters over the config (:class:`CheckpointConfigHook`).
- ``hparams_mixin._given_hyperparameters``: the config LightningCLI hands to the module it is building
  (:func:`given_hyperparameters`).
- ``Trainer._default_root_dir``: ``default_root_dir`` has no setter (:func:`set_default_root_dir`).
- ``Strategy._checkpoint_io``: the public property creates Lightning's default in place of "none chosen"
  (:func:`chosen_checkpoint_io`).
"""
from __future__ import annotations

from typing import Any


class CheckpointConfigHook:
    """Mixin for a ``LightningCLI`` subclass: route Lightning's private ``_parse_ckpt_path`` step (reading the
    ``--ckpt_path`` checkpoint's hyper-parameters over the parsed config) to ``self.read_checkpoint_config()``.

    Example:
        >>> class Quiet(CheckpointConfigHook):
        ...     def read_checkpoint_config(self):
        ...         print("read once")
        >>> Quiet()._parse_ckpt_path()
        read once
    """

    def _parse_ckpt_path(self) -> None:
        self.read_checkpoint_config()

    def read_checkpoint_config(self) -> None:
        raise NotImplementedError


def given_hyperparameters() -> dict[str, Any] | None:
    """The config LightningCLI is instantiating a LightningModule with (it becomes the module's hparams), or None
    outside LightningCLI."""
    from lightning.pytorch.core.mixins.hparams_mixin import _given_hyperparameters

    return _given_hyperparameters.get()


def set_default_root_dir(trainer, path: str) -> None:
    """Point ``trainer.default_root_dir`` (and so ``trainer.log_dir`` without a logger, and ModelCheckpoint's
    default folder) at ``path``."""
    trainer._default_root_dir = path


def chosen_checkpoint_io(strategy):
    """The CheckpointIO configured on ``strategy``, or None where nobody chose one (``strategy.checkpoint_io``
    would create and store Lightning's default instead of answering)."""
    return strategy._checkpoint_io
