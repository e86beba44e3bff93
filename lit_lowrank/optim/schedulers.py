"""Learning-rate schedulers: :class:`WarmupCosineLR`, which the tasks tie to the run's optimizer steps."""
from __future__ import annotations

import math
import warnings

import torch
from torch import nn  # noqa: F401  (doctest)
from torch.optim.lr_scheduler import LambdaLR


class WarmupCosineLR(LambdaLR):
    """Linear warm-up to the base learning rate, then cosine decay to ``min_ratio`` of it.

    Args:
        optimizer: the optimizer whose learning rates are scheduled.
        warmup_steps: steps of linear warm-up from 0.
        total_steps: steps at which the cosine reaches ``min_ratio``; held there afterwards. ``None`` (the default)
            means the run's optimizer steps: the tasks set it to ``trainer.estimated_stepping_batches``. An explicit
            value below the run's steps is an error there (the run would end at ``min_ratio`` x lr).
        min_ratio: final learning rate as a fraction of the base one.

    Example:
        >>> opt = torch.optim.SGD([nn.Parameter(torch.zeros(1))], lr=1.0)
        >>> sched = WarmupCosineLR(opt, warmup_steps=2, total_steps=10, min_ratio=0.1)
        >>> [round(sched.lr_lambda(s), 3) for s in (0, 1, 2, 6, 10, 20)]
        [0.0, 0.5, 1.0, 0.55, 0.1, 0.1]
    """

    def __init__(self, optimizer: torch.optim.Optimizer, warmup_steps: int = 0, total_steps: int | None = None,
                 min_ratio: float = 0.0):
        if total_steps is not None and total_steps <= warmup_steps:
            raise ValueError(f"total_steps ({total_steps}) must exceed warmup_steps ({warmup_steps})")
        self.warmup_steps, self.total_steps, self.min_ratio = warmup_steps, total_steps, min_ratio
        super().__init__(optimizer, self.lr_lambda)

    def fit_to_run(self, run_steps: float) -> None:
        """Set an unset ``total_steps`` to ``run_steps``; refuse a run longer than an explicit ``total_steps``."""
        if self.total_steps is None:
            if not math.isfinite(run_steps):
                raise ValueError("WarmupCosineLR has no total_steps and the run has no length (trainer.max_steps=-1 "
                                 "and trainer.max_epochs=-1). HINT: set trainer.max_steps, or the scheduler's "
                                 "init_args.total_steps")
            if run_steps <= self.warmup_steps:
                # A smoke test of a few steps should run, but say that its learning rate never got to warm up.
                warnings.warn(f"the run takes {int(run_steps)} optimizer steps, no more than WarmupCosineLR's "
                              f"warmup_steps={self.warmup_steps}: it never reaches the base learning rate")
            self.total_steps = max(int(run_steps), self.warmup_steps + 1)
        elif run_steps > self.total_steps:
            raise ValueError(
                f"the run takes {int(run_steps)} optimizer steps (trainer.max_steps, or trainer.max_epochs x batches "
                f"per epoch / accumulate_grad_batches) but the scheduler's total_steps is {self.total_steps}: the last "
                f"{int(run_steps) - self.total_steps} steps would train at min_ratio={self.min_ratio} x lr. HINT: drop "
                "`model.init_args.scheduler.init_args.total_steps` (it then follows the run), raise it to "
                f"{int(run_steps)}, or lower trainer.max_epochs / trainer.max_steps")

    def lr_lambda(self, step: int) -> float:
        if step < self.warmup_steps:
            return step / self.warmup_steps
        if self.total_steps is None:
            if step == self.warmup_steps:
                return 1.0
            raise RuntimeError("WarmupCosineLR(total_steps=None) was stepped past its warm-up without a length. "
                               "HINT: pass total_steps=..., or call fit_to_run(steps) (the tasks do it for you)")
        progress = min(1.0, (step - self.warmup_steps) / (self.total_steps - self.warmup_steps))
        return self.min_ratio + (1 - self.min_ratio) * 0.5 * (1 + math.cos(math.pi * progress))
