"""Every numeric hyper-parameter of every optimizer is checked the same way, in the constructor and in
``add_param_group``: finite and in range, or a ValueError naming the parameter, the value, the valid range and a
HINT (issue 22, item 12). ``LoRAPro(lr=inf)`` used to be accepted and turn the parameters NaN two steps later."""
import math
import re

import pytest
import torch
from torch import nn

from lit_lowrank import LoRAConfig, inject_lora
from lit_lowrank.optim import LoRAPreAdamW, LoRAPreMuon, LoRAPro

pytestmark = pytest.mark.usefixtures("one_thread")

NAN, INF = math.nan, math.inf

# (keyword, bad value, the range the message must state); for every optimizer that takes the keyword
SHARED = [
    ("lr", INF, "[0, inf)"), ("lr", NAN, "[0, inf)"), ("lr", -1e-3, "[0, inf)"), ("lr", "1e-3", "[0, inf)"),
    ("betas", (1.0, 0.999), "[0, 1)"), ("betas", (0.9, NAN), "[0, 1)"), ("betas", (0.9, -0.1), "[0, 1)"),
    ("betas", (0.9,), "[0, 1)"), ("betas", 0.9, "[0, 1)"), ("betas", (True, 0.9), "[0, 1)"),
    ("eps", INF, "[0, inf)"), ("eps", NAN, "[0, inf)"), ("eps", -1e-8, "[0, inf)"),
    ("weight_decay", INF, "[0, inf)"), ("weight_decay", NAN, "[0, inf)"), ("weight_decay", -0.1, "[0, inf)"),
]
LOW_RANK = [
    ("rank", 0, "an int >= 1"), ("rank", 2.5, "an int >= 1"), ("rank", True, "an int >= 1"),
    ("damping", 0.0, "(0, 1]"), ("damping", 1.5, "(0, 1]"), ("damping", NAN, "(0, 1]"), ("damping", INF, "(0, 1]"),
    ("seed", 1.5, "an int >= "), ("seed", "0", "an int >= "),
]
ADAM = SHARED + LOW_RANK + [
    ("scale", 0.0, "(0, inf)"), ("scale", INF, "(0, inf)"), ("scale", NAN, "(0, inf)"),
    ("chunk_rows", 0, "an int >= 1 or None"), ("chunk_rows", 2.0, "an int >= 1 or None"),
]
MUON = [(k, v, r) for k, v, r in SHARED if k != "betas" and k != "eps"] + LOW_RANK + [
    ("momentum", 1.0, "[0, 1)"), ("momentum", NAN, "[0, 1)"), ("momentum", -0.5, "[0, 1)"),
    ("ns_steps", 0, "an int >= 1"), ("ns_steps", 5.0, "an int >= 1"),
    ("adamw_lr", INF, "[0, inf)"), ("adamw_lr", -1.0, "[0, inf)"), ("adamw_betas", (0.9, 1.0), "[0, 1)"),
    ("adamw_eps", NAN, "[0, inf)"), ("adamw_weight_decay", INF, "[0, inf)"),
]
PRO = SHARED + [
    ("lr", torch.tensor(INF), "[0, inf)"),
    ("damping", -1e-8, "[0, 1)"), ("damping", 1.0, "[0, 1)"), ("damping", NAN, "[0, 1)"),
    ("max_grad_norm", 0.0, "(0, inf)"), ("max_grad_norm", INF, "(0, inf)"), ("max_grad_norm", NAN, "(0, inf)"),
    ("max_grad_norm", -1.0, "(0, inf)"),
]
GROUP_KEYS = {"lr", "betas", "eps", "weight_decay", "rank", "damping", "scale", "chunk_rows", "momentum", "ns_steps"}


def adapted_net():
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(6, 5), nn.Tanh(), nn.Linear(5, 3))
    return inject_lora(net, LoRAConfig(r=2, target_modules=["0", "2"]))


def build(optimizer_class, **kwargs):
    if optimizer_class is LoRAPro:
        return LoRAPro(adapted_net(), **kwargs)
    return optimizer_class(nn.Sequential(nn.Linear(8, 6), nn.LayerNorm(6)).parameters(), **{"rank": 2, **kwargs})


def message_for(optimizer_class, key, value, interval):
    """What the error must say: the optimizer, the key and the value, the range, a HINT."""
    expected = re.escape(interval)
    return rf"{optimizer_class.__name__}: invalid {key} {re.escape(repr(value))}; expected .*{expected}.*HINT: "


