"""LoRA-Pro's efficient mode as a gradient rewrite, :func:`apply_lora_pro_`, for any optimizer to follow (the
:class:`~lit_lowrank.optim.LoRAPro` optimizer computes the same directions itself)."""
from __future__ import annotations

import torch
from torch import nn

from lit_lowrank.optim.lora_pro.closed_form import closed_form, gram_spectrum
from lit_lowrank.optim.lora_pro.pairs import adapter_pairs, batches, read_factors, write_rows

__all__ = ["apply_lora_pro_"]


@torch.no_grad()
def apply_lora_pro_(model: nn.Module, damping: float = 1e-8) -> int:
    """Replace the gradients of every adapter pair by LoRA-Pro's ``(dA, dB)``, in place.

    This is LoRA-Pro's efficient mode as a gradient rewrite, so any optimizer (SGD, AdamW, 8-bit ones)
    can follow it. Call it after ``backward`` (and after ``GradScaler.unscale_``) and **before** gradient
    clipping, so clipping sees the gradients the optimizer will use. Do not combine it with
    :class:`LoRAPro`, which rewrites the gradients itself. Layers with a non-finite gradient get NaN in
    both ``dA`` and ``dB``, so a scaler or skip logic still sees them; nothing raises.

    Returns:
        The number of adapter pairs rewritten (pairs without gradients are left alone).

    Example:
        >>> import torch, torch.nn as nn
        >>> from lit_lowrank import LoRAConfig, inject_lora
        >>> net = inject_lora(nn.Sequential(nn.Linear(8, 8), nn.ReLU(), nn.Linear(8, 2)), LoRAConfig(r=2))
        >>> net(torch.randn(4, 8)).square().sum().backward()
        >>> apply_lora_pro_(net)
        2
        >>> norm = torch.nn.utils.clip_grad_norm_(net.parameters(), max_norm=1.0)  # clip after the rewrite
    """
    rewritten = 0
    pairs = [pair for pair in adapter_pairs(model) if pair.A.grad is not None or pair.B.grad is not None]
    for batch in batches(pairs):
        stack = read_factors(batch)
        A, B_t, grad_A, grad_B_t = stack.in_compute_dtype()
        dA, dB_t = closed_form(gram_spectrum(A, B_t, damping), A, B_t, grad_A, grad_B_t, batch[0].scaling)
        skipped = ~stack.ok.view(-1, 1, 1)
        dA.masked_fill_(skipped, float("nan"))
        dB_t.masked_fill_(skipped, float("nan"))
        for pair in batch:
            for param in (pair.A, pair.B):
                if param.grad is None:
                    param.grad = torch.zeros_like(param)
        write_rows([pair.A.grad for pair in batch], dA)
        write_rows([pair.B.grad for pair in batch], dB_t.mT)
        rewritten += len(batch)
    return rewritten
