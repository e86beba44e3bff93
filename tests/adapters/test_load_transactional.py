"""load_adapter is all or nothing: a load that does not fit changes nothing, and every error names its file."""
import copy
import json

import pytest
import torch
from safetensors.torch import load_file, save_file
from tiny_models import tiny_bert, tiny_llama
from torch import nn

from lit_lowrank import LoRAConfig, inject_lora, load_adapter, save_adapter
from lit_lowrank.adapters import lora_modules


def _snapshot(model):
    return {n: (p.detach().clone(), p.requires_grad) for n, p in model.named_parameters()}


def _assert_unchanged(model, snapshot):
    assert not list(lora_modules(model)), "a failed load must not leave adapters behind"
    now = _snapshot(model)
    assert now.keys() == snapshot.keys()
    for name, (value, trainable) in snapshot.items():
        assert now[name][1] == trainable, f"{name}: requires_grad changed"
        assert torch.equal(now[name][0], value), f"{name}: value changed"


def _mlp():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(8, 8), nn.ReLU(), nn.Linear(8, 4))


@pytest.mark.parametrize("case", ["shape", "name"])
def test_failed_load_into_a_fresh_model_changes_nothing(tmp_path, case):
    save_adapter(inject_lora(tiny_llama(), LoRAConfig(r=2, target_modules=["q_proj"])), tmp_path)
    target = tiny_llama(hidden=64) if case == "shape" else tiny_llama(layers=1)
    snapshot = _snapshot(target)
    message = (r"lora_A has shape \(2, 32\) in the file, \(2, 64\)" if case == "shape"
               else "file adapter 'model.layers.1")
    with pytest.raises(ValueError, match=message) as error:
        load_adapter(target, tmp_path)
    _assert_unchanged(target, snapshot)
    assert str(tmp_path / "adapter_model.safetensors") in str(error.value)


def _add_tensor(directory, key, tensor):
    path = directory / "adapter_model.safetensors"
    state = load_file(str(path))
    state[key] = tensor
    save_file(state, str(path), metadata={"format": "pt"})


@pytest.mark.parametrize("into", ["fresh", "injected"])
def test_a_base_weight_in_the_file_is_refused_by_name(tmp_path, into):
    save_adapter(inject_lora(_mlp(), LoRAConfig(r=2, target_modules=["0"])), tmp_path)
    _add_tensor(tmp_path, "base_model.model.2.weight", torch.full((4, 8), 7.0))
    target = _mlp() if into == "fresh" else inject_lora(_mlp(), LoRAConfig(r=2, target_modules=["0"]))
    base_weight, adapters = target[2].weight.detach().clone(), len(list(lora_modules(target)))
    with pytest.raises(ValueError,
                       match=r"outside the adapters and modules_to_save.*'base_model.model.2.weight'.*HINT"):
        load_adapter(target, tmp_path)
    assert torch.equal(target[2].weight, base_weight), "the frozen base weight must not be overwritten"
    assert len(list(lora_modules(target))) == adapters


def test_modules_to_save_tensors_still_load(tmp_path):
    source = inject_lora(_mlp(), LoRAConfig(r=2, target_modules=["0"], modules_to_save=["2"]))
    with torch.no_grad():
        source[2].weight.fill_(0.5)
    save_adapter(source, tmp_path)
    restored = load_adapter(_mlp(), tmp_path)
    assert torch.equal(restored[2].weight, source[2].weight) and restored[2].weight.requires_grad


@pytest.mark.parametrize("text, message", [
    ("{not json", "is not valid JSON"),
    ("[1, 2]", "holds a JSON list, not an object"),
    ('{"peft_type": "LORA", "lora_alpha": 4}', r"has no \['r'\] entry.*HINT"),
    ('{"r": "2", "lora_alpha": 4}', "'r' must be a positive integer, got '2'"),
    ('{"r": 2, "lora_alpha": 4, "modules_to_save": "2"}', "'modules_to_save' must be null or a list"),
])
def test_malformed_config_names_the_file(tmp_path, text, message):
    save_adapter(inject_lora(_mlp(), LoRAConfig(r=2, target_modules=["0"])), tmp_path)
    (tmp_path / "adapter_config.json").write_text(text)
    target = _mlp()
    snapshot = _snapshot(target)
    with pytest.raises(ValueError, match=message) as error:
        load_adapter(target, tmp_path)
    assert str(tmp_path / "adapter_config.json") in str(error.value)
    _assert_unchanged(target, snapshot)


@pytest.mark.parametrize("damage", ["garbage", "truncated"])
def test_corrupt_safetensors_names_the_file(tmp_path, damage):
    save_adapter(inject_lora(_mlp(), LoRAConfig(r=2, target_modules=["0"])), tmp_path)
    path = tmp_path / "adapter_model.safetensors"
    path.write_bytes(b"\x00" * 5 if damage == "garbage" else path.read_bytes()[:-10])
    with pytest.raises(ValueError, match="is not a readable safetensors file.*HINT") as error:
        load_adapter(_mlp(), tmp_path)
    assert str(path) in str(error.value)


def test_incomplete_pair_is_refused(tmp_path):
    save_adapter(inject_lora(_mlp(), LoRAConfig(r=2, target_modules=["0"])), tmp_path)
    path = tmp_path / "adapter_model.safetensors"
    state = {k: v for k, v in load_file(str(path)).items() if "lora_B" not in k}
    save_file(state, str(path))
    with pytest.raises(ValueError, match="adapter '0' has no lora_B tensor"):
        load_adapter(_mlp(), tmp_path)


def test_peft_seq_cls_adapter_with_implied_heads_loads(tmp_path):
    peft = pytest.importorskip("peft")
    model = tiny_bert()
    pristine = copy.deepcopy(model)
    peft_model = peft.get_peft_model(model, peft.LoraConfig(r=2, lora_alpha=4, target_modules=["query", "value"],
                                                            task_type="SEQ_CLS"))
    with torch.no_grad():
        for param in peft_model.parameters():
            if param.requires_grad:
                param.normal_(std=0.2)
    peft_model.save_pretrained(tmp_path)
    assert json.loads((tmp_path / "adapter_config.json").read_text())["modules_to_save"] == ["classifier", "score"]
    ids = torch.randint(3, 128, (2, 10))
    ours = load_adapter(pristine, tmp_path).eval()  # "score" is not in BERT: tolerated, as PEFT does
    torch.testing.assert_close(ours(input_ids=ids).logits, peft_model.eval()(input_ids=ids).logits,
                               rtol=1e-5, atol=1e-5)
