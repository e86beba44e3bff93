"""export_merged writes a plain model of the backbone's own library that reproduces the adapted model, and leaves
the model it was given bit for bit as it was (transformers, timm, open_clip; bitsandbytes 4/8-bit bases)."""
import copy
import json

import open_clip
import pytest
import timm
import torch
from bnb_support import QUANTIZED_HIDDEN, matmul_tolerance, quantized_llama, require_bnb
from safetensors.torch import load_file
from tiny_models import _tokens, tiny_bert, tiny_clip, tiny_llama, tiny_vit
from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification, AutoTokenizer

from lit_lowrank import LoRAConfig, export_merged, inject_lora, merge_lora
from lit_lowrank.backbones import Backbone
from lit_lowrank.export import MODEL_FILE
from lit_lowrank.tasks import SequenceClassificationTask


def adapted(model, targets="all-linear"):
    """``model`` with adapters whose B is not zero and a moved head, so that merging changes the outputs."""
    inject_lora(model, LoRAConfig(r=4, alpha=8, target_modules=targets))
    with torch.no_grad():
        for name, param in model.named_parameters():
            if param.requires_grad:
                param.add_(torch.randn_like(param) * 0.1)
    return model.eval()


def snapshot(model):
    return ({name: tensor.clone() for name, tensor in model.state_dict().items()},
            [(name, type(module), module.training) for name, module in model.named_modules()],
            [(name, param.requires_grad) for name, param in model.named_parameters()])


def assert_unchanged(model, before):
    state, modules, flags = snapshot(model)
    assert modules == before[1] and flags == before[2]
    assert state.keys() == before[0].keys()
    for key, tensor in before[0].items():
        assert torch.equal(state[key], tensor), key


@pytest.mark.parametrize("build, auto_class", [(tiny_llama, AutoModelForCausalLM),
                                               (tiny_bert, AutoModelForSequenceClassification)])
def test_from_pretrained_reproduces_the_adapted_model(tmp_path, build, auto_class):
    model = adapted(build())
    ids = _tokens()
    with torch.no_grad():  # first: bitsandbytes repacks 4-bit weights in place at the first CPU inference
        expected = model(input_ids=ids).logits
    before = snapshot(model)
    export_merged(model, tmp_path)
    assert_unchanged(model, before)
    plain = auto_class.from_pretrained(tmp_path).eval()
    assert not any("lora" in name or "base_layer" in name for name in plain.state_dict())
    with torch.no_grad():
        torch.testing.assert_close(plain(input_ids=ids).logits, expected, rtol=1e-5, atol=1e-5)
    # the weights are exactly what merge_lora(unload=True) leaves in the model
    reference = merge_lora(copy.deepcopy(model), unload=True).state_dict()
    saved = plain.state_dict()
    for key, tensor in reference.items():
        assert torch.equal(saved[key], tensor), key


def test_a_task_exports_its_model_and_the_tokenizer(tmp_path):
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    words = Tokenizer(models.WordLevel({"[UNK]": 0, "[PAD]": 1, "lora": 5, "merged": 6}, unk_token="[UNK]"))
    words.pre_tokenizer = pre_tokenizers.Whitespace()
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=words, unk_token="[UNK]", pad_token="[PAD]")
    task = SequenceClassificationTask(Backbone(tiny_bert(), ["query", "value"], tokenizer=tokenizer),
                                      lora=LoRAConfig(r=2, target_modules="default"))
    adapted_model = task.model.eval()
    export_merged(task, tmp_path, tokenizer=task.tokenizer)
    assert AutoTokenizer.from_pretrained(tmp_path)("lora merged")["input_ids"] == [5, 6]
    ids = _tokens()
    with torch.no_grad():
        torch.testing.assert_close(AutoModelForSequenceClassification.from_pretrained(tmp_path).eval()(input_ids=ids).logits,
                                   adapted_model(input_ids=ids).logits, rtol=1e-5, atol=1e-5)


