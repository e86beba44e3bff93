"""PEFT's LoraConfig field names: one config, given to LoRAConfig and to peft.LoraConfig, adapts the same layers with
the same shapes and scaling; such adapters cross between the two libraries both ways; names we do not implement stop."""
import copy
import dataclasses
import inspect
import json

import pytest
import torch
from tiny_models import tiny_gpt2, tiny_llama
from torch import nn

from lit_lowrank import LoRAConfig, inject_lora, load_adapter, save_adapter
from lit_lowrank.adapters import LoRALinear, lora_modules

peft = pytest.importorskip("peft")

pytestmark = pytest.mark.usefixtures("one_thread")

#: Keyword arguments written once, in PEFT's names, and given to both libraries.
CASES = {
    "rank_and_alpha_patterns": (lambda: tiny_llama(layers=3), dict(
        r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "down_proj"],
        rank_pattern={"v_proj": 2, r"model\.layers\.1\.self_attn\.q_proj": 8}, alpha_pattern={"down_proj": 3})),
    "patterns_with_rslora": (tiny_llama, dict(
        r=4, lora_alpha=16, use_rslora=True, target_modules=["q_proj", "o_proj"], rank_pattern={"o_proj": 2},
        alpha_pattern={r".*\.1\.self_attn\.q_proj": 2})),
    "regex_targets_and_a_pattern": (tiny_llama, dict(r=4, lora_alpha=8, target_modules=r".*\.(q|k)_proj",
                                                     rank_pattern={"k_proj": 2})),
    "layers_to_transform": (lambda: tiny_llama(layers=3), dict(r=2, lora_alpha=4, target_modules=["q_proj", "up_proj"],
                                                               layers_to_transform=[0, 2])),
    "layers_pattern": (lambda: tiny_llama(layers=3), dict(r=2, lora_alpha=4, target_modules=["q_proj"],
                                                          layers_to_transform=1, layers_pattern="layers")),
    "full_name_escapes_the_layer_filter": (tiny_llama, dict(
        r=2, lora_alpha=4, target_modules=["model.layers.0.self_attn.q_proj", "v_proj"], layers_to_transform=[1])),
    "gpt2_conv1d_layers": (tiny_gpt2, dict(r=2, lora_alpha=4, target_modules=["c_attn", "c_fc"],
                                           layers_to_transform=[1], layers_pattern="h", fan_in_fan_out=True)),
}


def _ours(model):
    return {name: (tuple(m.lora_A.shape), tuple(m.lora_B.shape), m.scaling) for name, m in lora_modules(model)}


def _peft(peft_model):
    return {name: (tuple(m.lora_A["default"].weight.shape), tuple(m.lora_B["default"].weight.shape),
                   m.scaling["default"])
            for name, m in peft_model.base_model.model.named_modules() if isinstance(m, peft.tuners.lora.LoraLayer)}


@pytest.mark.filterwarnings("ignore::UserWarning")  # PEFT's notes about fan_in_fan_out
@pytest.mark.parametrize("case", sorted(CASES))
def test_same_layers_shapes_and_scaling_as_peft(case):
    build, options = CASES[case]
    model = build()
    ours = _ours(inject_lora(copy.deepcopy(model), LoRAConfig(**options)))
    theirs = _peft(peft.get_peft_model(model, peft.LoraConfig(**options)))
    assert ours == theirs
    assert len({shapes[0][0] for shapes in ours.values()}) > 1 or "layers" in case or "full_name" in case


def _perturbed(model):
    with torch.no_grad():
        for param in model.parameters():
            if param.requires_grad:
                param.normal_(std=0.2)
    return model.eval()


