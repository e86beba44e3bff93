"""Param groups added after construction (gradual unfreezing), and tensors given twice (issue 22, items 13 and 14).

- LoRAPro gives an adapter pair added by ``add_param_group`` the LoRA-Pro update, exactly as if the pair had been
  trainable from the start; a lone ``lora_A`` or ``lora_B`` is refused, as the constructor refuses one-sided adapters.
- Every optimizer refuses a tensor listed twice, in one group or across groups (torch only warns about the first),
  naming it; a refused group leaves the optimizer as it was.
"""
import re

import pytest
import torch
from torch import nn

from lit_lowrank import LoRAConfig, inject_lora
from lit_lowrank.optim import LoRAPreAdamW, LoRAPreMuon, LoRAPro

pytestmark = pytest.mark.usefixtures("one_thread")


def adapted_net():
    torch.manual_seed(0)  # adapters of two shapes and a trainable head (AdamW)
    net = nn.Sequential(nn.Linear(6, 5), nn.Tanh(), nn.Linear(5, 4), nn.Tanh(), nn.Linear(4, 3))
    net = inject_lora(net, LoRAConfig(r=2, alpha=3.0, target_modules=["0", "2"], modules_to_save=["4"]))
    with torch.no_grad():
        for index in (0, 2):
            net[index].lora_B.normal_(std=0.3)
    return net


def backward(net, step):
    generator = torch.Generator().manual_seed(step)
    x, y = torch.randn(16, 6, generator=generator), torch.randn(16, 3, generator=generator)
    net.zero_grad()
    (net(x) - y).square().mean().backward()


def set_trainable(module, flag):
    module.lora_A.requires_grad_(flag)
    module.lora_B.requires_grad_(flag)


@pytest.mark.parametrize("mode", ["efficient", "full"])
@pytest.mark.parametrize("added_at", [0, 3])
def test_an_adapter_pair_added_later_steps_exactly_as_if_it_had_been_in_the_constructor(mode, added_at):
    """Reference: both adapters trainable from the start, the late one's gradients withheld until ``added_at``
    (a tensor without a gradient is not stepped). Gradual unfreezing: the late adapter frozen at first, then
    unfrozen and added to the optimizer."""
    reference_net, net = adapted_net(), adapted_net()
    reference = LoRAPro(reference_net, lr=1e-2, mode=mode, weight_decay=0.05)
    set_trainable(net[2], False)
    optimizer = LoRAPro(net, lr=1e-2, mode=mode, weight_decay=0.05)
    assert [pair.name for pair in optimizer.pairs] == ["0"]
    for step in range(6):
        if step == added_at:
            set_trainable(net[2], True)
            optimizer.add_param_group({"params": [net[2].lora_B, net[2].lora_A]})
        backward(reference_net, step)
        if step < added_at:
            reference_net[2].lora_A.grad = reference_net[2].lora_B.grad = None
        reference.step()
        backward(net, step)
        optimizer.step()
    for (name, param), expected in zip(net.named_parameters(), reference_net.parameters()):
        assert torch.equal(param, expected), name
    assert [pair.name for pair in optimizer.pairs] == ["0", "2"]
    assert optimizer.param_groups[-1]["lora_pro"] == mode
    late = optimizer.state[net[2].lora_A]
    assert ("weight_exp_avg" in late) == (mode == "full") and ("exp_avg" in late) == (mode == "efficient")
    assert not torch.equal(net[2].lora_A, adapted_net()[2].lora_A)  # it did train


def test_an_added_pair_follows_its_own_group_options():
    net = adapted_net()
    set_trainable(net[2], False)
    optimizer = LoRAPro(net, lr=1e-2)
    set_trainable(net[2], True)
    optimizer.add_param_group({"params": [net[2].lora_A, net[2].lora_B], "lr": 0.0})
    before = [net[2].lora_A.detach().clone(), net[2].lora_B.detach().clone()]
    moving = net[0].lora_A.detach().clone()
    for step in range(2):
        backward(net, step)
        optimizer.step()
    assert torch.equal(net[2].lora_A, before[0]) and torch.equal(net[2].lora_B, before[1])
    assert not torch.equal(net[0].lora_A, moving)
    assert float(optimizer.state[net[2].lora_A]["step"]) == 2  # stepped, with lr 0


