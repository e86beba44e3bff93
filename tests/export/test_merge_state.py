"""Adapters merged into their base weights (merge_lora without unload) count once: export_merged writes what the
merged model computes, and load_adapter into a merged model gives the loaded adapter's outputs and a base that
unmerge_lora restores (issue 22, items 1 and 2)."""
import copy

import open_clip
import pytest
import torch
from tiny_models import _tokens, tiny_clip, tiny_llama, with_random_adapters
from transformers import AutoModelForCausalLM

from lit_lowrank import export_merged, load_adapter, merge_lora, save_adapter, unmerge_lora
from lit_lowrank.adapters import LoRALinear, LoRAMultiheadAttention
from lit_lowrank.export import MODEL_FILE

peft = pytest.importorskip("peft")
CLIP_TARGETS = ["q_proj", "k_proj", "v_proj", "out_proj"]


def logits(model, ids):
    with torch.no_grad():
        return model(input_ids=ids).logits


def clip_features(model, images, texts):
    with torch.no_grad():
        return torch.cat([model.encode_image(images), model.encode_text(texts)])


def wrappers(model):
    return [module for module in model.modules() if isinstance(module, (LoRALinear, LoRAMultiheadAttention))]


@pytest.mark.parametrize("merged", ["all", "one layer"])
def test_the_export_of_a_merged_transformers_model_equals_it(tmp_path, merged):
    model, ids = with_random_adapters(tiny_llama()), _tokens()
    expected = logits(model, ids)  # the adapters computed on the side, nothing merged yet
    if merged == "all":
        merge_lora(model)
    else:
        model.model.layers[0].self_attn.q_proj.merge()
    torch.testing.assert_close(logits(model, ids), expected, rtol=1e-5, atol=1e-5)
    export_merged(model, tmp_path)
    plain = AutoModelForCausalLM.from_pretrained(tmp_path).eval()
    torch.testing.assert_close(logits(plain, ids), expected, rtol=1e-5, atol=1e-5)


def test_the_export_of_a_merged_attention_model_equals_it(tmp_path):
    model = with_random_adapters(tiny_clip(), CLIP_TARGETS)
    images, texts = torch.randn(2, 3, 32, 32), _tokens(1000, 2, 16)
    expected = clip_features(model, images, texts)
    merge_lora(model)
    assert all(wrapper.merged for wrapper in wrappers(model))
    export_merged(model, tmp_path)
    plain = tiny_clip().eval()
    open_clip.load_checkpoint(plain, str(tmp_path / MODEL_FILE))
    torch.testing.assert_close(clip_features(plain, images, texts), expected, rtol=1e-5, atol=1e-5)


def test_load_adapter_into_a_merged_model_computes_the_loaded_adapter(tmp_path):
    base, ids = tiny_llama(), _tokens()
    save_adapter(with_random_adapters(copy.deepcopy(base), seed=1), tmp_path / "adapter")
    expected = logits(peft.PeftModel.from_pretrained(copy.deepcopy(base), tmp_path / "adapter").eval(), ids)

    model = merge_lora(with_random_adapters(copy.deepcopy(base), seed=2))  # other adapters, merged
    load_adapter(model, tmp_path / "adapter")
    assert all(wrapper.merged for wrapper in wrappers(model))  # still merged: forward uses the base weights only
    torch.testing.assert_close(logits(model, ids), expected, rtol=1e-5, atol=1e-5)

    unmerge_lora(model)
    pristine = dict(base.named_parameters())
    for name, param in model.named_parameters():
        if ".base_layer." in name:
            torch.testing.assert_close(param, pristine[name.replace(".base_layer", "")], rtol=0, atol=1e-6)
    torch.testing.assert_close(logits(model, ids), expected, rtol=1e-5, atol=1e-5)


def test_load_adapter_into_merged_attention_adapters(tmp_path):
    base = tiny_clip()
    images, texts = torch.randn(2, 3, 32, 32), _tokens(1000, 2, 16)
    source = with_random_adapters(copy.deepcopy(base), CLIP_TARGETS, seed=1)
    save_adapter(source, tmp_path / "adapter")
    expected = clip_features(source, images, texts)

    model = merge_lora(with_random_adapters(copy.deepcopy(base), CLIP_TARGETS, seed=2))
    load_adapter(model, tmp_path / "adapter")
    torch.testing.assert_close(clip_features(model, images, texts), expected, rtol=1e-5, atol=1e-5)
    unmerge_lora(model)
    attention = model.visual.transformer.resblocks[0].attn.base_layer
    original = base.visual.transformer.resblocks[0].attn
    torch.testing.assert_close(attention.in_proj_weight, original.in_proj_weight, rtol=0, atol=1e-6)
    torch.testing.assert_close(attention.out_proj.weight, original.out_proj.weight, rtol=0, atol=1e-6)
