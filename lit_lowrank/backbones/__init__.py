"""Backbone factories: a name or a tiny config -> ``Backbone(model, lora_targets, tokenizer, preprocess)``."""
from lit_lowrank.backbones.base import Backbone, PretrainedUnavailableError
from lit_lowrank.backbones.gguf import packaged_gguf
from lit_lowrank.backbones.hf import minilm_path, transformers_backbone
from lit_lowrank.backbones.image_preprocessing import ImagePreprocessing
from lit_lowrank.backbones.open_clip import open_clip_backbone
from lit_lowrank.backbones.timm import timm_backbone

__all__ = ["Backbone", "ImagePreprocessing", "PretrainedUnavailableError", "minilm_path", "open_clip_backbone",
           "packaged_gguf", "timm_backbone", "transformers_backbone"]