@pytest.mark.parametrize("case", ["rank_and_alpha_patterns", "patterns_with_rslora", "layers_pattern"])
def test_peft_loads_our_patterns_and_reproduces_our_outputs(case, tmp_path):
    build, options = CASES[case]
    model = build()
    pristine = copy.deepcopy(model)
    ours = _perturbed(inject_lora(model, LoRAConfig(**options)))
    save_adapter(ours, tmp_path)
    written = json.loads((tmp_path / "adapter_config.json").read_text())
    assert written["rank_pattern"] == options.get("rank_pattern", {})
    assert written["layers_to_transform"] == options.get("layers_to_transform")
    ids = torch.randint(3, 128, (2, 10), generator=torch.Generator().manual_seed(1))
    theirs = peft.PeftModel.from_pretrained(pristine, tmp_path).eval()
    assert _peft(theirs) == _ours(ours)
    torch.testing.assert_close(theirs(input_ids=ids).logits, ours(input_ids=ids).logits, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("case", ["rank_and_alpha_patterns", "patterns_with_rslora", "layers_to_transform"])
def test_we_load_peft_patterns_and_reproduce_peft_outputs(case, tmp_path):
    build, options = CASES[case]
    model = build()
    pristine = copy.deepcopy(model)
    theirs = _perturbed(peft.get_peft_model(model, peft.LoraConfig(**options)))
    theirs.save_pretrained(tmp_path)
    ids = torch.randint(3, 128, (2, 10), generator=torch.Generator().manual_seed(1))
    ours = load_adapter(pristine, tmp_path).eval()
    assert _ours(ours) == _peft(theirs)
    torch.testing.assert_close(ours(input_ids=ids).logits, theirs(input_ids=ids).logits, rtol=1e-5, atol=1e-5)


def test_adapters_made_by_hand_export_their_own_ranks(tmp_path):
    # No inject_lora record: rank_pattern / alpha_pattern are written from the adapters themselves.
    model = nn.Sequential(nn.Linear(8, 8), nn.ReLU(), nn.Linear(8, 6)).requires_grad_(False)
    pristine = copy.deepcopy(model)
    model[0], model[2] = LoRALinear(model[0], r=4, alpha=8.0), LoRALinear(model[2], r=2, alpha=3.0)
    _perturbed(model)
    save_adapter(model, tmp_path)
    x = torch.randn(5, 8)
    theirs = peft.PeftModel.from_pretrained(pristine, tmp_path).eval()
    assert {name: shapes[2] for name, shapes in _peft(theirs).items()} == {"0": 2.0, "2": 1.5}
    torch.testing.assert_close(theirs(x), model(x), rtol=1e-5, atol=1e-5)


def test_peft_names_set_our_fields_and_are_not_stored():
    config = LoRAConfig(lora_alpha=32, lora_dropout=0.1, use_rslora=True, use_dora=True, init_lora_weights="gaussian")
    assert (config.alpha, config.dropout, config.rslora, config.dora, config.init) == (32, 0.1, True, True, "gaussian")
    assert not {"lora_alpha", "lora_dropout", "use_rslora", "use_dora"} & set(dataclasses.asdict(config))
    assert dataclasses.replace(config, r=4).alpha == 32  # what the tasks do to resolve "default" targets
    assert LoRAConfig(alpha=32, lora_alpha=32).alpha == 32  # both names, one value: fine
    assert [LoRAConfig(init_lora_weights=value).init for value in (True, False)] == ["default", "random"]


def test_both_names_with_different_values_are_refused():
    with pytest.raises(ValueError, match="both alpha=8 and lora_alpha=32, two names of one setting.*HINT"):
        LoRAConfig(alpha=8, lora_alpha=32)


@pytest.mark.parametrize("given, message", [
    (dict(bias="all"), "bias='all'.*not supported.*HINT: leave bias='none'"),
    (dict(target_parameters=["experts.gate_up_proj"]), "target_parameters.*not implemented"),
    (dict(init_lora_weights="pissa"), "init_lora_weights='pissa'.*not implemented.*HINT"),
    (dict(target_modules="all-linear", layers_to_transform=[0]), "layers_to_transform needs target_modules as a list"),
    (dict(target_modules=["q_proj"], layers_pattern="layers"), "layers_pattern is set without layers_to_transform"),
    (dict(rank_pattern={"q_proj": 0}), "rank_pattern maps module-name patterns to a positive integer"),
    (dict(alpha_pattern={"q_proj[": 4}), "not a valid regular expression"),
])
def test_unsupported_values_say_why(given, message):
    with pytest.raises(ValueError, match=message):
        LoRAConfig(**given)


def test_peft_refuses_layers_to_transform_with_a_string_target_too():
    with pytest.raises(ValueError, match="layers_to_transform"):
        peft.LoraConfig(target_modules="all-linear", layers_to_transform=[0])


@pytest.mark.parametrize("name, message", [
    ("lora_dropot", "unknown argument 'lora_dropot'. HINT: did you mean 'lora_dropout'?"),
    ("target_module", "did you mean 'target_modules'?"),
    ("task_type", "does not take PEFT's 'task_type': it is derived from the model"),
    ("use_qalora", "is a PEFT feature lit_lowrank does not implement"),
])
def test_unknown_names_name_the_closest_or_the_reason(name, message):
    with pytest.raises(TypeError, match=message):
        LoRAConfig(**{name: 1})


def test_fan_in_fan_out_must_fit_the_layers():
    with pytest.raises(ValueError, match="fan_in_fan_out=True.*does not fit layer 'model.layers.0.self_attn.q_proj'"):
        inject_lora(tiny_llama(), LoRAConfig(target_modules=["q_proj"], fan_in_fan_out=True))
    inject_lora(tiny_gpt2(), LoRAConfig(r=2, target_modules=["c_attn"], fan_in_fan_out=True))  # GPT-2's Conv1D


def test_a_pattern_that_matches_nothing_warns(caplog):
    inject_lora(tiny_llama(), LoRAConfig(r=2, target_modules=["q_proj"], rank_pattern={"v_proj": 1}))
    assert "rank_pattern key 'v_proj' matched no adapted layer" in caplog.text


def test_yaml_takes_peft_names():
    from jsonargparse import ArgumentParser

    def task(lora: LoRAConfig | None = None):
        return lora

    parser = ArgumentParser(exit_on_error=False)
    parser.add_function_arguments(task, "model")
    parsed = parser.parse_string("model:\n  lora: {r: 4, lora_alpha: 32, lora_dropout: 0.05, use_dora: true,\n"
                                 "         target_modules: [q_proj, v_proj], rank_pattern: {v_proj: 2},\n"
                                 "         layers_to_transform: [0]}\n")
    config = parser.instantiate(parsed).model.lora
    assert (config.alpha, config.dropout, config.dora, config.rank_pattern) == (32, 0.05, True, {"v_proj": 2})
    refused = parser.parse_string("model:\n  lora: {bias: all}\n")
    with pytest.raises(ValueError, match="bias='all'"):
        parser.instantiate(refused)


def test_every_peft_field_is_accepted_or_refused_with_a_reason():
    from lit_lowrank.adapters.config import PEFT_REFUSED

    accepted = set(inspect.signature(LoRAConfig).parameters)
    unplaced = [f.name for f in dataclasses.fields(peft.LoraConfig) if f.name not in accepted | set(PEFT_REFUSED)]
    assert not unplaced, f"PEFT fields LoRAConfig neither takes nor explains: {unplaced}"
