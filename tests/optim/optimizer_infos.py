"""``OptimizerInfo`` entries for the optimizers of this package, the way torch describes its own
(``torch.testing._internal.common_optimizers``): per optimizer, the constructor inputs a generic check runs over,
the inputs that must fail and how, and the LR schedulers to run with it. ``test_optimizer_contract.py`` drives its
checks from ``OPTIMIZER_INFOS``.

torch's entries build optimizers from a list of tensors. Ours need a model: LoRAPro finds its adapters in one (a
tiny ``nn.Sequential`` with ``inject_lora``), and the LoRA-Pre optimizers take a module or its tensors. So every
entry also says how to make its model, and an input's ``params`` is ``None`` (the default: the module for LoRAPro,
``model.parameters()`` otherwise) or a function of the model.
"""
from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import nn
from torch.optim.lr_scheduler import ReduceLROnPlateau, StepLR
from torch.testing._internal.common_optimizers import (
    ErrorOptimizerInput,
    OptimizerErrorEnum,
    OptimizerInfo,
    OptimizerInput,
)

from lit_lowrank import LoRAConfig, inject_lora
from lit_lowrank.optim import LoRAPreAdamW, LoRAPreMuon, LoRAPro, WarmupCosineLR

STEP_ERROR = OptimizerErrorEnum.STEP_ERROR
#: torch's own wording for a wrong ``params`` (``Optimizer.__init__``), which ours keep.
NOT_AN_ITERABLE = "params argument given to the optimizer should be an iterable of Tensors or dicts"


class ModelOptimizerInfo(OptimizerInfo):
    """An ``OptimizerInfo`` whose optimizer is built for a tiny model (``make_model(dtype)``).

    ``variant`` names a setting of the optimizer that no constructor argument reaches (the device-side skip), made
    by ``setup(optimizer)`` after construction.
    """

    def __init__(self, optim_cls: type, *, make_model: Callable[[torch.dtype], nn.Module], variant: str = "",
                 setup: Callable[[torch.optim.Optimizer], None] | None = None, **kwargs: Any) -> None:
        super().__init__(optim_cls, supports_complex=False, supports_sparse=False, supported_impls=(), **kwargs)
        self.make_model, self.variant, self.setup = make_model, variant, setup

    @property
    def name(self) -> str:
        return f"{self.optim_cls.__name__}{'-' + self.variant if self.variant else ''}"

    def inputs(self) -> list[OptimizerInput]:
        return self.optim_inputs_func(torch.device("cpu"), torch.float32)

    def build(self, optim_input: OptimizerInput, model: nn.Module, **overrides: Any) -> torch.optim.Optimizer:
        """The optimizer of ``optim_input`` for ``model`` (``overrides`` replace its keyword arguments)."""
        kwargs = {**optim_input.kwargs, **overrides}
        # An own tensor lr per optimizer: schedulers fill it in place.
        kwargs = {key: value.clone() if isinstance(value, torch.Tensor) else value for key, value in kwargs.items()}
        optimizer = self.optim_cls(self.params_of(optim_input, model), **kwargs)
        if self.setup is not None:
            self.setup(optimizer)
        return optimizer

    def params_of(self, optim_input: OptimizerInput, model: nn.Module) -> Any:
        if optim_input.params is not None:
            return optim_input.params(model)
        return model if self.optim_cls is LoRAPro else model.parameters()


# ----------------------------------------------------------------------------------------------------- models
def lora_pre_model(dtype: torch.dtype = torch.float32) -> nn.Module:
    """Two matrices (6 x 8, 3 x 6: rank 2 fits both) and five vectors (biases, LayerNorm) for AdamW."""
    return nn.Sequential(nn.Linear(8, 6), nn.LayerNorm(6), nn.Linear(6, 3)).to(dtype)


def lora_pro_model(dtype: torch.dtype = torch.float32) -> nn.Module:
    """Two adapters of different shapes (two batches) and a trainable head that LoRAPro steps with AdamW."""
    model = nn.Sequential(nn.Linear(8, 6), nn.Tanh(), nn.Linear(6, 5), nn.Tanh(), nn.Linear(5, 3))
    model = inject_lora(model, LoRAConfig(r=2, target_modules=["0", "2"]))
    model[4].requires_grad_(True)
    with torch.no_grad():  # LoRA starts with B = 0; a non-zero B makes full mode's projections non-trivial
        for index in (0, 2):
            model[index].lora_B.normal_(std=0.1)
    return model.to(dtype)


