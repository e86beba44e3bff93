"""lit_lowrank: LoRA-Pro adapters and LoRA-Pre optimizers for PyTorch Lightning, configured from YAML."""
from lit_lowrank.adapters import LoRAConfig, inject_lora, load_adapter, merge_lora, save_adapter, unmerge_lora
from lit_lowrank.export import export_merged

__version__ = "0.1.0"
__all__ = ["AtomicCheckpointIO", "LoRAConfig", "export_merged", "inject_lora", "load_adapter", "merge_lora",
           "save_adapter", "unmerge_lora"]


def __getattr__(name: str):
    if name == "AtomicCheckpointIO":  # imports Lightning: only when asked for, `import lit_lowrank` stays light
        from lit_lowrank.checkpoint_io import AtomicCheckpointIO

        return AtomicCheckpointIO
    raise AttributeError(f"module 'lit_lowrank' has no attribute {name!r}")
