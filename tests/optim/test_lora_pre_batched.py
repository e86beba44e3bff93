"""The LoRA-Pre steps on batches of same-shape matrices: the same numbers as one matrix at a time, and a number of
operations per step that does not grow with the number of layers (what batching is for)."""
import collections
from pathlib import Path

import pytest
import torch
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode

from lit_lowrank.optim import LoRAPreAdamW, LoRAPreMuon
from lit_lowrank.optim.lora_pre import adam, base, batch, muon

DATA = Path(__file__).parent / "data"
OPTIMIZERS = {
    "adam": lambda params: LoRAPreAdamW(params, lr=1e-2, rank=4, seed=0, weight_decay=0.01),
    "adam_jacobi_adam_floor": lambda params: LoRAPreAdamW(params, lr=1e-2, rank=4, seed=0, factor_update="jacobi",
                                                          update_bound="adam_floor"),
    "adam_rms_clip": lambda params: LoRAPreAdamW(params, lr=1e-2, rank=4, seed=0, update_bound="rms_clip"),
    "adam_paper": lambda params: LoRAPreAdamW(params, lr=1e-2, rank=4, seed=0, update_bound="none",
                                              debias_second_moment=False),
    "muon": lambda params: LoRAPreMuon(params, lr=2e-2, rank=4, seed=0, weight_decay=0.01),
    "muon_jacobi_plain": lambda params: LoRAPreMuon(params, lr=2e-2, rank=4, seed=0, factor_update="jacobi",
                                                    nesterov=False),
}


def model_of(layers: int, dtype=torch.float32) -> nn.Module:
    """``layers`` 24 x 24 matrices and two of other shapes (one its transpose), with biases."""
    torch.manual_seed(0)
    return nn.Sequential(*[nn.Linear(24, 24) for _ in range(layers)], nn.Linear(24, 20), nn.Linear(20, 24)).to(dtype)


def trajectory(make, layers: int, steps: int, device_side: bool, dtype=torch.float32, nan_at=None):
    model = model_of(layers, dtype)
    optimizer = make(model)
    optimizer._device_side_skip = device_side
    generator, out = torch.Generator().manual_seed(1), []
    for step in range(steps):
        for index, param in enumerate(model.parameters()):
            param.grad = torch.randn(param.shape, generator=generator).to(dtype)
            if (step, index) == nan_at:
                param.grad[0, 0] = float("nan")
        optimizer.step()
        out.append([param.detach().float().clone() for param in model.parameters()])
    return out, optimizer


@pytest.mark.parametrize("device_side", [False, True], ids=["host", "device_side"])
@pytest.mark.parametrize("name", sorted(OPTIMIZERS))
def test_batched_steps_equal_one_matrix_at_a_time(monkeypatch, name, device_side):
    batched, optimizer = trajectory(OPTIMIZERS[name], layers=5, steps=50, device_side=device_side, nan_at=(7, 4))
    assert optimizer.skipped_steps() == 1
    monkeypatch.setattr(base, "batch_limit", lambda *args: 1)
    alone, _ = trajectory(OPTIMIZERS[name], layers=5, steps=50, device_side=device_side, nan_at=(7, 4))
    previous = [torch.zeros_like(param) for param in alone[0]]
    for step, (got, want) in enumerate(zip(batched, alone)):
        for index, (g, w, before) in enumerate(zip(got, want, previous)):
            # per step: the difference relative to the matrix (or its step, whichever is larger), at most 1e-6
            displacement = float((w - before).abs().max()) if step else float(w.abs().max())
            assert float((g - w).abs().max()) <= 1e-6 * max(displacement, float(w.abs().max())), (step, index)
        previous = want


def test_bf16_batched_steps_differ_from_one_at_a_time_by_at_most_one_ulp(monkeypatch):
    batched, _ = trajectory(OPTIMIZERS["adam"], layers=4, steps=5, device_side=False, dtype=torch.bfloat16)
    monkeypatch.setattr(base, "batch_limit", lambda *args: 1)
    alone, _ = trajectory(OPTIMIZERS["adam"], layers=4, steps=5, device_side=False, dtype=torch.bfloat16)
    for got, want in zip(batched[0], alone[0]):  # after one step: the same inputs, rounding apart
        ulp = torch.finfo(torch.bfloat16).eps * want.abs().clamp_min(1e-30)
        assert float(((got - want).abs() / ulp).max()) <= 1.0


