"""lit_lowrank: LoRA-Pro adapters and LoRA-Pre optimizers for PyTorch Lightning, configured from YAML."""
from lit_lowrank.adapters import LoRAConfig, inject_lora, load_adapter, merge_lora, save_adapter, unmerge_lora

__version__ = "0.1.0"
__all__ = ["LoRAConfig", "inject_lora", "load_adapter", "merge_lora", "save_adapter", "unmerge_lora"]
