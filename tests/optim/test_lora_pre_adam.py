"""LoRAPreAdamW as an optimizer: which tensors get factors, its AdamW path against torch.optim.AdamW, the full-rank
policy, input checks, seeds and determinism."""

import copy
import functools
import logging
import pickle

import pytest
import torch
from torch import nn

from lit_lowrank.optim import LoRAPreAdamW, LoRAPreMuon, build_optimizer, lowrank_param_groups, param_group_names

FACTORS = ("B", "A", "V_B", "V_A")


pytestmark = pytest.mark.usefixtures("one_thread")  # tiny tensors (tests/optim/conftest.py)


def make_mlp(seed=0, dtype=torch.float32):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(12, 20), nn.Tanh(), nn.LayerNorm(20), nn.Linear(20, 6)).to(dtype)


def train(model, optimizer, steps=3, seed=0):
    gen = torch.Generator().manual_seed(seed)
    for _ in range(steps):
        x = torch.randn(8, 12, generator=gen).to(next(model.parameters()).dtype)
        optimizer.zero_grad()
        model(x).float().square().mean().backward()
        optimizer.step()


def test_plain_parameter_list_factors_matrices_and_gives_the_rest_adamw():
    model = make_mlp()
    optimizer = LoRAPreAdamW(model.parameters(), rank=4)
    train(model, optimizer, steps=1)
    for name, param in model.named_parameters():
        state = optimizer.state[param]
        if param.ndim == 2:
            assert set(state) == {"step", "seed", *FACTORS}, name
            assert state["B"].shape == (param.shape[0], 4) and state["A"].shape == (4, param.shape[1])
        else:
            assert set(state) == {"step", "exp_avg", "exp_avg_sq"}, name
        assert isinstance(state["step"], int) and state["step"] == 1


@pytest.mark.parametrize("foreach", [True, False])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_adamw_tensors_match_torch_adamw_bitwise(dtype, foreach):
    """Non-matrix tensors of a low-rank group and every tensor of a lowrank=False group. The AdamW path replicates
    torch's foreach implementation, whose rounding differs slightly from torch's for-loop one. For bf16 tensors
    the state is float32: the reference runs torch's AdamW on float32 copies and rounds back after each step."""
    ours_model, torch_model = make_mlp(dtype=dtype), make_mlp(dtype=dtype)
    matrices = [ours_model[0].weight, ours_model[3].weight]
    vectors = [p for p in ours_model.parameters() if p.ndim == 1]  # 0.bias, 2.weight, 2.bias, 3.bias
    hyper = {"lr": 0.01, "betas": (0.8, 0.99), "eps": 1e-6, "weight_decay": 0.1}
    ours = LoRAPreAdamW(
        [{"params": matrices + vectors[:2]}, {"params": vectors[2:], "lowrank": False}], rank=4, **hyper
    )
    reference_params = [p for p in torch_model.parameters() if p.ndim == 1]
    masters = [torch.nn.Parameter(p.detach().float()) for p in reference_params]
    reference = torch.optim.AdamW(masters, foreach=foreach, **hyper)
    gen = torch.Generator().manual_seed(1)
    for _ in range(4):
        for a, b in zip(ours_model.parameters(), torch_model.parameters()):
            a.grad = torch.randn(a.shape, generator=gen).to(dtype)
            b.grad = a.grad.clone()
        ours.step()
        for master, param in zip(masters, reference_params):
            master.data.copy_(param.detach().float())
            master.grad = param.grad.float()
        reference.step()
        for master, param in zip(masters, reference_params):
            param.data.copy_(master.detach().to(dtype))
    for (name, a), b in zip(ours_model.named_parameters(), torch_model.parameters()):
        if a.ndim == 1:
            if foreach:
                assert torch.equal(a, b), name
            else:
                torch.testing.assert_close(a, b, msg=name)
            assert ours.state[a]["exp_avg"].dtype == torch.float32


def test_module_input_uses_lowrank_param_groups():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Embedding(30, 16), nn.ModuleList([nn.Linear(16, 16), nn.Linear(16, 8)]))
    optimizer = LoRAPreAdamW(model, rank=3)
    groups = lowrank_param_groups(model, rank=3)
    assert [g["param_names"] for g in optimizer.param_groups] == [g["param_names"] for g in groups]
    assert [g["lowrank"] for g in optimizer.param_groups] == [True, False]


