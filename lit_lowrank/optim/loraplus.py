"""LoRA+ (Hayou et al., 2024): the ``lora_B`` factors learn ``loraplus_lr_ratio`` times faster than ``lora_A``.

The param groups are PEFT's (``peft.optimizers.create_loraplus_optimizer``, tested against it), for our adapters and
for PEFT models alike:

- ``lr``: the other matrices (``lora_A``, a fully trained head's weight);
- ``loraplus_lr_embedding``: the factors of PEFT's LoRA on embeddings;
- ``lr * loraplus_lr_ratio``: ``lora_B`` and every trainable 1-D tensor (biases, norms, DoRA's magnitude), with
  weight decay except biases and tensors inside a ``LayerNorm``.

From YAML, as any optimizer of a task::

    optimizer:
      class_path: lit_lowrank.optim.loraplus.LoRAPlusAdamW
      init_args: {lr: 2.0e-4, loraplus_lr_ratio: 16}

One difference from PEFT: there ``weight_decay`` passed to ``create_loraplus_optimizer`` is silently replaced in every
group by ``loraplus_weight_decay`` (default 0); here both names set the one decay, and different values are refused.
"""
from __future__ import annotations

import sys
from typing import Any

import torch
from torch import nn

from lit_lowrank.optim.validation import NON_NEGATIVE, POSITIVE, check_number


def loraplus_param_groups(model: nn.Module, lr: float, loraplus_lr_ratio: float, loraplus_lr_embedding: float = 1e-6,
                          weight_decay: float = 0.0) -> list[dict[str, Any]]:
    """The trainable parameters of ``model`` in LoRA+'s groups (PEFT's order, empty groups left out).

    Example:
        >>> from lit_lowrank import LoRAConfig, inject_lora
        >>> net = inject_lora(nn.Sequential(nn.Linear(4, 4), nn.LayerNorm(4)),
        ...                   LoRAConfig(r=2, target_modules=["0"], modules_to_save=["1"]))
        >>> [(len(group["params"]), group["lr"], group["weight_decay"])
        ...  for group in loraplus_param_groups(net, lr=1e-3, loraplus_lr_ratio=16, weight_decay=0.1)]
        [(1, 0.001, 0.1), (1, 0.016, 0.1), (2, 0.016, 0.0)]
    """
    owner = "LoRA+"
    check_number(owner, "lr", lr, NON_NEGATIVE, example=1e-4)
    check_number(owner, "loraplus_lr_ratio", loraplus_lr_ratio, POSITIVE, example=16.0)
    check_number(owner, "loraplus_lr_embedding", loraplus_lr_embedding, NON_NEGATIVE, example=1e-6)
    check_number(owner, "weight_decay", weight_decay, NON_NEGATIVE, example=0.0)
    if not isinstance(model, nn.Module):
        raise TypeError(f"LoRA+ needs the model, got {type(model).__name__}: the groups are chosen by parameter and "
                        "module names. HINT: pass the model itself, not model.parameters().")
    no_decay = _no_decay_names(model)
    embedding_layer = getattr(sys.modules.get("peft.tuners.lora.layer"), "Embedding", None)  # only if peft is in use
    groups: dict[str, list[nn.Parameter]] = {"A": [], "embedding": [], "B": [], "B_no_decay": []}
    for name, param in model.named_parameters():
        if not param.requires_grad:
            continue
        # PEFT's rule: the tuner layer holding a parameter is two names up (".lora_embedding_A.default")
        layer_name = ".".join(name.split(".")[:-2])
        layer = model.get_submodule(layer_name) if layer_name else None
        if embedding_layer is not None and isinstance(layer, embedding_layer):
            groups["embedding"].append(param)
        elif "lora_B" in name or param.ndim == 1:
            groups["B_no_decay" if name in no_decay else "B"].append(param)
        else:
            groups["A"].append(param)
    if not any("lora_B" in name for name, param in model.named_parameters() if param.requires_grad):
        raise ValueError(f"LoRA+ found no trainable lora_B in {type(model).__name__}: it sets the learning rate of "
                         "the adapters' B factors. HINT: inject adapters first (inject_lora or peft.get_peft_model), "
                         "or use a plain optimizer.")
    settings = {"A": (lr, weight_decay), "embedding": (loraplus_lr_embedding, weight_decay),
                "B": (lr * loraplus_lr_ratio, weight_decay), "B_no_decay": (lr * loraplus_lr_ratio, 0.0)}
    return [{"params": params, "lr": settings[key][0], "weight_decay": settings[key][1]}
            for key, params in groups.items() if params]


