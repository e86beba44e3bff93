"""lowrank_param_groups on the five supported model families (tiny configs), and its include/exclude overrides."""

import re

import pytest
import torch
from tiny_models import FAMILIES
from torch import nn

from lit_lowrank.optim import LoRAPreAdamW, LoRAPreMuon, lowrank_param_groups, param_group_names

# The matrices each family must put in the low-rank group, per transformer block (name after the block prefix).
BLOCK_MATRICES = {
    "llama": (
        "model.layers.{i}.",
        [f"self_attn.{n}_proj.weight" for n in "qkvo"] + [f"mlp.{n}_proj.weight" for n in ("gate", "up", "down")],
    ),
    "gpt2": (
        "transformer.h.{i}.",
        ["attn.c_attn.weight", "attn.c_proj.weight", "mlp.c_fc.weight", "mlp.c_proj.weight"],
    ),
    "bert": (
        "bert.encoder.layer.{i}.",
        [
            "attention.self.query.weight",
            "attention.self.key.weight",
            "attention.self.value.weight",
            "attention.output.dense.weight",
            "intermediate.dense.weight",
            "output.dense.weight",
        ],
    ),
    "vit": ("blocks.{i}.", ["attn.qkv.weight", "attn.proj.weight", "mlp.fc1.weight", "mlp.fc2.weight"]),
    "clip": (
        "{tower}transformer.resblocks.{i}.",
        ["attn.in_proj_weight", "attn.out_proj.weight", "mlp.c_fc.weight", "mlp.c_proj.weight"],
    ),
}
# Matrices that must stay out of the low-rank group: embeddings, heads, poolers, projections outside blocks.
ADAMW_MATRICES = {
    "llama": ["model.embed_tokens.weight", "lm_head.weight"],
    "gpt2": ["transformer.wte.weight", "transformer.wpe.weight"],  # lm_head is tied to wte
    "bert": ["bert.embeddings.word_embeddings.weight", "bert.pooler.dense.weight", "classifier.weight"],
    "vit": ["head.weight", "pos_embed", "patch_embed.proj.weight"],
    "clip": ["token_embedding.weight", "visual.proj", "text_projection", "positional_embedding"],
}


pytestmark = pytest.mark.usefixtures("one_thread")  # tiny tensors (tests/optim/conftest.py)


def expected_lowrank_names(family):
    prefix, suffixes = BLOCK_MATRICES[family]
    towers = ("visual.", "") if family == "clip" else ("",)
    return {prefix.format(i=i, tower=t) + s for t in towers for i in range(2) for s in suffixes}


@pytest.fixture(scope="module", params=sorted(FAMILIES))
def family_model(request):
    torch.manual_seed(0)
    model, inputs, forward = FAMILIES[request.param]()
    return request.param, model, inputs, forward


def test_detects_the_block_matrices_of_each_family(family_model):
    family, model, _, _ = family_model
    lowrank, adamw = lowrank_param_groups(model, rank=4, scale=0.25)
    assert set(lowrank["param_names"]) == expected_lowrank_names(family)
    assert (lowrank["lowrank"], lowrank["rank"], lowrank["scale"], adamw["lowrank"]) == (True, 4, 0.25, False)
    assert set(ADAMW_MATRICES[family]) <= set(adamw["param_names"])
    # Each trainable tensor exactly once, names aligned with tensors.
    named = dict(model.named_parameters())
    grouped = lowrank["params"] + adamw["params"]
    assert len({id(p) for p in grouped}) == len(grouped) == len(named)
    for group in (lowrank, adamw):
        assert all(named[name] is param for name, param in zip(group["param_names"], group["params"]))
    assert all(param.ndim == 2 for param in lowrank["params"])


def test_both_optimizers_train_each_family_with_the_groups(family_model):
    _, model, inputs, forward = family_model
    for optimizer_class in (LoRAPreAdamW, LoRAPreMuon):
        optimizer = optimizer_class(model, rank=4)
        optimizer.zero_grad()
        forward(model, inputs).float().square().mean().backward()
        optimizer.step()
        assert optimizer.state_bytes().factors > 0
        assert param_group_names(optimizer) == [g["param_names"] for g in lowrank_param_groups(model, rank=4)]