def test_build_optimizer_hands_the_model_to_both_optimizers():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Embedding(30, 16), nn.ModuleList([nn.Linear(16, 16), nn.Linear(16, 8)]))
    for optimizer_class in (LoRAPreAdamW, LoRAPreMuon):
        optimizer = build_optimizer(functools.partial(optimizer_class, rank=3), model)
        assert [g["param_names"] for g in optimizer.param_groups] == param_group_names(lowrank_param_groups(model))


def test_group_rank_and_scale_override_the_defaults():
    torch.manual_seed(0)
    big, small = nn.Parameter(torch.randn(16, 12)), nn.Parameter(torch.randn(16, 12))
    W_big, W_small = big.detach().clone(), small.detach().clone()
    optimizer = LoRAPreAdamW([{"params": [big]}, {"params": [small], "rank": 2, "scale": 0.25}], lr=0.1, rank=5)
    big.grad, small.grad = torch.ones(16, 12), torch.ones(16, 12)
    optimizer.step()
    assert optimizer.state[big]["A"].shape == (5, 12) and optimizer.state[small]["A"].shape == (2, 12)
    torch.testing.assert_close(big.detach(), W_big - 0.1)  # Adam's first step: lr * sign(g)
    torch.testing.assert_close(small.detach(), W_small - 0.25 * 0.1)


@pytest.mark.parametrize("chunk_rows", [1, 3, 16, None])
def test_row_chunking_does_not_change_the_result(chunk_rows):
    # Float64: in float32 the chunks' different summation orders show up at the 1e-5 level after a few steps.
    results = []
    for rows in (chunk_rows, 1000):
        model = make_mlp(dtype=torch.float64)
        train(model, LoRAPreAdamW(model.parameters(), lr=0.01, rank=4, chunk_rows=rows, seed=0), steps=3)
        results.append(torch.cat([p.detach().flatten() for p in model.parameters()]))
    torch.testing.assert_close(results[0], results[1], rtol=1e-12, atol=1e-13)


def test_rank_too_large_raises_a_clear_error_by_default():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 5))
    with pytest.raises(ValueError, match=r"rank 6 >= min\(5, 8\) for parameter 0\.weight of shape \(5, 8\).*HINT"):
        LoRAPreAdamW(model.named_parameters(), rank=6)


def test_full_rank_dense_gives_plain_adamw_with_one_warning_per_tensor(caplog):
    ours_model, torch_model = make_mlp(), make_mlp()
    with caplog.at_level(logging.WARNING, logger="lit_lowrank.optim.lora_pre.base"):
        ours = LoRAPreAdamW(ours_model.named_parameters(), lr=0.01, rank=12, full_rank="dense")  # 20x12 and 6x20
    messages = [record.getMessage() for record in caplog.records]
    assert len(messages) == 2 and "0.weight (20, 12)" in messages[0] and "3.weight (6, 20)" in messages[1]
    train(ours_model, ours)
    train(torch_model, torch.optim.AdamW(torch_model.parameters(), lr=0.01, weight_decay=0.0, foreach=True))
    for a, b in zip(ours_model.parameters(), torch_model.parameters()):
        assert torch.equal(a, b)
    assert all("exp_avg" in ours.state[p] for p in ours_model.parameters())


def test_full_rank_factored_keeps_factors_and_warns(caplog):
    model = make_mlp()
    with caplog.at_level(logging.WARNING, logger="lit_lowrank.optim.lora_pre.base"):
        optimizer = LoRAPreAdamW(model.parameters(), rank=12, full_rank="factored")
    assert len(caplog.records) == 2 and "full_rank='factored'" in caplog.records[0].getMessage()
    train(model, optimizer, steps=1)
    assert optimizer.state[model[0].weight]["A"].shape == (12, 12)


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"lr": -1.0}, "invalid lr"),
        ({"lr": float("nan")}, "invalid lr"),
        ({"betas": (1.0, 0.9)}, "invalid betas"),
        ({"betas": (0.9,)}, "invalid betas"),
        ({"eps": -1e-8}, "invalid eps"),
        ({"weight_decay": -0.1}, "invalid weight_decay"),
        ({"rank": 0}, "invalid rank"),
        ({"rank": 2.5}, "invalid rank"),
        ({"scale": 0.0}, "invalid scale"),
        ({"damping": 0.0}, "invalid damping"),
        ({"factor_update": "gauss-seidel"}, "invalid factor_update"),
        ({"full_rank": "adam"}, "invalid full_rank"),
        ({"chunk_rows": 0}, "invalid chunk_rows"),
        ({"use_triton": "yes"}, "invalid use_triton"),
        ({"use_triton": 1}, "invalid use_triton"),
    ],
)
def test_invalid_arguments_raise_clear_errors(kwargs, message):
    with pytest.raises(ValueError, match=message):
        LoRAPreAdamW(make_mlp().parameters(), **kwargs)


