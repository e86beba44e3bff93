"""One way to turn an optimizer factory into an optimizer for a model, whatever the optimizer.

Tasks take their optimizer by dependency injection (``OptimizerCallable``: YAML names ``torch.optim.AdamW``,
``LoRAPro``, ``LoRAPreAdamW`` or ``LoRAPreMuon``) and never special-case one. The optimizers of this package
declare ``accepts_module = True``: they receive the model itself (LoRA-Pro pairs each adapter's A with its B
through the modules; LoRA-Pre builds its low-rank groups from module types). Any other optimizer receives the
trainable parameters.
"""
from __future__ import annotations

import functools
import math
import warnings
from collections.abc import Callable

import torch
from torch import nn
from torch.optim.lr_scheduler import LambdaLR


def optimizer_class(factory: Callable) -> type | None:
    """The optimizer class behind a factory: the class itself, a ``functools.partial`` of it, or the partial
    jsonargparse builds for ``OptimizerCallable`` (which carries the class among its arguments)."""
    while True:
        if isinstance(factory, type):
            return factory
        if not isinstance(factory, functools.partial):
            return None
        classes = [arg for arg in factory.args if isinstance(arg, type)]
        if classes:
            return classes[-1]
        factory = factory.func


def build_optimizer(factory: Callable, model: nn.Module) -> torch.optim.Optimizer:
    """Call ``factory`` with what it consumes: the model for module-aware optimizers, else its trainable parameters.

    Example:
        >>> import functools
        >>> net = nn.Linear(4, 2)
        >>> net.bias.requires_grad_(False)
        Parameter containing:...
        >>> opt = build_optimizer(functools.partial(torch.optim.SGD, lr=0.1), net)
        >>> [p.shape for p in opt.param_groups[0]["params"]]
        [torch.Size([2, 4])]
    """
    check_optimizer_fits_model(factory, model)
    cls = optimizer_class(factory)
    if cls is not None and getattr(cls, "accepts_module", False):
        return factory(model)
    params = [p for p in model.parameters() if p.requires_grad]
    if not params:
        raise ValueError(f"{type(model).__name__} has no trainable parameters: nothing to optimize. "
                         "HINT: check LoRAConfig targets or that the model was not frozen by mistake.")
    return factory(params)


def check_optimizer_fits_model(factory: Callable, model: nn.Module) -> None:
    """Refuse a LoRA-Pre optimizer on a model with trainable LoRA adapters, naming the YAML keys to change.

    LoRA-Pre compresses the momenta of full weight matrices; with adapters injected none is trainable, so it
    would quietly run as plain AdamW on the adapters.

    Example:
        >>> from lit_lowrank import LoRAConfig, inject_lora
        >>> from lit_lowrank.optim import LoRAPreAdamW
        >>> net = inject_lora(nn.Sequential(nn.Linear(4, 4)), LoRAConfig(r=2, target_modules=["0"]))
        >>> check_optimizer_fits_model(LoRAPreAdamW, net)
        Traceback (most recent call last):
        ...
        ValueError: LoRAPreAdamW with LoRA adapters ...
    """
    from lit_lowrank.optim.groups import trainable_adapter_names
    from lit_lowrank.optim.lora_pre_base import LowRankOptimizerBase

    cls = optimizer_class(factory)
    if cls is None or not issubclass(cls, LowRankOptimizerBase):
        return
    if trainable_adapter_names(model):
        raise ValueError(
            f"{cls.__name__} with LoRA adapters would train the adapters with plain AdamW: LoRA-Pre factors the "
            "momenta of full weight matrices, and an adapted model has none trainable. HINT: for LoRA-Pre "
            "full-parameter fine-tuning set `model.init_args.lora: null`; to train adapters set "
            "`model.init_args.optimizer.class_path` to lit_lowrank.optim.LoRAPro or torch.optim.AdamW.")


def build_scheduler(factory: Callable, optimizer: torch.optim.Optimizer, run_steps: float | None = None):
    """Call the scheduler ``factory``; schedulers with a ``fit_to_run(run_steps)`` method (``WarmupCosineLR``) are
    then tied to the run's optimizer steps (``trainer.estimated_stepping_batches``) when ``run_steps`` is known.

    Example:
        >>> opt = torch.optim.SGD([nn.Parameter(torch.zeros(1))], lr=1.0)
        >>> build_scheduler(WarmupCosineLR, opt, run_steps=50).total_steps
        50
    """
    scheduler = factory(optimizer)
    fit_to_run = getattr(scheduler, "fit_to_run", None)
    if run_steps is not None and callable(fit_to_run):
        fit_to_run(run_steps)
    return scheduler


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