def test_a_full_fine_tune_is_exported_as_it_is(tmp_path):
    task = SequenceClassificationTask(Backbone(tiny_bert(), "all-linear"), lora=None)
    export_merged(task, tmp_path)
    saved = AutoModelForSequenceClassification.from_pretrained(tmp_path).state_dict()
    for key, tensor in task.model.state_dict().items():
        assert torch.equal(saved[key], tensor), key


def test_timm_state_dict_reloads_through_pretrained_cfg_overlay(tmp_path):
    model = adapted(tiny_vit(num_classes=5), ["qkv", "proj", "fc1", "fc2"])
    before = snapshot(model)
    export_merged(model, tmp_path)
    assert_unchanged(model, before)
    # num_classes in the overlay too: with timm's default 1000 it would drop the trained head as a mismatch
    plain = timm.create_model("vit_tiny_patch16_224", pretrained=True, img_size=32, patch_size=8, embed_dim=32,
                              depth=2, num_heads=2, num_classes=5,
                              pretrained_cfg_overlay=dict(file=str(tmp_path / MODEL_FILE), num_classes=5)).eval()
    images = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(plain(images), model(images), rtol=1e-5, atol=1e-5)


def test_open_clip_state_dict_reloads_with_load_checkpoint(tmp_path):
    model = adapted(tiny_clip(), ["q_proj", "k_proj", "v_proj", "out_proj"])
    before = snapshot(model)
    export_merged(model, tmp_path)
    assert_unchanged(model, before)
    plain = tiny_clip().eval()
    open_clip.load_checkpoint(plain, str(tmp_path / MODEL_FILE))
    images, texts = torch.randn(2, 3, 32, 32), _tokens(1000, 2, 16)
    with torch.no_grad():
        torch.testing.assert_close(plain.encode_image(images), model.encode_image(images), rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(plain.encode_text(texts), model.encode_text(texts), rtol=1e-5, atol=1e-5)
    assert set(load_file(tmp_path / MODEL_FILE)) == set(plain.state_dict())


def test_a_tokenizer_next_to_a_state_dict_is_refused(tmp_path):
    with pytest.raises(ValueError, match="only next to a transformers model.*HINT"):
        export_merged(adapted(tiny_vit(), ["qkv"]), tmp_path, tokenizer=object())
    assert not (tmp_path / MODEL_FILE).exists()


@pytest.mark.parametrize("bits", [4, 8])
def test_a_quantized_base_is_dequantized_merged_and_saved_unquantized(tmp_path, bits):
    require_bnb(bits)
    import bitsandbytes.functional as bnb_functional

    tiny_llama(hidden=QUANTIZED_HIDDEN).save_pretrained(tmp_path / "base")
    model = adapted(quantized_llama(tmp_path / "base", bits), ["q_proj", "v_proj"])
    ids = _tokens()
    with torch.no_grad():  # first: bitsandbytes repacks 4-bit weights in place at the first CPU inference
        expected = model(input_ids=ids).logits
    before = snapshot(model)
    export_merged(model, tmp_path / "merged")
    assert_unchanged(model, before)
    assert "quantization_config" not in json.loads((tmp_path / "merged" / "config.json").read_text())
    plain = AutoModelForCausalLM.from_pretrained(tmp_path / "merged").eval()
    assert {p.dtype for p in plain.parameters()} == {torch.float32}
    assert all(type(m) is torch.nn.Linear for n, m in plain.named_modules() if n.endswith(("_proj", "lm_head")))
    # the weight is the dequantized base plus the delta (fp32), independently of export_merged's code
    layer = model.model.layers[0].self_attn.q_proj
    weight = layer.base_layer.weight
    dense = (bnb_functional.dequantize_4bit(weight.data, weight.quant_state) if bits == 4
             else bnb_functional.int8_vectorwise_dequant(weight.data, layer.base_layer.state_dict()["SCB"]))
    assert torch.equal(plain.model.layers[0].self_attn.q_proj.weight, dense.float() + layer.delta_weight())
    tolerance = matmul_tolerance(bits)  # the quantized model's own matmul rounding
    with torch.no_grad():
        torch.testing.assert_close(plain(input_ids=ids).logits, expected, rtol=tolerance, atol=tolerance)