TABLE = ([pytest.param(LoRAPreAdamW, *row, id=f"adam-{row[0]}={row[1]!r}") for row in ADAM]
         + [pytest.param(LoRAPreMuon, *row, id=f"muon-{row[0]}={row[1]!r}") for row in MUON]
         + [pytest.param(LoRAPro, *row, id=f"lora_pro-{row[0]}={row[1]!r}") for row in PRO])


@pytest.mark.parametrize("optimizer_class, key, value, interval", TABLE)
def test_the_constructor_refuses_a_bad_value_naming_it_and_its_range(optimizer_class, key, value, interval):
    with pytest.raises(ValueError, match=message_for(optimizer_class, key, value, interval)):
        build(optimizer_class, **{key: value})


@pytest.mark.parametrize("optimizer_class, key, value, interval",
                         [row for row in TABLE if row.values[1] in GROUP_KEYS])
def test_add_param_group_refuses_it_too_and_adds_nothing(optimizer_class, key, value, interval):
    optimizer = build(optimizer_class)
    before = [list(group["params"]) for group in optimizer.param_groups]
    group = {"params": [nn.Linear(7, 5).weight], key: value}
    if optimizer_class is LoRAPreMuon:
        group["lowrank"] = True
    with pytest.raises(ValueError, match=message_for(optimizer_class, key, value, interval)):
        optimizer.add_param_group(group)
    assert [list(group["params"]) for group in optimizer.param_groups] == before


@pytest.mark.parametrize("optimizer_class", [LoRAPreAdamW, LoRAPreMuon, LoRAPro])
def test_the_edges_of_every_range_are_accepted_and_train(optimizer_class):
    """The closed ends of the ranges: lr, eps and weight decay 0, betas (0, 0), the largest damping."""
    edges = dict(lr=0.0, weight_decay=0.0)
    if optimizer_class is LoRAPreMuon:
        edges.update(momentum=0.0, damping=1.0, adamw_lr=0.0, adamw_betas=(0.0, 0.0), adamw_eps=0.0)
    else:
        edges.update(betas=(0.0, 0.0), eps=0.0)
        edges.update(damping=1.0 if optimizer_class is LoRAPreAdamW else 0.0)
    optimizer = build(optimizer_class, **edges)
    params = [p for group in optimizer.param_groups for p in group["params"]]
    before = [p.detach().clone() for p in params]
    for p in params:
        p.grad = torch.ones_like(p)
    optimizer.step()
    assert all(torch.equal(p, b) for p, b in zip(params, before))  # lr = 0: nothing moves, nothing turns NaN


def test_lora_pro_with_infinite_lr_is_refused_where_it_used_to_make_nan_two_steps_later():
    with pytest.raises(ValueError, match=r"LoRAPro: invalid lr inf; expected a finite number"):
        LoRAPro(adapted_net(), lr=INF)


def test_lora_pro_takes_a_finite_0_d_tensor_lr_and_full_mode_refuses_a_decay_that_flips_the_factors():
    net = adapted_net()
    LoRAPro(net, lr=torch.tensor(1e-3))
    with pytest.raises(ValueError, match=r"lr \* weight_decay = 2 > 1 in full mode.*HINT: lower weight_decay"):
        LoRAPro(net, lr=0.5, weight_decay=4.0, mode="full")
    LoRAPro(net, lr=0.5, weight_decay=4.0, mode="efficient")  # AdamW's (1 - lr wd) is real: allowed as in torch


def test_lora_pre_refuses_a_tensor_lr_and_non_bool_flags():
    with pytest.raises(ValueError, match=r"LoRAPreAdamW: lr as a Tensor is not supported \(got tensor\(0\.0010\)\)"):
        build(LoRAPreAdamW, lr=torch.tensor(1e-3))
    with pytest.raises(ValueError, match=r"LoRAPro: Tensor lr must be 1-element and 0-d, floating; got shape \(1,\)"):
        build(LoRAPro, lr=torch.tensor([1e-3]))
    with pytest.raises(TypeError, match=r"LoRAPreMuon: invalid nesterov 'yes'; expected True or False"):
        build(LoRAPreMuon, nesterov="yes")
    with pytest.raises(TypeError, match=r"LoRAPreAdamW: invalid debias_second_moment 1"):
        build(LoRAPreAdamW, debias_second_moment=1)
