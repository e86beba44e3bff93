"""LoRA adapters: layers, injection into any model, PEFT-format I/O and merging."""
from lit_lowrank.adapters.inits import LORA_INITS, register_lora_init
from lit_lowrank.adapters.inject import LoRAConfig, adaptable_layers, inject_lora, lora_modules
from lit_lowrank.adapters.lora import LoRAAdapter, LoRALinear, LoRAMultiheadAttention
from lit_lowrank.adapters.peft_io import (
    adapter_state_dict,
    find_injection_root,
    load_adapter,
    merge_lora,
    save_adapter,
    unmerge_lora,
)

__all__ = [
    "LORA_INITS",
    "LoRAAdapter",
    "LoRAConfig",
    "LoRALinear",
    "LoRAMultiheadAttention",
    "adaptable_layers",
    "adapter_state_dict",
    "find_injection_root",
    "inject_lora",
    "load_adapter",
    "lora_modules",
    "merge_lora",
    "register_lora_init",
    "save_adapter",
    "unmerge_lora",
]