# ----------------------------------------------------------------------------------------------------- inputs
def matrices_then_vectors(model: nn.Module) -> list[dict[str, Any]]:
    """Two param groups: the matrices with their own lr, the other tensors with the constructor's."""
    matrices = [p for p in model.parameters() if p.ndim == 2]
    vectors = [p for p in model.parameters() if p.ndim != 2]
    return [{"params": matrices, "lr": 3e-3}, {"params": vectors}]


def lora_pre_adamw_inputs(device: torch.device, dtype: torch.dtype | None = None) -> list[OptimizerInput]:
    return [
        OptimizerInput(params=None, kwargs={"lr": 1e-2, "rank": 2}, desc="default"),
        OptimizerInput(params=None, kwargs={"lr": 1e-2, "rank": 2, "weight_decay": 0.1, "maximize": True},
                       desc="weight decay, maximize"),
        OptimizerInput(params=None, kwargs={"lr": 1e-2, "rank": 3, "full_rank": "dense", "factor_update": "jacobi"},
                       desc="a 3 x 6 matrix with a dense state, jacobi"),
        OptimizerInput(params=matrices_then_vectors, kwargs={"lr": 1e-2, "rank": 2}, desc="two param groups"),
        OptimizerInput(params=lambda model: model, kwargs={"lr": 1e-2, "rank": 2}, desc="the module"),
    ]


def lora_pre_muon_inputs(device: torch.device, dtype: torch.dtype | None = None) -> list[OptimizerInput]:
    return [
        OptimizerInput(params=None, kwargs={"lr": 2e-2, "rank": 2}, desc="default"),
        OptimizerInput(params=None, kwargs={"lr": 2e-2, "rank": 2, "nesterov": False, "weight_decay": 0.1,
                                            "adamw_weight_decay": 0.1, "maximize": True},
                       desc="no nesterov, weight decay, maximize"),
        OptimizerInput(params=None, kwargs={"lr": 2e-2, "rank": 3, "full_rank": "dense", "scale_rule": "adamw_rms"},
                       desc="a 3 x 6 matrix with a dense momentum, adamw_rms"),
        OptimizerInput(params=lambda model: model, kwargs={"lr": 2e-2, "rank": 2, "adamw_lr": 5e-3},
                       desc="the module"),
    ]


def lora_pro_inputs(device: torch.device, dtype: torch.dtype | None = None) -> list[OptimizerInput]:
    return [
        OptimizerInput(params=None, kwargs={"lr": 1e-2, "mode": "efficient"}, desc="efficient"),
        OptimizerInput(params=None, kwargs={"lr": 1e-2, "mode": "full"}, desc="full"),
        OptimizerInput(params=None, kwargs={"lr": 1e-2, "mode": "efficient", "weight_decay": 0.1,
                                            "max_grad_norm": 0.5, "maximize": True},
                       desc="efficient, weight decay, clipping, maximize"),
        OptimizerInput(params=None, kwargs={"lr": torch.tensor(1e-2), "mode": "full", "weight_decay": 0.1,
                                            "maximize": True},
                       desc="full, tensor lr, weight decay, maximize"),
    ]


