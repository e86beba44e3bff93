"""Optimizers: LoRA-Pro (closed-form adapter gradients) and LoRA-Pre (low-rank factored momenta).

They are plain ``torch.optim.Optimizer`` subclasses and know nothing about Lightning.
"""
from lit_lowrank.optim.lora_pro import LoRAPro, apply_lora_pro_, equivalent_gradient, lora_pro_gradients
from lit_lowrank.optim.lora_pre import LoRAPreAdamW, LoRAPreMuon, StateBytes, lowrank_param_groups, param_group_names
from lit_lowrank.optim.factory import WarmupCosineLR, build_optimizer