@pytest.mark.parametrize("optimizer_class", [LoRAPreAdamW, LoRAPreMuon])
def test_one_step_call_per_shape_group(monkeypatch, optimizer_class):
    module, step_name = (adam, "lora_pre_adam_step_") if optimizer_class is LoRAPreAdamW else (muon,
                                                                                              "lora_pre_muon_step_")
    sizes = []
    real = getattr(module, step_name)
    monkeypatch.setattr(module, step_name, lambda b, *args: sizes.append(b.size) or real(b, *args))
    model = model_of(layers=6)
    optimizer = optimizer_class(model, rank=4, seed=0)
    model(torch.randn(3, 24)).sum().backward()
    optimizer.step()
    assert sorted(sizes) == [1, 1, 6]  # the six 24 x 24 matrices together, the 20 x 24 and 24 x 20 alone


def test_matrices_at_different_step_counts_are_batched_by_count(monkeypatch):
    model = model_of(layers=4)
    optimizer = LoRAPreAdamW(model, lr=1e-2, rank=4, seed=0)
    first = model[0].weight
    first.grad = torch.full_like(first, float("nan"))  # skipped: its count stays one behind the others'
    for param in model.parameters():
        if param is not first:
            param.grad = torch.randn_like(param)
    optimizer.step()
    sizes = []
    real = adam.lora_pre_adam_step_
    monkeypatch.setattr(adam, "lora_pre_adam_step_", lambda b, *args: sizes.append((b.size, b.step)) or real(b, *args))
    for param in model.parameters():
        param.grad = torch.randn_like(param)
    optimizer.step()
    assert sorted(sizes) == [(1, 1), (1, 2), (1, 2), (3, 2)]
    assert optimizer.state[first]["step"] == 1


class OpCounter(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.counts = collections.Counter()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.counts[str(func.overloadpacket)] += 1
        return func(*args, **(kwargs or {}))


def operations_per_step(make, layers: int, device_side: bool) -> collections.Counter:
    model = nn.Sequential(*[nn.Linear(24, 24, bias=False) for _ in range(layers)])
    optimizer = make(model)
    optimizer._device_side_skip = device_side
    for _ in range(2):  # the second step: factors exist, buffers are sized
        for param in model.parameters():
            param.grad = torch.randn_like(param)
        with OpCounter() as counter:
            optimizer.step()
    return counter.counts


@pytest.mark.parametrize("device_side", [False, True], ids=["host", "device_side"])
@pytest.mark.parametrize("name", ["adam", "muon"])
def test_operations_per_step_do_not_grow_with_the_number_of_layers(name, device_side):
    few, many = (operations_per_step(OPTIMIZERS[name], layers, device_side) for layers in (2, 12))
    assert many["aten.aminmax"] - few["aten.aminmax"] == 10  # the finite check: one reduction per gradient
    few["aten.aminmax"] = many["aten.aminmax"] = 0  # and nothing else per matrix
    assert few == many, {op: (few[op], many[op]) for op in set(few) | set(many) if few[op] != many[op]}
    views = {"aten.select", "aten.view", "aten.unbind", "aten.alias", "aten.transpose", "aten.diagonal", "aten.slice"}
    computing = sum(count for op, count in few.items() if op not in views)
    assert computing < 140  # about 60 (host) to 130 (device-side skip) batched operations, whatever the layers


def test_batch_limits_keep_cpu_batches_in_cache_and_big_matrices_alone():
    cpu = torch.device("cpu")
    assert batch.batch_limit((64, 64), cpu, None) == (1 << 20) // (64 * 64)
    assert batch.batch_limit((1024, 2816), cpu, None) == 1
    assert batch.batch_limit((64, 64), cpu, 16) == 1  # explicit row chunks: one matrix at a time
    assert batch.batch_limit((4096, 4096), torch.device("meta"), None) == batch.DEVICE_BATCH_ELEMENTS // 4096**2
    assert [len(part) for part in batch.split(list(range(5)), 4)] == [2, 3]


@pytest.mark.parametrize("name", ["adam", "muon"])
def test_a_checkpoint_written_before_batching_resumes(name):
    """``data/lora_pre_before_batching.pt``: parameters and optimizer state after 3 steps of the per-matrix code
    (commit e4a330b), the next 2 gradients and where that code went with them. The batched step resumes from it to
    the same place, up to float32 rounding."""
    saved = torch.load(DATA / "lora_pre_before_batching.pt", weights_only=True)[name]
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(24, 24), nn.Linear(24, 24), nn.Linear(24, 16))
    with torch.no_grad():
        for param, value in zip(model.parameters(), saved["params"]):
            param.copy_(value)
    optimizer = OPTIMIZERS[name](model)
    optimizer.load_state_dict(saved["optimizer"])
    for grads in saved["grads"]:
        for param, grad in zip(model.parameters(), grads):
            param.grad = grad
        optimizer.step()
    for got, want, before in zip([p.detach() for p in model.parameters()], saved["expected"], saved["params"]):
        assert float((got - want).abs().max()) <= 1e-5 * float((want - before).abs().max())
