"""Gradient (activation) checkpointing for every backbone kind, always non-reentrant.

Non-reentrant checkpointing matters with LoRA: the reentrant form only back-propagates into a checkpointed block
when one of its *inputs* requires grad, which the frozen embeddings' output does not, so the adapters inside would
silently get no gradient.
"""
from __future__ import annotations

from torch import nn


def enable_gradient_checkpointing(model: nn.Module) -> nn.Module:
    """Recompute each block's activations in backward instead of storing them (training mode only).

    transformers models: ``activation_checkpointing_enable`` (``gradient_checkpointing_enable`` before transformers
    5.x) with ``use_reentrant=False``; timm and open_clip models: ``set_grad_checkpointing()`` (both non-reentrant).
    Anything else raises a ``ValueError`` that says so.

    Example:
        >>> from transformers import BertConfig, BertModel
        >>> bert = enable_gradient_checkpointing(BertModel(BertConfig(hidden_size=16, intermediate_size=32,
        ...     num_hidden_layers=1, num_attention_heads=2, vocab_size=50)))
        >>> bert.encoder.layer[0].gradient_checkpointing
        True
    """
    kwargs = {"use_reentrant": False}
    if hasattr(model, "activation_checkpointing_enable"):
        _check_transformers_support(model)
        model.activation_checkpointing_enable(activation_checkpointing_kwargs=kwargs)
    elif hasattr(model, "gradient_checkpointing_enable"):
        _check_transformers_support(model)
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)
    elif hasattr(model, "set_grad_checkpointing"):
        _check_timm_not_reentrant(model)
        model.set_grad_checkpointing(True)
    else:
        raise ValueError(
            f"{type(model).__name__} has no gradient checkpointing support (no activation_checkpointing_enable / "
            "gradient_checkpointing_enable of transformers, no set_grad_checkpointing of timm / open_clip). "
            "HINT: set gradient_checkpointing: false, or wrap its blocks with torch.utils.checkpoint yourself.")
    return model


def _check_transformers_support(model: nn.Module) -> None:
    if not getattr(model, "supports_gradient_checkpointing", True):
        raise ValueError(f"{type(model).__name__} does not support gradient checkpointing in transformers. "
                         "HINT: set gradient_checkpointing: false.")


def _check_timm_not_reentrant(model: nn.Module) -> None:
    if not type(model).__module__.startswith("timm."):
        return  # open_clip passes use_reentrant=False itself
    from timm.layers import use_reentrant_ckpt

    if use_reentrant_ckpt():
        raise ValueError("timm is set to reentrant checkpointing (TIMM_REENTRANT_CKPT or timm.layers."
                         "set_reentrant_ckpt(True)), under which LoRA adapters get no gradient. HINT: unset "
                         "TIMM_REENTRANT_CKPT, or call timm.layers.set_reentrant_ckpt(False).")
