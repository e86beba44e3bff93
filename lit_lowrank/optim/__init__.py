"""Optimizers: LoRA-Pro (closed-form adapter gradients) and LoRA-Pre (low-rank factored momenta).

They are plain ``torch.optim.Optimizer`` subclasses and know nothing about Lightning. Layout: ``lora_pro/`` and
``lora_pre/`` (each optimizer beside its functional step), and what they share once: ``adamw.py``, ``state.py``
(with the gradient limit beyond which a step is skipped), ``validation.py`` (hyper-parameter and param-group checks),
``sharding.py``, ``schedulers.py``, ``factory.py``.
"""
from lit_lowrank.optim.factory import build_optimizer
from lit_lowrank.optim.lora_pre import LoRAPreAdamW, LoRAPreMuon, lowrank_param_groups, param_group_names
from lit_lowrank.optim.lora_pro import LoRAPro, apply_lora_pro_, equivalent_gradient, lora_pro_gradients
from lit_lowrank.optim.schedulers import WarmupCosineLR
from lit_lowrank.optim.state import StateBytes

__all__ = [
    "LoRAPreAdamW",
    "LoRAPreMuon",
    "LoRAPro",
    "StateBytes",
    "WarmupCosineLR",
    "apply_lora_pro_",
    "build_optimizer",
    "equivalent_gradient",
    "lora_pro_gradients",
    "lowrank_param_groups",
    "param_group_names",
]
