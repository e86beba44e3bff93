"""Triton kernels for the LoRA-Pre and LoRA-Pro optimizer steps (importable as ``lit_lowrank.kernels``).

- :mod:`~lit_lowrank.kernels.dispatch`: ``use_triton`` semantics ("auto" / True / False) and the torch
  fallback with one warning when Triton is missing or broken. Importing it does not import triton.
- :mod:`~lit_lowrank.kernels.lora_pro_full`: the fused LoRA-Pro full-mode step (moments of ``g~`` and the
  projections of the Adam direction, tile by tile). Imports triton; load it through the dispatcher.
- :mod:`~lit_lowrank.kernels.lora_pre_adam`: the LoRA-Pre Adam step's p x q work in two passes (the factors'
  regression products and the parameter update from the reconstructed moments, then the second moment's
  products); the r x r pseudo-inverses stay in torch. Imports triton; load it through the dispatcher.

Each kernel equals a torch reference in ``lit_lowrank.optim`` to fp32 rounding and is tested against it
on CPU with ``TRITON_INTERPRET=1`` (``tests/kernels``).
"""
