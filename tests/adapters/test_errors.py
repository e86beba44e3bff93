"""Every documented bad input raises a clear error, and leaves the model as it was."""
import json

import pytest
from tiny_models import tiny_llama
from torch import nn

from lit_lowrank import LoRAConfig, inject_lora, load_adapter, merge_lora, save_adapter, unmerge_lora
from lit_lowrank.adapters import lora_modules


def test_no_module_matched_lists_candidates():
    model = tiny_llama()
    with pytest.raises(ValueError, match="matched no layer") as error:
        inject_lora(model, LoRAConfig(target_modules=["query", "value"]))
    message = str(error.value)
    assert "q_proj (x2)" in message and "down_proj (x2)" in message and "HINT" in message
    assert not list(lora_modules(model)) and all(p.requires_grad for p in model.parameters())


def test_regex_that_matches_nothing():
    with pytest.raises(ValueError, match="matched no layer"):
        inject_lora(tiny_llama(), LoRAConfig(target_modules=r"encoder\..*"))


def test_exclude_everything_is_an_error():
    with pytest.raises(ValueError, match="matched no layer"):
        inject_lora(tiny_llama(), LoRAConfig(target_modules=["q_proj"], exclude_modules=["q_proj"]))


def test_partly_unmatched_target_list_warns(caplog):
    inject_lora(tiny_llama(), LoRAConfig(r=2, target_modules=["q_proj", "query"]))
    assert "'query' matched no layer" in caplog.text


@pytest.mark.parametrize("bad", [dict(r=0), dict(r=-2), dict(r=2.5), dict(alpha=0), dict(dropout=1.0),
                                 dict(init="nope"), dict(target_modules=[])])
def test_bad_config_values(bad):
    with pytest.raises(ValueError, match="LoRAConfig|init"):
        LoRAConfig(**bad)


def test_rank_larger_than_layer():
    model = nn.Sequential(nn.Linear(16, 4), nn.ReLU(), nn.Linear(4, 16))
    with pytest.raises(ValueError, match=r"r=8 is larger than layer '0' allows \(in=16, out=4\)"):
        inject_lora(model, LoRAConfig(r=8))
    assert not list(lora_modules(model)), "a failed injection must not leave adapters behind"
    inject_lora(model, LoRAConfig(r=4))  # r == min(in, out) is allowed


def test_injecting_twice():
    model = inject_lora(tiny_llama(), LoRAConfig(r=2))
    with pytest.raises(ValueError, match="already has 14 LoRA adapters"):
        inject_lora(model, LoRAConfig(r=2))


def test_unknown_modules_to_save():
    with pytest.raises(ValueError,
                       match="modules_to_save entry 'classifier'.*top-level modules: \\['model', 'lm_head'\\]"):
        inject_lora(tiny_llama(), LoRAConfig(r=2, modules_to_save=["classifier"]))


def test_merge_twice_and_unmerge_unmerged():
    model = inject_lora(tiny_llama(), LoRAConfig(r=2))
    with pytest.raises(ValueError, match="not merged"):
        unmerge_lora(model)
    merge_lora(model)
    with pytest.raises(ValueError, match="already merged"):
        merge_lora(model)
    with pytest.raises(ValueError, match="no LoRA adapters"):
        merge_lora(tiny_llama())


def test_load_into_mismatched_names(tmp_path):
    save_adapter(inject_lora(tiny_llama(), LoRAConfig(r=2, target_modules=["q_proj"])), tmp_path)
    other = inject_lora(tiny_llama(), LoRAConfig(r=2, target_modules=["q_proj", "v_proj"]))
    with pytest.raises(ValueError, match="model adapter 'model.layers.0.self_attn.v_proj' has no weights"):
        load_adapter(other, tmp_path)
    fewer = inject_lora(tiny_llama(layers=1), LoRAConfig(r=2, target_modules=["q_proj"]))
    with pytest.raises(ValueError, match="file adapter 'model.layers.1.self_attn.q_proj' has no matching adapter"):
        load_adapter(fewer, tmp_path)


def test_load_into_mismatched_shapes(tmp_path):
    save_adapter(inject_lora(tiny_llama(), LoRAConfig(r=2, alpha=4, target_modules=["q_proj"])), tmp_path)
    wider = tiny_llama(hidden=64)
    with pytest.raises(ValueError,
                       match=r"'model.layers.0.self_attn.q_proj': lora_A has shape \(2, 32\) in the file, \(2, 64\)"):
        load_adapter(wider, tmp_path)
    other_rank = inject_lora(tiny_llama(), LoRAConfig(r=4, alpha=8, target_modules=["q_proj"]))
    with pytest.raises(ValueError, match=r"lora_A has shape \(2, 32\) in the file, \(4, 32\) in the model"):
        load_adapter(other_rank, tmp_path)
    other_scale = inject_lora(tiny_llama(), LoRAConfig(r=2, alpha=16, target_modules=["q_proj"]))
    with pytest.raises(ValueError, match="scaling"):
        load_adapter(other_scale, tmp_path)


def test_load_missing_directory(tmp_path):
    with pytest.raises(FileNotFoundError, match="adapter_config.json"):
        load_adapter(tiny_llama(), tmp_path / "nope")


def test_save_without_adapters(tmp_path):
    with pytest.raises(ValueError, match="call inject_lora"):
        save_adapter(tiny_llama(), tmp_path)


def test_attention_with_separate_kv_dims_is_refused():
    model = nn.Sequential(nn.MultiheadAttention(16, 2, kdim=8, vdim=8))
    with pytest.raises(ValueError, match="packed in_proj_weight"):
        inject_lora(model, LoRAConfig(r=2, target_modules=["0"]))
    assert isinstance(model[0], nn.MultiheadAttention)


def test_load_rejects_unsupported_peft_features(tmp_path):
    save_adapter(inject_lora(tiny_llama(), LoRAConfig(r=2, target_modules=["q_proj"])), tmp_path)
    config = json.loads((tmp_path / "adapter_config.json").read_text())
    (tmp_path / "adapter_config.json").write_text(json.dumps({**config, "lora_bias": True}))
    with pytest.raises(ValueError, match="does not implement: \\['lora_bias'\\]"):
        load_adapter(tiny_llama(), tmp_path)


def test_load_checks_ranks_against_rank_pattern(tmp_path):
    save_adapter(inject_lora(tiny_llama(), LoRAConfig(r=2, target_modules=["q_proj"])), tmp_path)
    config = json.loads((tmp_path / "adapter_config.json").read_text())
    (tmp_path / "adapter_config.json").write_text(json.dumps({**config, "rank_pattern": {"q_proj": 4}}))
    with pytest.raises(ValueError, match=r"lora_A has shape \(2, 32\) in the file, \(4, 32\) in the model"):
        load_adapter(tiny_llama(), tmp_path)


def test_nothing_is_pickled(tmp_path):
    save_adapter(inject_lora(tiny_llama(), LoRAConfig(r=2)), tmp_path)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["adapter_config.json", "adapter_model.safetensors"]
    raw = (tmp_path / "adapter_model.safetensors").read_bytes()
    header_size = int.from_bytes(raw[:8], "little")  # safetensors: u64 header length, then a JSON header
    assert raw[8:9] == b"{" and b"lora_A" in raw[8:8 + header_size]
