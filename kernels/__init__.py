"""Triton kernels for the LoRA-Pre and LoRA-Pro optimizer steps (importable as ``lit_lowrank.kernels``)."""
