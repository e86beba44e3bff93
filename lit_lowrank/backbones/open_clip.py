"""open_clip CLIP backbones: a named model + pretrained tag, or a custom (embed_dim, vision_cfg, text_cfg)."""
from __future__ import annotations

from typing import Any

import open_clip

from lit_lowrank.backbones.base import Backbone, unreachable
from lit_lowrank.backbones.image_preprocessing import ImagePreprocessing

#: The attention projections of both towers (virtual names of nn.MultiheadAttention parts, see inject_lora).
CLIP_TARGETS = ["q_proj", "k_proj", "v_proj", "out_proj"]


def open_clip_backbone(
    name: str | None = None,
    pretrained: str | None = None,
    embed_dim: int | None = None,
    vision_cfg: dict[str, Any] | None = None,
    text_cfg: dict[str, Any] | None = None,
) -> Backbone:
    """An open_clip CLIP model with its tokenizer, image preprocessing and default LoRA targets.

    ``preprocess`` is an :class:`~lit_lowrank.backbones.image_preprocessing.ImagePreprocessing` from the model's
    own preprocess config (size, mean and std, interpolation, resize mode): the image data modules build
    open_clip's transforms from it.

    Args:
        name: open_clip model name (``ViT-B-32``, ...); ``pretrained`` is its tag (``openai``, ``laion2b_s34b_b79k``)
            or a local checkpoint file.
        embed_dim, vision_cfg, text_cfg: build a custom CLIP instead (no download), as ``open_clip.model.CLIP``.

    Example:
        >>> bb = open_clip_backbone(embed_dim=16, vision_cfg=dict(image_size=32, patch_size=8, width=32, layers=1,
        ...     head_width=16), text_cfg=dict(context_length=8, width=32, heads=2, layers=1))
        >>> bb.tokenizer(["a photo of a cat"]).shape, bb.preprocess.input_size
        (torch.Size([1, 8]), (32, 32))
    """
    if name is None:
        if embed_dim is None or vision_cfg is None or text_cfg is None:
            raise ValueError("open_clip_backbone needs a model name, or embed_dim + vision_cfg + text_cfg")
        model = open_clip.model.CLIP(embed_dim=embed_dim, vision_cfg=vision_cfg, text_cfg=text_cfg)
        tokenizer = open_clip.tokenizer.SimpleTokenizer(context_length=model.context_length)
        preprocess = ImagePreprocessing.from_open_clip_config(open_clip.get_model_preprocess_cfg(model),
                                                              model_name="the custom CLIP")
        return Backbone(model, CLIP_TARGETS, tokenizer=tokenizer, preprocess=preprocess)
    try:
        model = open_clip.create_model(name, pretrained=pretrained)
    except (OSError, RuntimeError) as error:
        if not pretrained:
            raise
        raise unreachable(f"open_clip weights {name}/{pretrained}", error,
                          "give pretrained='<local checkpoint file>', set HF_HOME to a cache that holds the weights, "
                          "or build a custom CLIP with embed_dim/vision_cfg/text_cfg.") from error
    preprocess = ImagePreprocessing.from_open_clip_config(open_clip.get_model_preprocess_cfg(model),
                                                          model_name=f"{name}/{pretrained}" if pretrained else name)
    return Backbone(model, CLIP_TARGETS, tokenizer=open_clip.get_tokenizer(name), preprocess=preprocess)
