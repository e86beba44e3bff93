"""LoRAPro clips what it rewrote (dA, dB or g~), never the raw LoRA gradients; tasks route gradient_clip_val to it."""
import copy

import lightning as L
import pytest
import torch
from torch import nn

from lit_lowrank import LoRAConfig, inject_lora
from lit_lowrank.adapters import lora_modules
from lit_lowrank.optim import LoRAPro, apply_lora_pro_, equivalent_gradient
from lit_lowrank.tasks import LowRankTask

MAX_NORM = 0.05


def _model():
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(10, 12), nn.Tanh(), nn.Linear(12, 12), nn.Tanh(), nn.Linear(12, 3))
    inject_lora(net, LoRAConfig(r=3, alpha=6, target_modules=["0", "2"], modules_to_save=["4"]))
    with torch.no_grad():
        for _, adapter in lora_modules(net):
            adapter.lora_B.normal_(std=0.3)
    return net


def _backward(net, seed):
    generator = torch.Generator().manual_seed(seed)
    x, y = torch.randn(16, 10, generator=generator), torch.randn(16, 3, generator=generator)
    nn.functional.mse_loss(net(x), y).mul(50).backward()  # large enough that clipping is active


def _trainable(net):
    return [p for p in net.parameters() if p.requires_grad]


def test_efficient_mode_clips_the_rewritten_gradients_like_rewrite_then_clip_then_adamw():
    net, reference = _model(), _model()
    optimizer = LoRAPro(net, lr=1e-2, weight_decay=0.1, max_grad_norm=MAX_NORM)
    adamw = torch.optim.AdamW(_trainable(reference), lr=1e-2, weight_decay=0.1)
    clipped_norms = []
    for seed in range(3):
        for model in (net, reference):
            model.zero_grad()
            _backward(model, seed)
        optimizer.step()
        apply_lora_pro_(reference)
        clipped_norms.append(float(torch.nn.utils.clip_grad_norm_(_trainable(reference), MAX_NORM)))
        adamw.step()
    assert min(clipped_norms) > 5 * MAX_NORM, "the test must exercise clipping"
    for name, param in net.named_parameters():
        torch.testing.assert_close(param, reference.get_parameter(name), rtol=1e-5, atol=1e-6)


def test_clipping_the_raw_gradients_would_differ():
    net, raw = _model(), _model()
    optimizer = LoRAPro(net, lr=1e-2, max_grad_norm=MAX_NORM)
    raw_optimizer = LoRAPro(raw, lr=1e-2)
    for seed in range(3):  # Adam's first step ignores a uniform scale, later steps do not
        for model in (net, raw):
            model.zero_grad()
            _backward(model, seed)
        torch.nn.utils.clip_grad_norm_(_trainable(raw), MAX_NORM)  # what a trainer would do before step
        optimizer.step()
        raw_optimizer.step()
    assert not torch.allclose(net[0].lora_B, raw[0].lora_B, rtol=1e-4, atol=1e-6)


def test_full_mode_clips_the_equivalent_gradient():
    net, reference = _model(), _model()
    _backward(net, 0)
    _backward(reference, 0)
    # independent norm: dense g~ of each adapter (built from its own gradients) plus the head's gradients
    squares = [g.square().sum() for g in (reference[4].weight.grad, reference[4].bias.grad)]
    for _, adapter in lora_modules(reference):
        dense = equivalent_gradient(adapter.lora_A.detach().double(), adapter.lora_B.detach().double(),
                                    adapter.lora_A.grad.double(), adapter.lora_B.grad.double(), adapter.scaling,
                                    dense=True)
        squares.append(dense.square().sum())
    coefficient = min(1.0, MAX_NORM / (float(sum(squares)) ** 0.5 + 1e-6))
    assert coefficient < 0.2
    for param in _trainable(reference):  # g~ is linear in the gradients: scaling them scales g~
        param.grad.mul_(coefficient)
    LoRAPro(net, lr=1e-2, mode="full", max_grad_norm=MAX_NORM).step()
    LoRAPro(reference, lr=1e-2, mode="full").step()
    for name, param in net.named_parameters():
        torch.testing.assert_close(param, reference.get_parameter(name), rtol=1e-4, atol=1e-6)


def test_bad_max_grad_norm():
    with pytest.raises(ValueError, match=r"invalid max_grad_norm 0.0; expected a finite number in \(0, inf\)"):
        LoRAPro(_model(), max_grad_norm=0.0)


class _Task(L.LightningModule):
    def __init__(self):
        super().__init__()
        self.net = _model()

    def training_step(self, batch, batch_idx):
        return nn.functional.mse_loss(self.net(batch[0]), batch[1]) * 50

    configure_gradient_clipping = LowRankTask.configure_gradient_clipping  # the tasks' routing, on a plain module

    def configure_optimizers(self):
        return LoRAPro(self.net, lr=1e-2)


def _fit(task, **trainer_options):
    data = torch.utils.data.TensorDataset(torch.randn(32, 10), torch.randn(32, 3))
    trainer = L.Trainer(max_steps=2, accelerator="cpu", logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False, **trainer_options)
    trainer.fit(task, torch.utils.data.DataLoader(data, batch_size=16))
    return trainer


def test_tasks_route_trainer_clipping_to_the_optimizer():
    task = _fit(_Task(), gradient_clip_val=MAX_NORM)
    assert task.optimizers[0].max_grad_norm == MAX_NORM
    with pytest.raises(ValueError, match="clips by norm"):
        _fit(_Task(), gradient_clip_val=MAX_NORM, gradient_clip_algorithm="value")


def test_task_clipping_equals_the_optimizer_option():
    routed, direct = _Task(), _Task()
    direct.configure_optimizers = lambda: LoRAPro(direct.net, lr=1e-2, max_grad_norm=MAX_NORM)
    torch.manual_seed(1)
    _fit(routed, gradient_clip_val=MAX_NORM)
    torch.manual_seed(1)
    _fit(direct)
    for name, param in routed.named_parameters():
        torch.testing.assert_close(param, direct.get_parameter(name))
    assert not torch.equal(routed.net[4].weight, copy.deepcopy(_model())[4].weight)