def test_invalid_group_option_and_complex_parameters_raise():
    with pytest.raises(TypeError, match="invalid lowrank"):
        LoRAPreAdamW([{"params": make_mlp().parameters(), "lowrank": "yes"}])
    with pytest.raises(ValueError, match="complex parameter"):
        LoRAPreAdamW([nn.Parameter(torch.zeros(4, 4, dtype=torch.complex64))])


def test_sparse_gradients_are_rejected():
    embedding = nn.Embedding(10, 4, sparse=True)
    optimizer = LoRAPreAdamW([{"params": embedding.parameters(), "lowrank": False}])
    embedding(torch.tensor([1, 2])).sum().backward()
    with pytest.raises(RuntimeError, match="sparse gradients"):
        optimizer.step()


def test_initial_factors_come_from_per_parameter_seeds():
    torch.manual_seed(123)
    model = make_mlp()
    optimizer = LoRAPreAdamW(model.parameters(), rank=4)
    seeds = [optimizer.state[p]["seed"] for p in (model[0].weight, model[3].weight)]
    assert all(isinstance(seed, int) for seed in seeds) and seeds[0] != seeds[1]
    # With a zero gradient one step only decays the initial factors: B stays 0, A -> sqrt(beta1) A_0 and
    # V_A -> beta2^(1/4) V_A_0, where A_0, V_A_0 ~ N(0, 0.02^2) are drawn from the parameter's own seed.
    param = nn.Parameter(torch.zeros(400, 300))
    optimizer = LoRAPreAdamW([param], rank=8, seed=5)
    param.grad = torch.zeros(400, 300)
    optimizer.step()
    state = optimizer.state[param]
    generator = torch.Generator().manual_seed(state["seed"])
    A0, V_A0 = (torch.randn(8, 300, generator=generator) * 0.02 for _ in range(2))
    assert abs(A0.std().item() - 0.02) < 0.001
    torch.testing.assert_close(state["A"], 0.9**0.5 * A0)
    torch.testing.assert_close(state["V_A"], 0.999**0.25 * V_A0)
    assert state["B"].abs().max().item() == 0.0 and state["V_B"].abs().max().item() == 0.0


def test_runs_are_deterministic_under_a_fixed_seed_and_differ_otherwise():
    def run(torch_seed, seed=None):
        model = make_mlp(seed=0)
        torch.manual_seed(torch_seed)
        optimizer = LoRAPreAdamW(model.parameters(), lr=0.01, rank=4, seed=seed)
        train(model, optimizer, steps=3)
        return torch.cat([p.detach().flatten() for p in model.parameters()])

    assert torch.equal(run(7), run(7))
    assert not torch.equal(run(7), run(8))
    assert torch.equal(run(7, seed=3), run(8, seed=3))  # an explicit seed wins over torch's


def test_parameters_without_gradients_are_skipped_and_closure_loss_returned():
    model = make_mlp()
    optimizer = LoRAPreAdamW(model.parameters(), rank=4)
    x = torch.randn(4, 12)

    def closure():
        optimizer.zero_grad()
        loss = model[0](x).square().mean()  # only the first layer gets gradients
        loss.backward()
        return loss

    assert optimizer.step(closure) is not None
    assert "B" in optimizer.state[model[0].weight] and "B" not in optimizer.state[model[3].weight]
    assert "exp_avg" not in optimizer.state[model[2].weight]


def test_lr_scheduler_deepcopy_and_pickle_keep_working():
    model = make_mlp()
    optimizer = LoRAPreAdamW(model.parameters(), lr=0.01, rank=4)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda epoch: 0.5**epoch)
    train(model, optimizer, steps=1)
    scheduler.step()
    assert optimizer.param_groups[0]["lr"] == pytest.approx(0.005)
    for clone in (copy.deepcopy(optimizer), pickle.loads(pickle.dumps(optimizer))):
        assert clone.state_bytes().total == optimizer.state_bytes().total
        clone.state_dict()