@pytest.mark.parametrize("lone", ["lora_A", "lora_B"])
def test_a_lone_adapter_factor_is_refused_with_a_hint_and_nothing_is_added(lone):
    net = adapted_net()
    set_trainable(net[2], False)
    optimizer = LoRAPro(net)
    set_trainable(net[2], True)
    groups_before = [list(group["params"]) for group in optimizer.param_groups]
    missing = "lora_B" if lone == "lora_A" else "lora_A"
    with pytest.raises(ValueError, match=rf"{lone} of adapter '2' is in this param group without its {missing}.*"
                                         r"HINT: add both in one group"):
        optimizer.add_param_group({"params": [getattr(net[2], lone)]})
    assert [list(group["params"]) for group in optimizer.param_groups] == groups_before
    assert [pair.name for pair in optimizer.pairs] == ["0"]


def test_an_added_pair_with_one_trainable_factor_is_refused_like_in_the_constructor():
    net = adapted_net()
    set_trainable(net[2], False)
    optimizer = LoRAPro(net)
    net[2].lora_A.requires_grad_(True)
    with pytest.raises(ValueError, match=r"adapter '2' has only one trainable factor.*HINT: make both trainable"):
        optimizer.add_param_group({"params": [net[2].lora_A, net[2].lora_B]})
    with pytest.raises(ValueError, match=r"adapter '2' has only one trainable factor"):
        LoRAPro(net)


MODULE = nn.Sequential(nn.Linear(8, 6), nn.LayerNorm(6))
WEIGHT, BIAS, NORM = MODULE[0].weight, MODULE[0].bias, MODULE[1].weight
DUPLICATES = {  # (params, where the message finds the tensor, both times)
    "in_one_group": ([WEIGHT, BIAS, WEIGHT], r"at params\[2\] of the group being added is also at params\[0\] of that "
                                             r"group"),
    "across_groups": ([{"params": [WEIGHT, BIAS]}, {"params": [NORM, WEIGHT]}],
                      r"at params\[1\] of the group being added is also at param_groups\[0\]\['params'\]\[0\];"),
    "named": ([("0.weight", WEIGHT), ("0.bias", BIAS), ("again", WEIGHT)],
              r"at params\[2\] \('again'\) of the group being added is also at params\[0\] \('0.weight'\) of that"),
}


@pytest.mark.parametrize("case", list(DUPLICATES))
@pytest.mark.parametrize("optimizer_class", [LoRAPreAdamW, LoRAPreMuon])
def test_a_tensor_given_twice_is_refused_naming_both_places(optimizer_class, case):
    params, where = DUPLICATES[case]
    with pytest.raises(ValueError, match=rf"{optimizer_class.__name__}: the tensor of shape \(6, 8\) {where}.*"
                                         r"stepped twice per step\. HINT: pass each tensor once"):
        optimizer_class(params, rank=2)


@pytest.mark.parametrize("optimizer_class", [LoRAPreAdamW, LoRAPreMuon])
def test_add_param_group_refuses_a_tensor_already_in_the_optimizer_and_adds_nothing(optimizer_class):
    model = nn.Sequential(nn.Linear(8, 6), nn.LayerNorm(6))
    optimizer = optimizer_class(model.parameters(), rank=2, seed=0)
    fresh = optimizer_class(model.parameters(), rank=2, seed=0)
    groups_before = [list(group["params"]) for group in optimizer.param_groups]
    extra = nn.Linear(5, 7)
    with pytest.raises(ValueError, match=r"the tensor of shape \(6,\) at params\[1\] of the group being added is "
                                         r"also at param_groups\[\d\]\['params'\]\[[01]\]"):
        optimizer.add_param_group({"params": [extra.weight, model[0].bias]})
    assert [list(group["params"]) for group in optimizer.param_groups] == groups_before
    # nothing of the refused group was registered: what is added next gets the seed a fresh optimizer gives it
    optimizer.add_param_group({"params": [extra.weight], "lowrank": True})
    fresh.add_param_group({"params": [extra.weight], "lowrank": True})
    assert optimizer.state[extra.weight]["seed"] == fresh.state[extra.weight]["seed"]


def test_lora_pro_refuses_an_adapter_added_twice():
    net = adapted_net()
    optimizer = LoRAPro(net)
    with pytest.raises(ValueError, match=re.escape("LoRAPro: the tensor of shape (2, 6) at params[0] of the group "
                                                   "being added is also at param_groups[0]['params'][0]")):
        optimizer.add_param_group({"params": [net[0].lora_A, net[0].lora_B]})
    with pytest.raises(ValueError, match=re.escape("params[1] of the group being added is also at params[0] of that")):
        optimizer.add_param_group({"params": [nn.Parameter(torch.zeros(3))] * 2})
    assert len(optimizer.param_groups) == 2
