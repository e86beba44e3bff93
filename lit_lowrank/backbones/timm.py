"""timm image backbones (``timm.create_model`` name + kwargs)."""
from __future__ import annotations

from typing import Any

import timm
from torch import nn

from lit_lowrank.backbones.base import Backbone, unreachable
from lit_lowrank.backbones.image_preprocessing import ImagePreprocessing

VIT_TARGETS = ["qkv", "proj", "fc1", "fc2"]


def default_targets(model: nn.Module):
    """ViT-style blocks (``blocks.N.attn.qkv``) get qkv/proj/fc1/fc2; anything else "all-linear"."""
    names = {name.rsplit(".", 1)[-1] for name, _ in model.named_modules()}
    return VIT_TARGETS if {"qkv", "fc1"} <= names else "all-linear"


def timm_backbone(
    name: str,
    pretrained: bool = False,
    num_classes: int | None = None,
    img_size: int | None = None,
    checkpoint_path: str | None = None,
    model_kwargs: dict[str, Any] | None = None,
    **kwargs: Any,
) -> Backbone:
    """A timm model, its image preprocessing and default LoRA targets.

    ``preprocess`` is an :class:`~lit_lowrank.backbones.image_preprocessing.ImagePreprocessing` from timm's
    ``resolve_data_config`` (input size, mean and std, interpolation, ``crop_pct`` of the pretrained config): the
    image data modules build timm's transforms from it.

    Args:
        name: timm model name, e.g. ``vit_tiny_patch16_224``.
        pretrained: fetch timm's pretrained weights (needs the hub, or a cache).
        num_classes: size of the classifier head (timm's default when None).
        img_size: input resolution for models that take it (ViTs).
        checkpoint_path: load weights from a local file instead.
        model_kwargs: further ``timm.create_model`` arguments (``patch_size``, ``embed_dim``, ``depth``, ...);
            from YAML this is where they go.
        **kwargs: the same, for Python callers.

    Example:
        >>> bb = timm_backbone("vit_tiny_patch16_224", img_size=32, num_classes=3,
        ...                    model_kwargs=dict(patch_size=8, embed_dim=32, depth=1, num_heads=2))
        >>> bb.lora_targets, bb.preprocess.input_size, bb.preprocess.mean, bb.preprocess.fixed_size
        (['qkv', 'proj', 'fc1', 'fc2'], (32, 32), (0.5, 0.5, 0.5), True)
    """
    kwargs = {**(model_kwargs or {}), **kwargs}
    for key, value in (("num_classes", num_classes), ("img_size", img_size), ("checkpoint_path", checkpoint_path)):
        if value is not None:
            kwargs[key] = value
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
    return Backbone(model, default_targets(model),
                    preprocess=ImagePreprocessing.from_timm_config(data_config, model, model_name=repr(name)))
