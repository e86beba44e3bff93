"""LoRA-Pre on PEFT models: PEFT's adapters are treated like lit_lowrank's own. With trainable adapters the model is
refused with the same hint (PEFT's ``lora_A``/``lora_B`` used to land in the low-rank group and get factored); with
the adapters frozen and the base weights trained, both give the same low-rank group. And without ``peft`` the
adapter lookups are no-ops, not errors."""
import copy
import sys

import pytest
import torch
from tiny_models import tiny_llama
from torch import nn

from lit_lowrank import LoRAConfig, inject_lora
from lit_lowrank.adapters.peft_layers import trainable_peft_layer_names
from lit_lowrank.optim import LoRAPreAdamW, LoRAPreMuon, LoRAPro, apply_lora_pro_, lowrank_param_groups
from lit_lowrank.optim.factory import check_optimizer_fits_model
from lit_lowrank.optim.lora_pre.groups import trainable_adapter_names

peft = pytest.importorskip("peft")

pytestmark = pytest.mark.usefixtures("one_thread")

TARGETS = ["q_proj", "v_proj", "down_proj"]
ADAPTERS = {
    "ours": lambda model: inject_lora(model, LoRAConfig(r=4, target_modules=TARGETS, modules_to_save=[])),
    "peft": lambda model: peft.get_peft_model(model, peft.LoraConfig(r=4, target_modules=TARGETS)),
}
REFUSAL = r"has 6 trainable LoRA adapter\(s\) \(e\.g\. '.*layers\.0\.self_attn\.q_proj'\).*HINT: .*lora: null.*" \
          r"peft\.get_peft_model.*LoRAPro or torch\.optim\.AdamW"


@pytest.mark.parametrize("kind", sorted(ADAPTERS))
def test_a_model_with_trainable_adapters_is_refused_the_same_way(kind):
    model = ADAPTERS[kind](tiny_llama())
    with pytest.raises(ValueError, match=REFUSAL):
        lowrank_param_groups(model, rank=2)
    for optimizer_class in (LoRAPreAdamW, LoRAPreMuon):
        with pytest.raises(ValueError, match=REFUSAL):
            optimizer_class(model, rank=2)
        with pytest.raises(ValueError, match=r"with LoRA adapters would train the adapters with plain AdamW.*HINT"):
            check_optimizer_fits_model(optimizer_class, model)


def test_the_refusal_names_the_peft_layers():
    model = ADAPTERS["peft"](tiny_llama())
    names = trainable_adapter_names(model)
    assert names == [f"base_model.model.model.layers.{i}.{part}" for i in range(2)
                     for part in ("self_attn.q_proj", "self_attn.v_proj", "mlp.down_proj")]


def test_other_peft_methods_are_refused_too():
    model = peft.get_peft_model(tiny_llama(), peft.LoHaConfig(r=2, target_modules=["q_proj"]))
    with pytest.raises(ValueError, match=r"2 trainable LoRA adapter\(s\).*HINT"):
        LoRAPreAdamW(model, rank=2)


def _base_weight_name(name: str) -> str:
    return name.removeprefix("base_model.model.")


def test_frozen_adapters_and_trained_base_weights_give_the_same_groups():
    torch.manual_seed(0)
    base = tiny_llama()
    groups = {}
    for kind, adapt in ADAPTERS.items():
        model = adapt(copy.deepcopy(base))
        for name, param in model.named_parameters():
            param.requires_grad_("lora_" not in name)  # adapters frozen, everything else trained
        groups[kind] = [[_base_weight_name(n) for n in g["param_names"]] for g in lowrank_param_groups(model, rank=2)]
    assert groups["ours"] == groups["peft"]
    lowrank = groups["peft"][0]
    assert "model.layers.0.self_attn.q_proj.base_layer.weight" in lowrank and len(lowrank) == 14
    assert not any("lora_" in name for group in groups["peft"] for name in group)


def test_modules_to_save_copies_are_not_adapters():
    model = peft.get_peft_model(nn.Sequential(nn.Linear(6, 4), nn.Linear(4, 2)),
                                peft.LoraConfig(r=2, target_modules=["0"], modules_to_save=["1"]))
    model.base_model.model[0].requires_grad_(False)  # the adapters frozen: only the saved module trains
    assert trainable_adapter_names(model) == []
    names = [n for g in lowrank_param_groups(model) for n in g["param_names"]]
    assert names == [f"base_model.model.1.modules_to_save.default.{leaf}" for leaf in ("weight", "bias")]


def test_without_peft_the_lookups_find_nothing_and_our_adapters_still_work(monkeypatch):
    # The library never imports peft: it looks PEFT's classes up in sys.modules, where a run without peft has none.
    peft_model = peft.get_peft_model(tiny_llama(), peft.LoraConfig(r=2, target_modules=["q_proj"]))
    for module in [name for name in sys.modules if name == "peft" or name.startswith("peft.")]:
        monkeypatch.delitem(sys.modules, module)
    monkeypatch.setitem(sys.modules, "peft", None)  # `import peft` now raises ImportError
    assert trainable_peft_layer_names(peft_model) == []
    ours = inject_lora(nn.Sequential(nn.Linear(4, 4)), LoRAConfig(r=2, target_modules=["0"]))
    ours(torch.randn(3, 4)).sum().backward()
    assert apply_lora_pro_(ours) == 1 and len(LoRAPro(ours).pairs) == 1
    with pytest.raises(ValueError, match="1 trainable LoRA adapter"):
        lowrank_param_groups(ours)
