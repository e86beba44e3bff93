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
from typing import Callable, Optional

import torch
from torch import nn
from torch.optim.lr_scheduler import LambdaLR


def optimizer_class(factory: Callable) -> Optional[type]:
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
    cls = optimizer_class(factory)
    if cls is not None and getattr(cls, "accepts_module", False):
        return factory(model)
    params = [p for p in model.parameters() if p.requires_grad]
    if not params:
        raise ValueError(f"{type(model).__name__} has no trainable parameters: nothing to optimize. "
                         "HINT: check LoRAConfig targets or that the model was not frozen by mistake.")
    return factory(params)


class WarmupCosineLR(LambdaLR):
    """Linear warm-up to the base learning rate, then cosine decay to ``min_ratio`` of it.

    Args:
        optimizer: the optimizer whose learning rates are scheduled.
        warmup_steps: steps of linear warm-up from 0.
        total_steps: steps at which the cosine reaches ``min_ratio``; held there afterwards.
        min_ratio: final learning rate as a fraction of the base one.

    Example:
        >>> opt = torch.optim.SGD([nn.Parameter(torch.zeros(1))], lr=1.0)
        >>> sched = WarmupCosineLR(opt, warmup_steps=2, total_steps=10, min_ratio=0.1)
        >>> [round(sched.lr_lambda(s), 3) for s in (0, 1, 2, 6, 10, 20)]
        [0.0, 0.5, 1.0, 0.55, 0.1, 0.1]
    """

    def __init__(self, optimizer: torch.optim.Optimizer, warmup_steps: int = 0, total_steps: int = 1000, min_ratio: float = 0.0):
        if total_steps <= warmup_steps:
            raise ValueError(f"total_steps ({total_steps}) must exceed warmup_steps ({warmup_steps})")
        self.warmup_steps, self.total_steps, self.min_ratio = warmup_steps, total_steps, min_ratio
        super().__init__(optimizer, self.lr_lambda)

    def lr_lambda(self, step: int) -> float:
        if step < self.warmup_steps:
            return step / self.warmup_steps
        progress = min(1.0, (step - self.warmup_steps) / (self.total_steps - self.warmup_steps))
        return self.min_ratio + (1 - self.min_ratio) * 0.5 * (1 + math.cos(math.pi * progress))
