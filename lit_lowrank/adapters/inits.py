"""Initialisations of a LoRA pair, by name (``LoRAConfig.init``).

An init is a function ``fn(adapter) -> None`` that fills ``adapter.lora_A`` and ``adapter.lora_B`` in place.
Weight- or data-driven inits (PiSSA-, LoRA-GA-style) register the same way; one that needs data can be
applied after ``inject_lora`` by calling ``adapter.reset_lora_parameters(name)`` once its inputs are ready.

Example:
    >>> import torch
    >>> from lit_lowrank.adapters.lora import LoRAAdapter
    >>> @register_lora_init("small_gaussian")
    ... def small_gaussian(adapter):
    ...     torch.nn.init.normal_(adapter.lora_A, std=1e-3)
    ...     torch.nn.init.zeros_(adapter.lora_B)
    >>> pair = LoRAAdapter(8, 8, r=2, alpha=2.0)
    >>> pair.reset_lora_parameters("small_gaussian")
    >>> float(pair.lora_A.detach().std()) < 0.01
    True
"""
from __future__ import annotations

import math
from collections.abc import Callable

import torch
from torch import nn

LORA_INITS: dict[str, Callable[[nn.Module], None]] = {}


def register_lora_init(name: str) -> Callable[[Callable[[nn.Module], None]], Callable[[nn.Module], None]]:
    """Decorator that makes ``fn(adapter)`` available as ``LoRAConfig(init=name)``."""

    def decorate(fn: Callable[[nn.Module], None]) -> Callable[[nn.Module], None]:
        LORA_INITS[name] = fn
        return fn

    return decorate


@register_lora_init("default")
@torch.no_grad()
def kaiming_uniform_a_zero_b(adapter: nn.Module) -> None:
    """PEFT's default: A ~ Kaiming-uniform (a = sqrt(5), as nn.Linear), B = 0, so training starts at W0."""
    nn.init.kaiming_uniform_(adapter.lora_A, a=math.sqrt(5))
    nn.init.zeros_(adapter.lora_B)


@register_lora_init("gaussian")
@torch.no_grad()
def gaussian_a_zero_b(adapter: nn.Module) -> None:
    """PEFT's ``init_lora_weights="gaussian"``: A ~ N(0, (1/r)^2), B = 0."""
    nn.init.normal_(adapter.lora_A, std=1.0 / adapter.r)
    nn.init.zeros_(adapter.lora_B)


@register_lora_init("random")
@torch.no_grad()
def kaiming_uniform_a_and_b(adapter: nn.Module) -> None:
    """PEFT's ``init_lora_weights=False``: A and B both as ``nn.Linear`` initialises its weight, so the adapter
    changes the output from the start (for tests and debugging)."""
    nn.init.kaiming_uniform_(adapter.lora_A, a=math.sqrt(5))
    nn.init.kaiming_uniform_(adapter.lora_B, a=math.sqrt(5))
