"""Check the Trainer's loop settings against the data before a fit computes anything, and say a bad one plainly.

Lightning checks ``val_check_interval``, ``limit_train_batches``, ``overfit_batches`` and iterable-loader settings
when its fit loop sets up the training data: while configuring the optimizers when a scheduler asks for the run's
length, else only after ``on_fit_start`` and the sanity check. A task that computes in ``on_fit_start``
(CausalLMTask's ``test_before_fit``: minutes on a large test split) ran all of it before a bad ``val_check_interval``
was reported. :class:`FitPreflight` runs that same setup first; :func:`explain_loop_error` turns its error into a
:class:`~lit_lowrank.cli.errors.CLIConfigError` (one line with the fix, exit status 2) wherever it is raised.
"""
from __future__ import annotations

import traceback
from pathlib import Path

from lightning.pytorch.callbacks import Callback
from lightning.pytorch.utilities.exceptions import MisconfigurationException

from lit_lowrank.cli.errors import CLIConfigError

_LOOP_FLAGS = ("val_check_interval", "check_val_every_n_epoch", "limit_train_batches", "overfit_batches")


class FitPreflight(Callback):
    """In ``on_fit_start``, before the LightningModule's own ``on_fit_start`` (Lightning calls the callbacks'
    first), set up the fit loop's training data, which is where Lightning checks the loop settings.

    The setup is Lightning's own and happens once: the loop reuses it, with the loader position of a resumed run
    (restored before ``on_fit_start``).

    Example:
        >>> import lightning as L
        >>> from lightning.pytorch.demos.boring_classes import BoringModel
        >>> trainer = L.Trainer(accelerator="cpu", max_steps=1, val_check_interval=1000, logger=False,
        ...                     enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
        ...                     callbacks=[FitPreflight()])
        >>> try:
        ...     trainer.fit(BoringModel())
        ... except ValueError as error:
        ...     print(explain_loop_error(error))  # doctest: +ELLIPSIS
        the trainer's loop settings do not fit the training data: `val_check_interval` (1000) must be less than or \
equal to the number of the training batches (64). HINT: set trainer.val_check_interval to at most ...
    """

    def on_fit_start(self, trainer, pl_module) -> None:
        trainer.fit_loop.setup_data()


def explain_loop_error(error: BaseException) -> CLIConfigError | None:
    """A :class:`CLIConfigError` with the fix for an error of Lightning's loop-settings check, else None."""
    if not isinstance(error, (ValueError, MisconfigurationException)) or not _raised_in_loop_setup(error):
        return None
    if not any(flag in str(error) for flag in _LOOP_FLAGS):  # e.g. the data module's own error: as it is
        return None
    message = str(error).strip().split(". ")[0]
    return CLIConfigError(f"the trainer's loop settings do not fit the training data: {message}. HINT: "
                          f"{_hint(message)}")


def _raised_in_loop_setup(error: BaseException) -> bool:
    return any(frame.name == "setup_data" and Path(frame.filename).name == "fit_loop.py"
               for frame in traceback.extract_tb(error.__traceback__))


def _hint(message: str) -> str:
    if "val_check_interval" in message:
        return ("set trainer.val_check_interval to at most the number of training batches per epoch, or "
                "trainer.check_val_every_n_epoch: null to count batches over the whole run, or "
                "trainer.limit_val_batches: 0 to skip validation.")
    return "change the trainer setting the message names."