def _no_decay_names(model: nn.Module) -> set[str]:
    """Parameters PEFT (transformers' ``get_parameter_names``) keeps from weight decay: biases (any name holding
    "bias") and everything inside a ``LayerNorm``."""
    norms = [name for name, module in model.named_modules() if name and isinstance(module, nn.LayerNorm)]
    return {name for name, _ in model.named_parameters()
            if "bias" in name or any(name.startswith(norm + ".") for norm in norms)}


def create_loraplus_optimizer(model: nn.Module, optimizer_cls: type[torch.optim.Optimizer], *, lr: float,
                              loraplus_lr_ratio: float, **kwargs: Any) -> torch.optim.Optimizer:
    """PEFT's ``create_loraplus_optimizer`` for any model with adapters (ours or PEFT's) and any optimizer class.

    ``kwargs`` go to ``optimizer_cls``, except ``loraplus_lr_embedding`` (default 1e-6) and ``weight_decay`` /
    ``loraplus_weight_decay`` (one setting, default 0), which shape the groups.

    Example:
        >>> from lit_lowrank import LoRAConfig, inject_lora
        >>> net = inject_lora(nn.Sequential(nn.Linear(4, 4)), LoRAConfig(r=2, target_modules=["0"]))
        >>> opt = create_loraplus_optimizer(net, torch.optim.SGD, lr=0.1, loraplus_lr_ratio=4, momentum=0.9)
        >>> [group["lr"] for group in opt.param_groups], opt.param_groups[1]["momentum"]
        ([0.1, 0.4], 0.9)
    """
    decay = kwargs.pop("weight_decay", None)
    peft_decay = kwargs.pop("loraplus_weight_decay", None)
    if decay is not None and peft_decay is not None and decay != peft_decay:
        raise ValueError(f"create_loraplus_optimizer got weight_decay={decay!r} and loraplus_weight_decay="
                         f"{peft_decay!r}, two names of one setting here. HINT: give only one of them.")
    weight_decay = decay if decay is not None else (peft_decay if peft_decay is not None else 0.0)
    groups = loraplus_param_groups(model, lr, loraplus_lr_ratio, kwargs.pop("loraplus_lr_embedding", 1e-6),
                                   weight_decay)
    return optimizer_cls(groups, lr=lr, **kwargs)


class LoRAPlusAdamW(torch.optim.AdamW):
    """AdamW with LoRA+'s param groups (:func:`loraplus_param_groups`): a plain ``torch.optim.AdamW`` once built.

    It takes the model (``accepts_module``), so a task's ``optimizer`` in YAML can name it like any other optimizer.

    Example:
        >>> from lit_lowrank import LoRAConfig, inject_lora
        >>> net = inject_lora(nn.Sequential(nn.Linear(4, 4)), LoRAConfig(r=2, target_modules=["0"]))
        >>> opt = LoRAPlusAdamW(net, lr=1e-3, loraplus_lr_ratio=16)
        >>> [(group["lr"], group["params"][0].shape) for group in opt.param_groups]
        [(0.001, torch.Size([2, 4])), (0.016, torch.Size([4, 2]))]
    """

    accepts_module = True  # build_optimizer hands it the model: the groups need the parameters' names

    def __init__(self, model: nn.Module, lr: float = 1e-3, loraplus_lr_ratio: float = 16.0,
                 loraplus_lr_embedding: float = 1e-6, betas: tuple[float, float] = (0.9, 0.999), eps: float = 1e-8,
                 weight_decay: float = 0.0, amsgrad: bool = False, foreach: bool | None = None,
                 fused: bool | None = None) -> None:
        groups = loraplus_param_groups(model, lr, loraplus_lr_ratio, loraplus_lr_embedding, weight_decay)
        super().__init__(groups, lr=lr, betas=betas, eps=eps, weight_decay=weight_decay, amsgrad=amsgrad,
                         foreach=foreach, fused=fused)