# ----------------------------------------------------------------------------------------------------- errors
def lora_pre_error_inputs(device: torch.device, dtype: torch.dtype | None = None) -> list[ErrorOptimizerInput]:
    def error(params, kwargs, desc, error_type, regex, error_on=OptimizerErrorEnum.CONSTRUCTION_ERROR):
        return ErrorOptimizerInput(OptimizerInput(params=params, kwargs={"rank": 2, **kwargs}, desc=desc),
                                   error_on=error_on, error_type=error_type, error_regex=regex)

    return [
        error(lambda model: None, {}, "params=None", TypeError, NOT_AN_ITERABLE),
        error(lambda model: model[0].weight, {}, "one tensor", TypeError, NOT_AN_ITERABLE),
        error(lambda model: [{"params": {model[0].weight}}], {}, "a set", TypeError,
              "organized in ordered collections"),
        error(lambda model: [{"params": [model[0].weight]}, {"params": [model[0].weight]}], {},
              "one tensor in two groups", ValueError, "a tensor listed twice would be stepped twice"),
        error(lambda model: [("weight", model[0].weight), model[2].weight], {}, "names for some tensors",
              ValueError, "all optimizer params should be with/without names"),
        error(None, {"lr": torch.tensor(1e-3)}, "tensor lr", ValueError, "lr as a Tensor is not supported"),
        error(None, {"maximize": "yes"}, "maximize not a bool", TypeError,
              "invalid maximize 'yes'; expected True or False"),
        error(None, {}, "sparse gradient",
              RuntimeError, "does not support sparse gradients.*HINT", error_on=STEP_ERROR),
    ]


def lora_pro_error_inputs(device: torch.device, dtype: torch.dtype | None = None) -> list[ErrorOptimizerInput]:
    def error(params, kwargs, desc, error_type, regex, error_on=OptimizerErrorEnum.CONSTRUCTION_ERROR):
        return ErrorOptimizerInput(OptimizerInput(params=params, kwargs=kwargs, desc=desc), error_on=error_on,
                                   error_type=error_type, error_regex=regex)

    return [
        error(lambda model: None, {}, "model=None", TypeError, "LoRAPro takes the model.*HINT"),
        error(lambda model: model.parameters(), {}, "parameters, not the model", TypeError,
              r"LoRAPro takes the model.*HINT: LoRAPro\(model, lr=...\)"),
        error(lambda model: nn.Linear(3, 3), {}, "no adapters", ValueError, "has no trainable LoRA adapters.*HINT"),
        error(None, {"lr": torch.tensor([1e-3, 1e-3])}, "two-element tensor lr", ValueError,
              "Tensor lr must be 1-element"),
        error(None, {"maximize": 1}, "maximize not a bool", TypeError, "invalid maximize 1; expected True or False"),
        error(None, {}, "sparse gradient", RuntimeError, "does not support sparse gradients.*HINT",
              error_on=STEP_ERROR),
    ]


# ------------------------------------------------------------------------------------------------- schedulers
#: Each returns the scheduler and how to step it (ReduceLROnPlateau wants the metric).
SCHEDULERS = (
    lambda opt: StepLR(opt, step_size=1, gamma=0.5),
    lambda opt: ReduceLROnPlateau(opt, factor=0.5, patience=0),
    lambda opt: WarmupCosineLR(opt, warmup_steps=1, total_steps=4, min_ratio=0.1),
)


def device_side_skip(optimizer: torch.optim.Optimizer) -> None:
    optimizer._device_side_skip = True  # the accelerator path, run on CPU tensors


OPTIMIZER_INFOS = [
    ModelOptimizerInfo(LoRAPreAdamW, make_model=lora_pre_model, optim_inputs_func=lora_pre_adamw_inputs,
                       optim_error_inputs_func=lora_pre_error_inputs, scheduler_inputs=(SCHEDULERS,)),
    ModelOptimizerInfo(LoRAPreAdamW, make_model=lora_pre_model, optim_inputs_func=lora_pre_adamw_inputs,
                       optim_error_inputs_func=lora_pre_error_inputs, scheduler_inputs=(SCHEDULERS,),
                       variant="device_skip", setup=device_side_skip),
    ModelOptimizerInfo(LoRAPreMuon, make_model=lora_pre_model, optim_inputs_func=lora_pre_muon_inputs,
                       optim_error_inputs_func=lora_pre_error_inputs, scheduler_inputs=(SCHEDULERS,)),
    ModelOptimizerInfo(LoRAPreMuon, make_model=lora_pre_model, optim_inputs_func=lora_pre_muon_inputs,
                       optim_error_inputs_func=lora_pre_error_inputs, scheduler_inputs=(SCHEDULERS,),
                       variant="device_skip", setup=device_side_skip),
    ModelOptimizerInfo(LoRAPro, make_model=lora_pro_model, optim_inputs_func=lora_pro_inputs,
                       optim_error_inputs_func=lora_pro_error_inputs, scheduler_inputs=(SCHEDULERS,)),
]
