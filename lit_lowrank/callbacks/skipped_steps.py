"""Stop a fit whose optimizer keeps skipping updates for non-finite gradients, instead of exiting 0."""
from __future__ import annotations

from typing import Any

import lightning as L
from lightning.pytorch.callbacks import Callback
from typing_extensions import override


def skipped_steps(trainer: L.Trainer) -> int:
    """Updates skipped so far by the trainer's optimizers that count them (LoRAPro, LoRAPreAdamW, LoRAPreMuon)."""
    return sum(optimizer.skipped_steps() for optimizer in trainer.optimizers if hasattr(optimizer, "skipped_steps"))


class SkippedStepsGuard(Callback):
    """Raise when ``max_consecutive`` optimizer steps in a row each skipped an update for a non-finite gradient.

    The lit_lowrank optimizers skip a parameter whose gradient holds NaN or inf (parameter and state unchanged)
    and count it. One such step is harmless; many in a row mean the run trains nothing (a NaN loss, an exploding
    learning rate), and without this guard it would still end "successfully". The lit_lowrank tasks add it by
    default (``max_skipped_steps``); in your own Lightning project, list it with your callbacks. Optimizers
    without a ``skipped_steps()`` method are ignored. The count of consecutive skipping steps is saved in
    checkpoints.

    Args:
        max_consecutive: how many consecutive skipping optimizer steps stop the fit (default 10).

    Example:
        >>> import lightning as L
        >>> trainer = L.Trainer(callbacks=[SkippedStepsGuard(max_consecutive=5)], logger=False,
        ...                     enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False)
    """

    def __init__(self, max_consecutive: int = 10) -> None:
        if isinstance(max_consecutive, bool) or not isinstance(max_consecutive, int) or max_consecutive < 1:
            raise ValueError(f"SkippedStepsGuard: max_consecutive must be an int >= 1, got {max_consecutive!r}.")
        self.max_consecutive = max_consecutive
        self.consecutive = 0
        self._seen_step = -1
        self._seen_total = 0

    @override
    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._seen_step, self._seen_total = trainer.global_step, skipped_steps(trainer)

    @override
    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any, batch: Any,
                           batch_idx: int) -> None:
        if trainer.global_step == self._seen_step:  # accumulating gradients: no optimizer step yet
            return
        total = skipped_steps(trainer)
        self.consecutive = self.consecutive + 1 if total > self._seen_total else 0
        self._seen_step, self._seen_total = trainer.global_step, total
        if self.consecutive >= self.max_consecutive:
            raise RuntimeError(
                f"The optimizer skipped updates because of non-finite (NaN/inf) gradients in {self.consecutive} "
                f"consecutive steps (up to step {trainer.global_step}; {total} skipped parameter updates so far), so "
                "this run is no longer training. HINT: lower the learning rate, enable gradient clipping "
                "(trainer.gradient_clip_val), check the data for NaN/inf, prefer bf16 to fp16; or allow more with "
                "the task's max_skipped_steps (SkippedStepsGuard(max_consecutive=...))."
            )

    @override
    def state_dict(self) -> dict[str, Any]:
        return {"consecutive": self.consecutive}

    @override
    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.consecutive = int(state_dict["consecutive"])
