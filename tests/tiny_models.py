"""Tiny models of each supported family, built from configs (never downloaded), with example inputs.

``FAMILIES[name]()`` returns ``(model, inputs, forward)`` where ``forward(model, inputs)`` gives one tensor.
"""
from __future__ import annotations

import torch


def with_random_adapters(model, targets="all-linear", seed: int = 0):
    """``model`` with rank-4 adapters (and any other trainable tensor) drawn from ``seed``, B not zero, so that a
    delta counted twice or lost shows in the outputs; two seeds give two different adapters over the same base."""
    from lit_lowrank import LoRAConfig, inject_lora

    inject_lora(model, LoRAConfig(r=4, alpha=8, target_modules=targets))
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for param in model.parameters():
            if param.requires_grad:
                param.copy_(torch.randn(param.shape, generator=generator) * 0.2)
    return model.eval()


def tiny_llama(vocab_size: int = 128, layers: int = 2, hidden: int = 32):
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=layers,
                         num_attention_heads=4, num_key_value_heads=2, vocab_size=vocab_size,
                         max_position_embeddings=128, pad_token_id=0, bos_token_id=1, eos_token_id=2)
    return LlamaForCausalLM(config)


def tiny_bert(num_labels: int = 3, vocab_size: int = 128):
    from transformers import BertConfig, BertForSequenceClassification

    config = BertConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                        vocab_size=vocab_size, max_position_embeddings=64, num_labels=num_labels)
    return BertForSequenceClassification(config)


def tiny_gpt2(vocab_size: int = 128):
    from transformers import GPT2Config, GPT2LMHeadModel

    config = GPT2Config(n_embd=32, n_layer=2, n_head=4, vocab_size=vocab_size, n_positions=64,
                        bos_token_id=1, eos_token_id=2)
    return GPT2LMHeadModel(config)


def tiny_vit(num_classes: int = 5):
    import timm

    return timm.create_model("vit_tiny_patch16_224", pretrained=False, img_size=32, patch_size=8, embed_dim=32,
                             depth=2, num_heads=2, num_classes=num_classes)


def tiny_clip(vocab_size: int = 49408):
    import open_clip

    return open_clip.model.CLIP(
        embed_dim=16,
        vision_cfg=dict(image_size=32, patch_size=8, width=32, layers=2, head_width=16),
        text_cfg=dict(context_length=16, vocab_size=vocab_size, width=32, heads=2, layers=2),
    )


def _tokens(vocab: int = 128, batch: int = 2, length: int = 10) -> torch.Tensor:
    return torch.randint(3, vocab, (batch, length), generator=torch.Generator().manual_seed(1))


def _logits(model, inputs):
    return model(**inputs).logits


def _clip_features(model, inputs):
    image, text = model.encode_image(inputs["image"]), model.encode_text(inputs["text"])
    return torch.cat([image, text], dim=0)


FAMILIES = {
    "llama": lambda: (tiny_llama(), {"input_ids": _tokens()}, _logits),
    "bert": lambda: (tiny_bert(), {"input_ids": _tokens()}, _logits),
    "gpt2": lambda: (tiny_gpt2(), {"input_ids": _tokens()}, _logits),
    "vit": lambda: (tiny_vit(), {"x": torch.randn(2, 3, 32, 32)}, lambda m, i: m(i["x"])),
    "clip": lambda: (tiny_clip(), {"image": torch.randn(2, 3, 32, 32), "text": _tokens(1000, 2, 16)}, _clip_features),
}

#: Default LoRA target names per family, as the backbone factories choose them.
DEFAULT_TARGETS = {
    "llama": ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"],
    "bert": ["query", "key", "value", "dense"],
    "gpt2": ["c_attn", "c_proj", "c_fc"],
    "vit": ["qkv", "proj", "fc1", "fc2"],
    "clip": ["q_proj", "k_proj", "v_proj", "out_proj"],
}
