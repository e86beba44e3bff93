"""Classification tasks write what ``predict`` computes instead of only returning it to the caller."""
from __future__ import annotations

from typing import Any

from lightning.pytorch.callbacks import BasePredictionWriter
from lightning.pytorch.trainer.states import TrainerFn
from typing_extensions import override

from lit_lowrank.callbacks.prediction_writer import PredictionWriter


class WritesPredictions:
    """Mixin (put it before :class:`~lit_lowrank.tasks.LowRankTask`): in ``predict``, add a
    :class:`~lit_lowrank.callbacks.PredictionWriter` unless the Trainer already has a prediction writer
    (one configured in YAML under ``trainer.callbacks`` wins, with its own ``output_dir``/``filename``).

    Example:
        >>> from lit_lowrank.tasks import ImageClassificationTask
        >>> issubclass(ImageClassificationTask, WritesPredictions)
        True
    """

    @override
    def configure_callbacks(self) -> list[Any]:
        callbacks = super().configure_callbacks() or []  # type: ignore[misc]
        callbacks = list(callbacks) if isinstance(callbacks, (list, tuple)) else [callbacks]
        trainer = getattr(self, "_trainer", None)
        if trainer is None or trainer.state.fn != TrainerFn.PREDICTING:
            return callbacks
        # Lightning lets a module callback replace Trainer callbacks of its type; never replace the user's writer.
        if not any(isinstance(c, BasePredictionWriter) for c in [*trainer.callbacks, *callbacks]):
            callbacks.append(PredictionWriter())
        return callbacks
