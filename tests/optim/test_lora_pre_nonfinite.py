"""NaN/inf gradients never reach LoRA-Pre's parameters or state: the matrix (or AdamW tensor) is skipped, counted,
and training goes on (the 2026-11-30 amendment, point 3)."""
import copy

import pytest
import torch

from lit_lowrank.optim import LoRAPreAdamW, LoRAPreMuon

pytestmark = pytest.mark.usefixtures("one_thread")


def _model():
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(12, 16), torch.nn.Tanh(), torch.nn.Linear(16, 6))


def _backward(model, seed):
    generator = torch.Generator().manual_seed(seed)
    x = torch.randn(8, 12, generator=generator)
    model.zero_grad()
    model(x).pow(2).mean().backward()


def _state_copy(optimizer):
    return {param: copy.deepcopy(dict(state)) for param, state in optimizer.state.items()}


def _equal(a, b):
    return torch.equal(a, b) if isinstance(a, torch.Tensor) else a == b


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), -float("inf")])
@pytest.mark.parametrize("make", [
    lambda m: LoRAPreAdamW(m.parameters(), lr=1e-2, rank=2),
    lambda m: LoRAPreAdamW(m.parameters(), lr=1e-2, rank=2, update_bound="rms_clip"),
    lambda m: LoRAPreMuon(m.parameters(), lr=1e-2, rank=2),
], ids=["adam", "adam_rms_clip", "muon"])
def test_a_non_finite_gradient_skips_that_tensor_only_and_training_goes_on(make, bad):
    model = _model()
    optimizer = make(model)
    for seed in range(2):
        _backward(model, seed)
        optimizer.step()
    params_before = [param.detach().clone() for param in model.parameters()]
    state_before = _state_copy(optimizer)
    _backward(model, 2)
    poisoned = {model[0].weight, model[2].bias}  # a factored matrix and an AdamW tensor
    model[0].weight.grad[3, 4] = bad
    model[2].bias.grad[1] = bad
    optimizer.step()
    for param, before in zip(model.parameters(), params_before):
        assert torch.isfinite(param).all()
        assert torch.equal(param.detach(), before) == (param in poisoned)
        state = optimizer.state[param]
        for key, value in state.items():
            if isinstance(value, torch.Tensor):
                assert torch.isfinite(value).all(), key
            if key == "skipped_steps":
                continue
            assert _equal(value, state_before[param][key]) == (param in poisoned or key == "seed"), key
        assert state.get("skipped_steps", 0) == (param in poisoned)
    assert optimizer.skipped_steps() == 2
    # the next finite step trains every tensor again, from where it was
    _backward(model, 3)
    optimizer.step()
    assert all(not torch.equal(p.detach(), b) for p, b in zip(model.parameters(), params_before))
    assert optimizer.state[model[0].weight]["step"] == state_before[model[0].weight]["step"] + 1


def test_a_non_finite_first_gradient_leaves_no_state_behind_but_the_count():
    param = torch.nn.Parameter(torch.randn(8, 6))
    before = param.detach().clone()
    optimizer = LoRAPreAdamW([param], rank=2)
    param.grad = torch.full((8, 6), float("nan"))
    optimizer.step()
    assert torch.equal(param.detach(), before)
    assert set(optimizer.state[param]) == {"seed", "skipped_steps"}
    param.grad = torch.ones(8, 6)
    optimizer.step()
    assert optimizer.state[param]["step"] == 1  # its first real step is Adam's first step: lr * sign(g)
    torch.testing.assert_close(param.detach(), before - 1e-3)


def test_the_kernel_path_skips_too(monkeypatch):
    pytest.importorskip("triton")
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    param = torch.nn.Parameter(torch.randn(40, 36))
    optimizer = LoRAPreAdamW([param], lr=1e-2, rank=4, use_triton=True, residual_step=False)  # the kernel's m_t
    param.grad = torch.randn(40, 36)
    optimizer.step()
    before, state_before = param.detach().clone(), _state_copy(optimizer)[param]
    param.grad = torch.randn(40, 36)
    param.grad[0, 0] = float("inf")
    optimizer.step()
    assert torch.equal(param.detach(), before)
    assert all(_equal(v, state_before[k]) for k, v in optimizer.state[param].items() if k != "skipped_steps")
    assert optimizer.skipped_steps() == 1


def test_skipped_steps_survive_a_state_dict_round_trip():
    model = _model()
    optimizer = LoRAPreAdamW(model.parameters(), rank=2)
    _backward(model, 0)
    model[0].weight.grad.fill_(float("nan"))
    optimizer.step()
    restored = LoRAPreAdamW(model.parameters(), rank=2)
    restored.load_state_dict(copy.deepcopy(optimizer.state_dict()))
    assert restored.skipped_steps() == optimizer.skipped_steps() == 1


@pytest.mark.parametrize("make", [LoRAPreAdamW, LoRAPreMuon], ids=["adam", "muon"])
def test_a_huge_but_finite_float64_gradient_is_not_skipped(make):
    # 1e100 is finite in float64 but not in float32: the finite check must not round it through float32
    weight, bias = torch.nn.Parameter(torch.zeros(6, 5, dtype=torch.float64)), torch.nn.Parameter(
        torch.zeros(6, dtype=torch.float64))
    optimizer = make([weight, bias], lr=1e-2, rank=2)
    weight.grad, bias.grad = (torch.full((6, 5), 1e100, dtype=torch.float64),
                              torch.full((6,), -1e100, dtype=torch.float64))
    optimizer.step()
    assert optimizer.skipped_steps() == 0
    assert (weight != 0).all() and (bias > 0).all() and torch.isfinite(weight).all()
