"""LoRA-Pre through timm's optimizer factory and schedulers, after register_timm_optimizers()."""
import copy
import functools
import logging
import re
from pathlib import Path

import pytest
import torch
from timm.optim import create_optimizer_v2, list_optimizers
from timm.scheduler import create_scheduler_v2
from tiny_models import tiny_vit

from lit_lowrank.integrations import register_timm_optimizers
from lit_lowrank.optim import LoRAPreAdamW, LoRAPreMuon, lowrank_param_groups

pytestmark = pytest.mark.usefixtures("one_thread")

DIRECT = {
    "lorapreadamw": lambda params: LoRAPreAdamW(params, lr=1e-3, rank=4, seed=0),
    "lorapremuon": lambda params: LoRAPreMuon(params, lr=0.02, momentum=0.95, rank=4, seed=0),
}
THROUGH_TIMM = {
    "lorapreadamw": lambda model, **options: create_optimizer_v2(model, "lorapreadamw", lr=1e-3, rank=4, seed=0,
                                                                 **options),
    "lorapremuon": lambda model, **options: create_optimizer_v2(model, "lorapremuon", lr=0.02, momentum=0.95,
                                                                rank=4, seed=0, **options),
}


@pytest.fixture(scope="module", autouse=True)
def registered():
    return register_timm_optimizers()


def _batches(count=6):
    generator = torch.Generator().manual_seed(3)
    return [(torch.randn(4, 3, 32, 32, generator=generator), torch.randint(0, 5, (4,), generator=generator))
            for _ in range(count)]


def _train(model, optimizer, batches, scheduler=None, first_update=0):
    for update, (images, labels) in enumerate(batches, start=first_update + 1):
        optimizer.zero_grad()
        torch.nn.functional.cross_entropy(model(images), labels).backward()
        optimizer.step()
        if scheduler is not None:
            scheduler.step_update(update)
    return model


def _assert_same_parameters(model, expected):
    for (name, param), reference in zip(model.named_parameters(), expected.parameters()):
        assert torch.equal(param, reference), name


def test_registered_once_under_names_timm_can_parse(registered, caplog):
    assert registered == ("lorapreadamw", "lorapremuon")
    assert set(registered) <= set(list_optimizers())
    with caplog.at_level(logging.WARNING):
        register_timm_optimizers()
    assert "already registered" not in caplog.text
    # Why the names have no underscore: timm keeps only the last part of such a name.
    assert type(create_optimizer_v2(tiny_vit(), "lora_pre_adamw")) is torch.optim.AdamW


@pytest.mark.parametrize("name", sorted(DIRECT))
def test_the_one_liner_is_the_optimizer_built_directly(name):
    model = tiny_vit()
    reference = copy.deepcopy(model)
    optimizer = THROUGH_TIMM[name](model)
    assert type(optimizer) is type(DIRECT[name](reference.parameters()))
    _train(model, optimizer, _batches(3))
    _train(reference, DIRECT[name](reference.parameters()), _batches(3))
    _assert_same_parameters(model, reference)
    assert optimizer.state_bytes().factors > 0


def test_weight_decay_groups_and_fallback_list_follow_timm():
    model = tiny_vit()
    optimizer = THROUGH_TIMM["lorapreadamw"](model, weight_decay=0.05, fallback_list=["head.*"])
    _train(model, optimizer, _batches(1))
    decay = {id(param): group["weight_decay"] for group in optimizer.param_groups for param in group["params"]}
    head, qkv = model.head.weight, model.blocks[0].attn.qkv
    assert (decay[id(qkv.weight)], decay[id(qkv.bias)], decay[id(model.pos_embed)]) == (0.05, 0.0, 0.0)
    assert optimizer.state[qkv.weight]["A"].shape == (4, qkv.weight.shape[1])  # factored at rank 4
    assert "A" not in optimizer.state[head] and optimizer.state[head]["exp_avg"].shape == head.shape  # AdamW


def test_everything_in_fallback_is_timms_adamw_bitwise():
    model = tiny_vit()
    reference = copy.deepcopy(model)
    _train(model, THROUGH_TIMM["lorapreadamw"](model, weight_decay=0.05, fallback_list=["*"]), _batches(3))
    _train(reference, create_optimizer_v2(reference, "adamw", lr=1e-3, weight_decay=0.05), _batches(3))
    _assert_same_parameters(model, reference)


def test_a_matrix_too_small_for_the_rank_is_refused_in_timms_terms():
    with pytest.raises(ValueError, match=r"5 x 32 matrix.*rank 16.*HINT: .*fallback_list=\['head\.\*'\]"):
        create_optimizer_v2(tiny_vit(), "lorapreadamw", lr=1e-3)


def _scheduled(model, name):
    optimizer = (THROUGH_TIMM[name](model) if name != "adamw"
                 else create_optimizer_v2(model, "adamw", lr=1e-3))
    scheduler, _ = create_scheduler_v2(optimizer, sched="cosine", num_epochs=2, warmup_epochs=1, warmup_lr=1e-5,
                                       step_on_epochs=False, updates_per_epoch=3)
    return optimizer, scheduler


def test_timm_scheduler_drives_the_lr_and_a_run_resumes_bitwise():
    batches = _batches(6)
    model = tiny_vit()
    optimizer, scheduler = _scheduled(model, "lorapreadamw")
    adamw, adamw_scheduler = _scheduled(tiny_vit(), "adamw")
    lrs, adamw_lrs = [], []
    for update in range(1, 7):
        _train(model, optimizer, batches[update - 1:update], scheduler, first_update=update - 1)
        adamw_scheduler.step_update(update)
        lrs.append([group["lr"] for group in optimizer.param_groups])
        adamw_lrs.append([group["lr"] for group in adamw.param_groups])
        if update == 3:
            saved = copy.deepcopy((model.state_dict(), optimizer.state_dict(), scheduler.state_dict()))
    assert lrs == adamw_lrs and len({lr[0] for lr in lrs}) == 6  # timm's schedule, one lr per update

    torch.manual_seed(1)  # other initial weights: what the resumed run ends with must come from the checkpoint
    resumed_model = tiny_vit()
    resumed_optimizer, resumed_scheduler = _scheduled(resumed_model, "lorapreadamw")
    resumed_model.load_state_dict(saved[0])
    resumed_optimizer.load_state_dict(saved[1])
    resumed_scheduler.load_state_dict(saved[2])
    _train(resumed_model, resumed_optimizer, batches[3:], resumed_scheduler, first_update=3)
    _assert_same_parameters(resumed_model, model)


def test_param_group_fn_gives_lit_lowranks_own_grouping():
    model = tiny_vit()
    optimizer = create_optimizer_v2(model, "lorapreadamw", lr=1e-3, rank=16,  # the head (5 x 32) is not refused
                                    param_group_fn=functools.partial(lowrank_param_groups, rank=4))
    lowrank = [name for group in optimizer.param_groups if group["lowrank"] for name in group["param_names"]]
    assert lowrank == [name for name, param in model.named_parameters()
                       if name.startswith("blocks.") and param.ndim == 2]


def _docs_example(heading):
    """The Python block under ``## heading`` in docs/integrations.md."""
    page = (Path(__file__).resolve().parents[2] / "docs" / "integrations.md").read_text()
    return re.search(rf"## {re.escape(heading)}\n.*?```python\n(.*?)```", page, re.S).group(1)


def test_the_docs_example_runs(capsys):
    exec(compile(_docs_example("timm"), "docs/integrations.md", "exec"), {})
    assert "StateBytes" in capsys.readouterr().out
