"""lit_lowrank: LoRA-Pro adapters and LoRA-Pre optimizers for PyTorch Lightning."""
__version__ = "0.1.0"
