"""Adapters round-trip through PEFT's on-disk format, checked with the real peft package."""
import copy
import json

import pytest
import torch

peft = pytest.importorskip("peft")

from tiny_models import FAMILIES  # noqa: E402

from lit_lowrank import LoRAConfig, inject_lora, load_adapter, save_adapter  # noqa: E402
from lit_lowrank.adapters import lora_modules  # noqa: E402

CASES = {
    "llama": dict(target_modules="all-linear"),
    "gpt2": dict(target_modules=["c_attn", "c_proj"]),  # transformers Conv1D: PEFT's fan_in_fan_out
    "bert": dict(target_modules=["query", "value"], modules_to_save=["classifier"]),
}


def _perturb(model):
    """Random adapters (and saved modules), so that a wrong key or transpose shows in the output."""
    with torch.no_grad():
        for name, param in model.named_parameters():
            if param.requires_grad:
                param.normal_(std=0.2)


@pytest.mark.parametrize("family", sorted(CASES))
def test_peft_loads_what_we_save(family, tmp_path):
    model, inputs, forward = FAMILIES[family]()
    pristine = copy.deepcopy(model)
    inject_lora(model, LoRAConfig(r=4, alpha=8, rslora=family == "llama", **CASES[family]))
    _perturb(model)
    model.eval()
    ours = forward(model, inputs)
    save_adapter(model, tmp_path)
    config = json.loads((tmp_path / "adapter_config.json").read_text())
    assert config["fan_in_fan_out"] == (family == "gpt2")
    peft_model = peft.PeftModel.from_pretrained(pristine, tmp_path).eval()
    torch.testing.assert_close(forward(peft_model, inputs), ours, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("family", sorted(CASES))
def test_we_load_what_peft_saves(family, tmp_path):
    model, inputs, forward = FAMILIES[family]()
    pristine = copy.deepcopy(model)
    options = dict(CASES[family])
    peft_config = peft.LoraConfig(r=4, lora_alpha=8, use_rslora=family == "bert",
                                  target_modules=options["target_modules"],
                                  modules_to_save=options.get("modules_to_save"))
    peft_model = peft.get_peft_model(model, peft_config)
    _perturb(peft_model)
    peft_model.eval()
    expected = forward(peft_model, inputs)
    peft_model.save_pretrained(tmp_path)
    ours = load_adapter(pristine, tmp_path).eval()
    assert len(list(lora_modules(ours))) > 0
    torch.testing.assert_close(forward(ours, inputs), expected, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("family", ["clip", "vit"])
def test_our_own_round_trip_covers_attention_adapters(family, tmp_path):
    model, inputs, forward = FAMILIES[family]()
    pristine = copy.deepcopy(model)
    inject_lora(model, LoRAConfig(r=2, target_modules="all-linear"))
    _perturb(model)
    model.eval()
    save_adapter(model, tmp_path)
    names = json.loads((tmp_path / "adapter_config.json").read_text())["target_modules"]
    if family == "clip":
        assert "transformer.resblocks.0.attn.q_proj" in names  # a virtual name PEFT cannot resolve
    restored = load_adapter(pristine, tmp_path).eval()
    torch.testing.assert_close(forward(restored, inputs), forward(model, inputs), rtol=0, atol=0)


def test_load_into_model_that_already_has_matching_adapters(tmp_path):
    model, inputs, forward = FAMILIES["llama"]()
    target = copy.deepcopy(model)
    inject_lora(model, LoRAConfig(r=2, alpha=4))
    _perturb(model)
    save_adapter(model, tmp_path)
    inject_lora(target, LoRAConfig(r=2, alpha=4))
    load_adapter(target, tmp_path)
    torch.testing.assert_close(forward(target.eval(), inputs), forward(model.eval(), inputs), rtol=0, atol=0)


def test_save_from_a_wrapper_uses_names_of_the_injected_model(tmp_path):
    model, inputs, forward = FAMILIES["llama"]()
    pristine = copy.deepcopy(model)
    wrapper = torch.nn.Module()
    wrapper.backbone = inject_lora(model, LoRAConfig(r=2))
    _perturb(model)
    save_adapter(wrapper, tmp_path)
    restored = load_adapter(pristine, tmp_path)
    torch.testing.assert_close(forward(restored.eval(), inputs), forward(model.eval(), inputs), rtol=0, atol=0)
