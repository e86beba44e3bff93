"""LoRA+ builds PEFT's param groups (peft.optimizers.create_loraplus_optimizer is the reference), for PEFT models and
for our adapters, from Python and from YAML."""
import copy
import re

import pytest
import torch
from tiny_models import tiny_bert

from lit_lowrank import LoRAConfig, inject_lora
from lit_lowrank.optim import build_optimizer
from lit_lowrank.optim.loraplus import LoRAPlusAdamW, create_loraplus_optimizer, loraplus_param_groups

peft = pytest.importorskip("peft")
from peft.optimizers import create_loraplus_optimizer as peft_create_loraplus_optimizer  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_thread")

#: PEFT's names for both libraries: adapters, DoRA magnitudes, a head and LayerNorms trained fully.
OPTIONS = dict(r=2, lora_alpha=4, target_modules=["query", "value"], modules_to_save=["classifier", "LayerNorm"],
               use_dora=True)


def _groups(optimizer, names):
    return [(sorted(names[id(p)] for p in group["params"]), group["lr"], group["weight_decay"])
            for group in optimizer.param_groups if group["params"]]


def _peft_name(name):
    """PEFT's parameter name written as ours: no wrapper prefixes, adapter names or ``.weight`` after a factor."""
    name = name.removeprefix("base_model.model.").replace("modules_to_save.", "").replace(".default", "")
    return re.sub(r"(lora_[AB]|lora_magnitude_vector)\.weight$", r"\1", name)


def test_peft_model_gets_peft_groups():
    model = peft.get_peft_model(tiny_bert(), peft.LoraConfig(**{**OPTIONS, "target_modules": [
        "query", "value", "word_embeddings"]}))  # LoRA on an embedding: the loraplus_lr_embedding group
    names = {id(p): n for n, p in model.named_parameters()}
    options = dict(lr=1e-3, loraplus_lr_ratio=8.0, loraplus_lr_embedding=1e-5, loraplus_weight_decay=0.1, eps=1e-7)
    theirs = peft_create_loraplus_optimizer(model, torch.optim.AdamW, **options)
    ours = create_loraplus_optimizer(model, torch.optim.AdamW, **options)
    assert _groups(ours, names) == _groups(theirs, names)
    assert len(_groups(ours, names)) == 4 and ours.defaults == theirs.defaults


def test_our_adapters_get_the_groups_peft_gives_the_same_model():
    base = tiny_bert()
    ours_model = inject_lora(copy.deepcopy(base), LoRAConfig(**OPTIONS))
    peft_model = peft.get_peft_model(base, peft.LoraConfig(**OPTIONS))
    theirs = peft_create_loraplus_optimizer(peft_model, torch.optim.AdamW, lr=2e-3, loraplus_lr_ratio=16.0,
                                            loraplus_weight_decay=0.01)
    ours = LoRAPlusAdamW(ours_model, lr=2e-3, loraplus_lr_ratio=16.0, weight_decay=0.01)
    their_groups = _groups(theirs, {id(p): _peft_name(n) for n, p in peft_model.named_parameters()})
    assert _groups(ours, {id(p): n for n, p in ours_model.named_parameters()}) == their_groups
    b_group = next(names for names, lr, decay in their_groups if lr == 2e-3 * 16 and decay == 0.01)
    assert any(name.endswith("lora_magnitude_vector") for name in b_group)  # DoRA's magnitude moves with B


def test_b_moves_ratio_times_faster_in_the_first_adam_step():
    model = inject_lora(tiny_bert(), LoRAConfig(r=2, target_modules=["query"], modules_to_save=[], init="random"))
    adapter = model.bert.encoder.layer[0].attention.self.query
    before = adapter.lora_A.detach().clone(), adapter.lora_B.detach().clone()
    optimizer = LoRAPlusAdamW(model, lr=1e-3, loraplus_lr_ratio=16.0)
    model(input_ids=torch.randint(3, 128, (2, 8)), labels=torch.tensor([0, 1])).loss.backward()
    optimizer.step()
    moved_a = (adapter.lora_A - before[0]).abs().max().item()
    moved_b = (adapter.lora_B - before[1]).abs().max().item()
    assert moved_a == pytest.approx(1e-3, rel=1e-2) and moved_b == pytest.approx(16e-3, rel=1e-2)  # Adam: |step| = lr


def test_yaml_names_it_like_any_optimizer():
    from jsonargparse import ArgumentParser
    from lightning.pytorch.cli import OptimizerCallable

    def task(optimizer: OptimizerCallable = torch.optim.AdamW):
        return optimizer

    parser = ArgumentParser(exit_on_error=False)
    parser.add_function_arguments(task, "model")
    parsed = parser.parse_string("model:\n  optimizer:\n    class_path: lit_lowrank.optim.loraplus.LoRAPlusAdamW\n"
                                 "    init_args: {lr: 0.001, loraplus_lr_ratio: 8, weight_decay: 0.1}\n")
    model = inject_lora(tiny_bert(), LoRAConfig(r=2, target_modules=["query"], modules_to_save=["classifier"]))
    optimizer = build_optimizer(parser.instantiate(parsed).model.optimizer, model)
    expected = loraplus_param_groups(model, lr=1e-3, loraplus_lr_ratio=8, weight_decay=0.1)
    assert isinstance(optimizer, LoRAPlusAdamW)
    assert [[id(p) for p in g["params"]] for g in optimizer.param_groups] == [[id(p) for p in g["params"]]
                                                                             for g in expected]
    assert [g["lr"] for g in optimizer.param_groups] == [1e-3, 8e-3, 8e-3]


def test_mistakes_are_named():
    with pytest.raises(ValueError, match="no trainable lora_B.*HINT"):
        LoRAPlusAdamW(tiny_bert(), lr=1e-3)
    model = inject_lora(tiny_bert(), LoRAConfig(r=2, target_modules=["query"]))
    with pytest.raises(TypeError, match="needs the model.*HINT"):
        loraplus_param_groups(model.parameters(), lr=1e-3, loraplus_lr_ratio=16)
    with pytest.raises(ValueError, match="invalid loraplus_lr_ratio 0"):
        LoRAPlusAdamW(model, lr=1e-3, loraplus_lr_ratio=0)
    with pytest.raises(ValueError, match="weight_decay=0.1 and loraplus_weight_decay=0.2, two names"):
        create_loraplus_optimizer(model, torch.optim.AdamW, lr=1e-3, loraplus_lr_ratio=16, weight_decay=0.1,
                                  loraplus_weight_decay=0.2)
