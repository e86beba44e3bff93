"""lit_lowrank: LoRA-Pro adapters and LoRA-Pre optimizers for PyTorch Lightning, configured from YAML."""
from lit_lowrank.adapters import LoRAConfig, inject_lora, load_adapter, merge_lora, save_adapter, unmerge_lora
from lit_lowrank.export import export_merged

__version__ = "0.1.0"
__all__ = ["LoRAConfig", "export_merged", "inject_lora", "load_adapter", "merge_lora", "save_adapter", "unmerge_lora"]
