"""One rule for name patterns: LoRAConfig's targets and lowrank_param_groups' include/exclude read a pattern alike."""
import pytest
from torch import nn

from lit_lowrank import LoRAConfig, inject_lora
from lit_lowrank.adapters.patterns import name_matches
from lit_lowrank.optim import lowrank_param_groups

NAME = "model.layers.0.self_attn.q_proj"


@pytest.mark.parametrize("pattern, selected", [
    (r".*\.q_proj", True),  # a regex must match the whole name
    (r"model\.layers\.0\.self_attn\.q_proj", True),
    ("q_proj", False),  # ... so a bare fragment does not (it is no longer searched for)
    (r"layers\.0", False),
    (["q_proj"], True),  # a list holds names or suffixes starting after a "."
    (["self_attn.q_proj"], True),
    (["proj"], False),
    ([NAME], True),
    (None, False),
])
def test_the_rule(pattern, selected):
    assert name_matches(NAME, pattern) is selected


def blocks():
    return nn.ModuleDict({"blocks": nn.ModuleList(
        nn.ModuleDict({"q_proj": nn.Linear(8, 8), "kq_proj": nn.Linear(8, 8), "mlp": nn.Linear(8, 8)})
        for _ in range(2))})


@pytest.mark.parametrize("pattern", [r"blocks\.1\..*", r".*\.q_proj", ["q_proj"], ["1.mlp", "0.kq_proj"]])
def test_adapters_and_low_rank_groups_select_the_same_modules(pattern):
    every_matrix = set(lowrank_param_groups(blocks())[0]["param_names"])
    excluded = every_matrix - set(lowrank_param_groups(blocks(), exclude=pattern)[0]["param_names"])
    adapted = inject_lora(blocks(), LoRAConfig(r=2, target_modules=pattern)).lora_injection.adapted
    assert sorted(name.removesuffix(".weight") for name in excluded) == sorted(adapted) != []
