"""LoRA and DoRA adapters: layers, injection into any model, PEFT-format I/O and merging."""
from lit_lowrank.adapters.config import LoRAConfig
from lit_lowrank.adapters.dora import DoRALinear
from lit_lowrank.adapters.heads import TASK_HEAD_NAMES, task_heads
from lit_lowrank.adapters.inits import LORA_INITS, register_lora_init
from lit_lowrank.adapters.inject import adaptable_layers, inject_lora, lora_modules
from lit_lowrank.adapters.load import is_peft_loadable, load_adapter, read_adapter
from lit_lowrank.adapters.lora import LoRAAdapter, LoRALinear, LoRAMultiheadAttention
from lit_lowrank.adapters.peft_io import (
    adapter_state_dict,
    find_injection_root,
    merge_lora,
    save_adapter,
    unmerge_lora,
)
from lit_lowrank.adapters.peft_meta import peft_task_type

__all__ = [
    "DoRALinear",
    "LORA_INITS",
    "LoRAAdapter",
    "LoRAConfig",
    "LoRALinear",
    "LoRAMultiheadAttention",
    "TASK_HEAD_NAMES",
    "adaptable_layers",
    "adapter_state_dict",
    "find_injection_root",
    "inject_lora",
    "is_peft_loadable",
    "load_adapter",
    "lora_modules",
    "merge_lora",
    "peft_task_type",
    "read_adapter",
    "register_lora_init",
    "save_adapter",
    "task_heads",
    "unmerge_lora",
]
