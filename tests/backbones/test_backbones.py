"""Backbone factories: tiny configs build offline, bundled MiniLM loads real weights, hub names fail clearly."""
import pytest
import torch

from lit_lowrank import LoRAConfig, inject_lora
from lit_lowrank.adapters import lora_modules
from lit_lowrank.backbones import (
    PretrainedUnavailableError,
    minilm_path,
    open_clip_backbone,
    timm_backbone,
    transformers_backbone,
)

TINY_LLAMA = dict(model_type="llama", hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                  num_attention_heads=4, num_key_value_heads=2, vocab_size=64)


def test_transformers_from_config_and_default_targets():
    backbone = transformers_backbone(config=TINY_LLAMA, tokenizer=False)
    inject_lora(backbone.model, LoRAConfig(r=2, target_modules=backbone.lora_targets))
    assert len(list(lora_modules(backbone.model))) == 2 * 7
    bert = transformers_backbone(config=dict(model_type="bert", hidden_size=32, intermediate_size=64,
                                             num_hidden_layers=1, num_attention_heads=2, vocab_size=64),
                                 auto_class="AutoModelForSequenceClassification", tokenizer=False,
                                 model_kwargs=dict(num_labels=3))
    assert bert.lora_targets == ["query", "key", "value", "dense"] and bert.model.config.num_labels == 3


def test_bundled_minilm_loads_real_weights_offline():
    assert (minilm_path() / "model.safetensors").is_file()
    backbone = transformers_backbone("sentence-transformers/all-MiniLM-L6-v2", auto_class="AutoModel")
    tokenizer, model = backbone.tokenizer, backbone.model.eval()
    sentences = ["A man is playing a guitar.", "Someone plays the guitar.", "The stock market fell sharply today."]
    batch = tokenizer(sentences, padding=True, return_tensors="pt")
    with torch.no_grad():
        hidden = model(**batch).last_hidden_state
    mask = batch["attention_mask"].unsqueeze(-1).float()
    embedding = torch.nn.functional.normalize((hidden * mask).sum(1) / mask.sum(1), dim=-1)
    similar, unrelated = embedding[0] @ embedding[1], embedding[0] @ embedding[2]
    # trained sentence embeddings separate paraphrases from unrelated text; random weights do not
    assert similar > 0.6 and unrelated < 0.2


def test_unreachable_hub_names_fail_with_a_hint():
    with pytest.raises(PretrainedUnavailableError, match="HINT: point name_or_path at a local folder"):
        transformers_backbone("lit-lowrank-test/no-such-model", auto_class="AutoModel")
    with pytest.raises(PretrainedUnavailableError, match="HINT: pass pretrained=False with checkpoint_path"):
        timm_backbone("vit_tiny_patch16_224", pretrained=True)
    with pytest.raises(PretrainedUnavailableError, match="HINT: give pretrained='<local checkpoint file>'"):
        open_clip_backbone("ViT-B-32", pretrained="openai")


def test_config_or_name_is_required():
    with pytest.raises(ValueError, match="name_or_path .* or config"):
        transformers_backbone()
    with pytest.raises(ValueError, match="model_type"):
        transformers_backbone(config={"hidden_size": 8}, tokenizer=False)
    with pytest.raises(ValueError, match="unknown transformers auto class"):
        transformers_backbone(config=TINY_LLAMA, auto_class="AutoModelForMagic", tokenizer=False)
    with pytest.raises(ValueError, match="embed_dim"):
        open_clip_backbone()


def test_timm_and_open_clip_defaults():
    vit = timm_backbone("vit_tiny_patch16_224", img_size=32, patch_size=8, embed_dim=32, depth=2, num_heads=2,
                        num_classes=4)
    inject_lora(vit.model, LoRAConfig(r=2, target_modules=vit.lora_targets))
    assert len(list(lora_modules(vit.model))) == 8 and vit.preprocess.input_size == (32, 32)
    clip = open_clip_backbone(embed_dim=16,
                              vision_cfg=dict(image_size=32, patch_size=8, width=32, layers=2, head_width=16),
                              text_cfg=dict(context_length=12, width=32, heads=2, layers=2))
    inject_lora(clip.model, LoRAConfig(r=2, target_modules=clip.lora_targets))
    assert len(list(lora_modules(clip.model))) == 2 * 2 * 4
    tokens = clip.tokenizer(["a photo of a cat", "a photo of a dog"])
    image = clip.preprocess.transform().transforms[-1](torch.rand(3, 32, 32))  # the normalisation step
    features = clip.model.encode_text(tokens)
    assert features.shape == (2, 16) and image.shape == (3, 32, 32)
