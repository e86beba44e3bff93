"""One way to turn an optimizer factory into an optimizer for a model, whatever the optimizer.

Tasks take their optimizer by dependency injection (``OptimizerCallable``: YAML names ``torch.optim.AdamW``,
``LoRAPro``, ``LoRAPreAdamW`` or ``LoRAPreMuon``) and never special-case one. The optimizers of this package
declare ``accepts_module = True``: they receive the model itself (LoRA-Pro pairs each adapter's A with its B
through the modules; LoRA-Pre builds its low-rank groups from module types). Any other optimizer receives the
trainable parameters.
"""
from __future__ import annotations

import functools
from collections.abc import Callable

import torch
from torch import nn

from lit_lowrank.optim.schedulers import WarmupCosineLR  # noqa: F401  (build_scheduler's doctest; old import path)


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
    from lit_lowrank.optim.lora_pre.base import LowRankOptimizerBase
    from lit_lowrank.optim.lora_pre.groups import trainable_adapter_names

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
