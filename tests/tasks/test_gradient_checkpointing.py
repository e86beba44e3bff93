"""gradient_checkpointing: true recomputes the blocks in backward (each adapted layer runs twice per step) and gives
the loss and adapter gradients of the run without it, dropout included; backbones without support are refused."""
import copy

import pytest
import torch
from tiny_models import _tokens, tiny_bert, tiny_clip, tiny_llama, tiny_vit
from torch import nn

from lit_lowrank import LoRAConfig, inject_lora
from lit_lowrank.adapters import LoRALinear
from lit_lowrank.backbones import Backbone
from lit_lowrank.backbones.checkpointing import enable_gradient_checkpointing
from lit_lowrank.tasks import ImageClassificationTask, SequenceClassificationTask


def count_calls(model) -> list:
    calls = []
    for module in model.modules():
        if isinstance(module, LoRALinear):
            module.register_forward_hook(lambda *_: calls.append(1))
    return calls


def step(model, loss_fn):
    """Loss and trainable gradients of one training step, dropout masks drawn from seed 3."""
    torch.manual_seed(3)
    model.zero_grad()
    loss = loss_fn(model)
    loss.backward()
    return loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}


def assert_same_step(plain, checkpointed, loss_fn, adapted_layers):
    calls = count_calls(checkpointed)
    loss, grads = step(plain, loss_fn)
    loss_again, grads_again = step(checkpointed, loss_fn)
    assert len(calls) == 2 * adapted_layers  # forward, then the recomputation in backward
    assert torch.equal(loss, loss_again)
    assert grads.keys() == grads_again.keys() and all(g.abs().sum() > 0 for g in grads.values())
    for name, grad in grads.items():
        torch.testing.assert_close(grads_again[name], grad, rtol=1e-6, atol=1e-7, msg=name)


def test_llama_with_dropout_has_the_same_loss_and_gradients():
    model = tiny_llama()
    model.config.attention_dropout = 0.2
    for layer in model.model.layers:
        layer.self_attn.attention_dropout = 0.2
    inject_lora(model, LoRAConfig(r=4, dropout=0.1, target_modules=["q_proj", "v_proj"]))
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "lora_B" in name:
                param.normal_(std=0.1)
    checkpointed = enable_gradient_checkpointing(copy.deepcopy(model))
    ids = _tokens()
    assert_same_step(model.train(), checkpointed.train(), lambda m: m(input_ids=ids, labels=ids).loss, adapted_layers=4)


@pytest.mark.parametrize("build, targets, loss_fn, layers", [
    (tiny_vit, ["qkv", "fc1"],
     lambda m: m(torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(0))).square().mean(), 4),
    (tiny_clip, r"transformer\.resblocks\.\d+\.mlp\.c_fc",
     lambda m: m.encode_text(_tokens(1000, 2, 16)).square().mean(), 2),
])
def test_timm_and_open_clip_recompute_non_reentrantly(build, targets, loss_fn, layers):
    model = inject_lora(build(), LoRAConfig(r=2, target_modules=targets, modules_to_save=[]))
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "lora_B" in name:
                param.normal_(std=0.1)
    checkpointed = enable_gradient_checkpointing(copy.deepcopy(model))
    assert_same_step(model.train(), checkpointed.train(), loss_fn, adapted_layers=layers)


def test_the_task_switch_gives_the_loss_and_gradients_of_a_run_without_it():
    def task(**options):
        torch.manual_seed(0)
        return SequenceClassificationTask(Backbone(tiny_bert(), ["query", "value"]),
                                          lora=LoRAConfig(r=2, target_modules="default"), **options)

    batch = {"input_ids": _tokens(), "labels": torch.tensor([0, 2])}
    plain, checkpointed = task(), task(gradient_checkpointing=True)
    for model in (plain, checkpointed):
        with torch.no_grad():
            for name, param in model.named_parameters():
                if "lora_B" in name:
                    param.copy_(torch.randn(param.shape, generator=torch.Generator().manual_seed(1)) * 0.1)
    assert_same_step(plain, checkpointed, lambda t: t.training_step(batch, 0), adapted_layers=4)


def test_a_backbone_without_support_is_refused_when_the_task_is_built():
    model = nn.Sequential(nn.Linear(4, 4))
    model.num_classes, model.default_cfg = 4, {"classifier": "0"}
    with pytest.raises(ValueError, match=r"Sequential has no gradient checkpointing support.*"
                                         r"HINT: set gradient_checkpointing: false"):
        ImageClassificationTask(Backbone(model), gradient_checkpointing=True)
    bert = tiny_bert()
    bert.supports_gradient_checkpointing = False
    with pytest.raises(ValueError, match="does not support gradient checkpointing.*HINT"):
        enable_gradient_checkpointing(bert)


def test_timm_set_to_reentrant_checkpointing_is_refused(monkeypatch):
    import timm.layers.config

    monkeypatch.setattr(timm.layers.config, "_USE_REENTRANT_CKPT", True)
    with pytest.raises(ValueError, match="reentrant.*LoRA adapters get no gradient.*HINT"):
        enable_gradient_checkpointing(tiny_vit())

