"""timm image backbones (``timm.create_model`` name + kwargs)."""
from __future__ import annotations

from typing import Any, Optional

import timm
from torch import nn

from lit_lowrank.backbones.base import Backbone, unreachable

VIT_TARGETS = ["qkv", "proj", "fc1", "fc2"]


def default_targets(model: nn.Module):
    """ViT-style blocks (``blocks.N.attn.qkv``) get qkv/proj/fc1/fc2; anything else "all-linear"."""
    names = {name.rsplit(".", 1)[-1] for name, _ in model.named_modules()}
    return VIT_TARGETS if {"qkv", "fc1"} <= names else "all-linear"


def timm_backbone(name: str, pretrained: bool = False, checkpoint_path: Optional[str] = None, **kwargs: Any) -> Backbone:
    """A timm model, its data config and default LoRA targets.

    Args:
        name: timm model name, e.g. ``vit_tiny_patch16_224``.
        pretrained: fetch timm's pretrained weights (needs the hub, or a cache).
        checkpoint_path: load weights from a local file instead.
        **kwargs: passed to ``timm.create_model`` (``num_classes``, ``img_size``, ``embed_dim``, ``depth``, ...).

    Example:
        >>> bb = timm_backbone("vit_tiny_patch16_224", img_size=32, patch_size=8, embed_dim=32, depth=1, num_heads=2, num_classes=3)
        >>> bb.lora_targets, bb.preprocess["input_size"]
        (['qkv', 'proj', 'fc1', 'fc2'], (3, 32, 32))
    """
    if checkpoint_path:
        kwargs["checkpoint_path"] = checkpoint_path
    try:
        model = timm.create_model(name, pretrained=pretrained, **kwargs)
    except (OSError, RuntimeError) as error:
        if not pretrained:
            raise
        raise unreachable(f"timm weights for {name!r}", error,
                          "pass pretrained=False with checkpoint_path='<local .safetensors or .pth>', "
                          "or set HF_HOME to a cache that holds the weights.") from error
    data_config = timm.data.resolve_data_config({}, model=model)
    if "img_size" in kwargs:  # the pretrained config still names the original resolution
        size = kwargs["img_size"]
        size = tuple(size) if isinstance(size, (tuple, list)) else (size, size)
        data_config["input_size"] = (data_config["input_size"][0], *size)
    return Backbone(model, default_targets(model), preprocess=data_config)