def test_frozen_parameters_are_left_out():
    model = nn.Sequential(nn.ModuleList([nn.Linear(8, 8), nn.Linear(8, 8)]))
    model[0][0].requires_grad_(False)
    names = [name for group in lowrank_param_groups(model) for name in group["param_names"]]
    assert names == ["0.1.weight", "0.1.bias"]


def test_include_and_exclude_override_the_detection():
    torch.manual_seed(0)
    model = nn.ModuleDict(
        {"stem": nn.Linear(8, 8), "blocks": nn.ModuleList([nn.Linear(8, 8), nn.Linear(8, 4)]), "norm": nn.LayerNorm(4)}
    )
    default = lowrank_param_groups(model)[0]["param_names"]
    assert default == ["blocks.0.weight", "blocks.1.weight"]  # the stem is not inside a repeated block
    # A regex matches a whole parameter or module name (the rule of LoRAConfig.target_modules).
    by_regex = lowrank_param_groups(model, include=r"stem", exclude=r"blocks\.1\..*")[0]["param_names"]
    assert by_regex == ["stem.weight", "blocks.0.weight"]
    by_suffix = lowrank_param_groups(model, include=["stem"], exclude=["blocks.0.weight"])[0]["param_names"]
    assert by_suffix == ["stem.weight", "blocks.1.weight"]
    # include never puts a vector (the LayerNorm's weight) in the low-rank group
    assert lowrank_param_groups(model, include=["norm"])[0]["param_names"] == default


def test_heads_and_containers_of_heads_stay_on_adamw():
    # a multi-task `heads` list inside the repeated blocks' model: every head matrix stays AdamW, like a `head`
    model = nn.ModuleDict({"blocks": nn.ModuleList([nn.Linear(16, 16), nn.Linear(16, 16)]),
                           "heads": nn.ModuleList([nn.Linear(16, 12), nn.Linear(16, 12)]), "head": nn.Linear(16, 12)})
    lowrank, adamw = lowrank_param_groups(model, rank=4)
    assert lowrank["param_names"] == ["blocks.0.weight", "blocks.1.weight"]
    assert {"heads.0.weight", "heads.1.weight", "head.weight"} <= set(adamw["param_names"])


def test_a_model_without_block_matrices_gives_only_the_adamw_group():
    groups = lowrank_param_groups(nn.Linear(4, 4))
    assert [g["lowrank"] for g in groups] == [False] and param_group_names(groups) == [["weight", "bias"]]


def test_a_model_with_lora_adapters_is_refused_not_turned_into_adamw():
    # With adapters no full matrix is trainable: the groups used to be one AdamW group (factors=0), silently.
    from lit_lowrank import LoRAConfig, inject_lora

    model = nn.Sequential(nn.ModuleList([nn.Linear(8, 8), nn.Linear(8, 8)]))
    inject_lora(model, LoRAConfig(r=2, target_modules="all-linear"))
    with pytest.raises(ValueError, match=r"2 trainable LoRA adapter\(s\).*HINT: .*lora: null.*LoRAPro or torch"):
        lowrank_param_groups(model)
    for optimizer_class in (LoRAPreAdamW, LoRAPreMuon):
        with pytest.raises(ValueError, match="LoRA adapter"):
            optimizer_class(model, rank=2)


def test_a_regex_the_one_rule_would_read_differently_is_refused_naming_the_difference():
    # These were searched anywhere in parameter names before regexes followed LoRAConfig.target_modules' rule.
    model = nn.ModuleDict({"stem": nn.Linear(8, 8), "blocks": nn.ModuleList([nn.Linear(8, 8), nn.Linear(8, 4)])})
    anchored = r"^stem\."
    with pytest.raises(ValueError, match=re.escape(f"include={anchored!r}") + r".*re\.fullmatch.*gains \[\] and loses "
                                         r"\[stem\.weight\].*2 tensors instead of 3.*HINT"):
        lowrank_param_groups(model, include=anchored)
    with pytest.raises(ValueError, match=r"exclude='1'.*gains \[blocks\.1\.weight\] and loses \[\]"):
        lowrank_param_groups(model, exclude="1")
