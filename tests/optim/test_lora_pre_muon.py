"""LoRAPreMuon against a plain Muon written here, its AdamW groups against torch.optim.AdamW, grouping rules,
input checks and the Newton-Schulz orthogonalisation."""

import math

import pytest
import torch
from torch import nn

from lit_lowrank.optim import LoRAPreMuon
from lit_lowrank.optim.lora_pre.muon_update import muon_update_scale, newton_schulz_orthogonalize

F64 = torch.float64


pytestmark = pytest.mark.usefixtures("one_thread")  # tiny tensors (tests/optim/conftest.py)


def reference_newton_schulz(G, steps=5):
    """Muon's quintic iteration, as published with Keller Jordan's Muon (coefficients 3.4445, -4.7750, 2.0315)."""
    X = G / (G.norm() + 1e-7)
    tall = X.shape[0] > X.shape[1]
    if tall:
        X = X.T
    for _ in range(steps):
        S = X @ X.T
        X = 3.4445 * X + (-4.7750 * S + 2.0315 * S @ S) @ X
    return X.T if tall else X


def reference_muon(W, grads, *, lr, momentum, nesterov, weight_decay):
    """Plain Muon with a dense buffer M_t = mu M_{t-1} + g; returns the weight after each step."""
    W, M, history = W.clone(), torch.zeros_like(W), []
    p, q = W.shape
    for g in grads:
        M = momentum * M + g
        direction = g + momentum * M if nesterov else M
        W = W * (1 - lr * weight_decay) - lr * math.sqrt(max(1.0, p / q)) * reference_newton_schulz(direction)
        history.append(W)
    return history


@pytest.mark.parametrize("nesterov", [True, False])
def test_with_exact_factors_it_is_plain_muon(nesterov):
    """p = q = r: A is square and invertible, so one alternating least-squares step reproduces M_t = mu M + g
    exactly (up to the damping, made negligible here: a random 6 x 6 A can have condition number ~1e3)."""
    gen = torch.Generator().manual_seed(0)
    W0 = torch.randn(6, 6, generator=gen, dtype=F64)
    grads = [torch.randn(6, 6, generator=gen, dtype=F64) for _ in range(6)]
    param = nn.Parameter(W0.clone())
    optimizer = LoRAPreMuon(
        [param],
        lr=0.05,
        momentum=0.9,
        nesterov=nesterov,
        weight_decay=0.1,
        rank=6,
        full_rank="factored",
        damping=1e-15,
    )
    expected = reference_muon(W0, grads, lr=0.05, momentum=0.9, nesterov=nesterov, weight_decay=0.1)
    momentum = torch.zeros_like(W0)
    for g, W_expected in zip(grads, expected):
        param.grad = g
        optimizer.step()
        momentum = 0.9 * momentum + g
        state = optimizer.state[param]
        torch.testing.assert_close(state["B"] @ state["A"], momentum, rtol=1e-8, atol=1e-10)
        torch.testing.assert_close(param.detach(), W_expected, rtol=1e-8, atol=1e-10)


def test_dense_fallback_is_plain_muon():
    gen = torch.Generator().manual_seed(1)
    W0 = torch.randn(5, 8, generator=gen, dtype=F64)
    grads = [torch.randn(5, 8, generator=gen, dtype=F64) for _ in range(4)]
    param = nn.Parameter(W0.clone())
    optimizer = LoRAPreMuon([param], lr=0.05, momentum=0.9, rank=5, full_rank="dense", weight_decay=0.01)
    for g in grads:
        param.grad = g
        optimizer.step()
    expected = reference_muon(W0, grads, lr=0.05, momentum=0.9, nesterov=True, weight_decay=0.01)[-1]
    torch.testing.assert_close(param.detach(), expected, rtol=1e-10, atol=1e-12)
    assert set(optimizer.state[param]) == {"step", "momentum_buffer"}


def test_factors_track_the_momentum_of_a_low_rank_gradient_stream():
    gen = torch.Generator().manual_seed(2)
    g = torch.randn(30, 2, generator=gen, dtype=F64) @ torch.randn(2, 20, generator=gen, dtype=F64)
    param = nn.Parameter(torch.zeros(30, 20, dtype=F64))
    optimizer = LoRAPreMuon([param], lr=0.0, momentum=0.9, rank=4)
    for _ in range(300):
        param.grad = g
        optimizer.step()
    momentum = (1 - 0.9**300) / (1 - 0.9) * g
    state = optimizer.state[param]
    assert ((state["B"] @ state["A"] - momentum).norm() / momentum.norm()).item() < 1e-4


def test_adamw_groups_match_torch_adamw_with_the_adamw_hyperparameters():
    torch.manual_seed(3)
    ours_model = nn.Sequential(nn.Linear(10, 16), nn.LayerNorm(16), nn.Linear(16, 4))
    torch_model = nn.Sequential(nn.Linear(10, 16), nn.LayerNorm(16), nn.Linear(16, 4))
    torch_model.load_state_dict(ours_model.state_dict())
    ours = LoRAPreMuon(
        ours_model.parameters(), rank=3, adamw_lr=0.01, adamw_betas=(0.8, 0.9), adamw_eps=1e-6, adamw_weight_decay=0.1
    )
    vectors = [p for p in torch_model.parameters() if p.ndim == 1]
    reference = torch.optim.AdamW(vectors, lr=0.01, betas=(0.8, 0.9), eps=1e-6, weight_decay=0.1, foreach=True)
    gen = torch.Generator().manual_seed(4)
    for _ in range(3):
        for a, b in zip(ours_model.parameters(), torch_model.parameters()):
            a.grad = torch.randn(a.shape, generator=gen)
            b.grad = a.grad.clone()
        ours.step()
        reference.step()
    for a, b in zip(ours_model.parameters(), torch_model.parameters()):
        if a.ndim == 1:
            assert torch.equal(a, b)
    assert [g["lr"] for g in ours.param_groups] == [0.02, 0.01]


def test_plain_lists_and_groups_without_lowrank_are_split_keeping_names():
    torch.manual_seed(5)
    model = nn.Sequential(nn.Linear(10, 16), nn.LayerNorm(16), nn.Linear(16, 4))
    optimizer = LoRAPreMuon(
        [{"params": list(model[0].named_parameters()), "weight_decay": 0.5}, {"params": model[2].named_parameters()}],
        rank=3,
    )
    summary = [(g["lowrank"], g.get("param_names"), g["weight_decay"], g["lr"]) for g in optimizer.param_groups]
    assert summary[:2] == [(True, ["weight"], 0.5, 0.02), (False, ["bias"], 0.5, 3e-4)]
    assert [g["lowrank"] for g in optimizer.param_groups[2:]] == [True, False]


def test_lowrank_group_with_a_vector_raises_a_clear_error():
    layer = nn.Linear(8, 8)
    with pytest.raises(ValueError, match=r"shape \(8,\) is in a lowrank=True group.*HINT"):
        LoRAPreMuon([{"params": list(layer.parameters()), "lowrank": True}], rank=2)


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"momentum": 1.0}, "invalid momentum"),
        ({"ns_steps": 0}, "invalid ns_steps"),
        ({"scale_rule": "spectral"}, "invalid scale_rule"),
        ({"adamw_betas": (0.9, 1.5)}, "invalid adamw_betas"),
        ({"lr": -0.02}, "invalid lr"),
        ({"rank": 0}, "invalid rank"),
        ({"factor_update": "random"}, "invalid factor_update"),
        ({"use_triton": "yes"}, "invalid use_triton"),
        ({"rank": 8}, r"rank 8 >= min\(8, 8\)"),
    ],
)
def test_invalid_arguments_raise_clear_errors(kwargs, message):
    with pytest.raises(ValueError, match=message):
        LoRAPreMuon(nn.Linear(8, 8).parameters(), **kwargs)


def test_use_triton_true_warns_once_that_there_is_no_kernel_and_runs_torch():
    from lit_lowrank.kernels import dispatch
    from lit_lowrank.kernels.dispatch import KernelFallbackWarning

    dispatch.reset()
    torch.manual_seed(3)
    layers = {flag: nn.Linear(12, 10) for flag in (True, False)}
    layers[False].load_state_dict(layers[True].state_dict())
    with pytest.warns(KernelFallbackWarning, match="LoRAPreMuon has no Triton kernel") as record:
        optimizers = {flag: LoRAPreMuon(layer.parameters(), rank=3, use_triton=flag, seed=0)
                      for flag, layer in layers.items()}
        LoRAPreMuon(nn.Linear(12, 10).parameters(), rank=3, use_triton=True)
    assert len([w for w in record if issubclass(w.category, KernelFallbackWarning)]) == 1
    dispatch.reset()
    x = torch.randn(4, 12)
    for flag, layer in layers.items():
        layer(x).square().sum().backward()
        optimizers[flag].step()
    for a, b in zip(layers[True].parameters(), layers[False].parameters()):
        assert torch.equal(a, b)


def test_bf16_parameters_keep_float32_factors():
    torch.manual_seed(6)
    param = nn.Parameter(torch.randn(24, 16, dtype=torch.bfloat16))
    optimizer = LoRAPreMuon([param], rank=4)
    for _ in range(3):
        param.grad = torch.randn(24, 16, dtype=torch.bfloat16)
        optimizer.step()
    assert param.dtype == torch.bfloat16 and torch.isfinite(param).all()
    assert optimizer.state[param]["B"].dtype == torch.float32


@pytest.mark.parametrize("shape", [(16, 40), (40, 16)])
def test_newton_schulz_matches_the_reference_and_nearly_orthogonalises(shape):
    G = torch.randn(*shape, generator=torch.Generator().manual_seed(7))
    X = newton_schulz_orthogonalize(G, 5)
    torch.testing.assert_close(X, reference_newton_schulz(G), rtol=1e-4, atol=1e-5)
    singular_values = torch.linalg.svdvals(X)
    assert singular_values.min() > 0.6 and singular_values.max() < 1.25
    U, _, Vh = torch.linalg.svd(G, full_matrices=False)
    assert torch.nn.functional.cosine_similarity(X.flatten(), (U @ Vh).flatten(), dim=0) > 0.95


def test_update_scale_rules():
    assert muon_update_scale((64, 16), "muon") == 2.0 and muon_update_scale((16, 64), "muon") == 1.0
    assert muon_update_scale((16, 64), "adamw_rms") == pytest.approx(0.2 * 8)


def spec_muon_step(W, g, B, A, *, t, lr, mu, nesterov, weight_decay, damping, residual):
    """One LoRA-Pre Muon step transcribed literally in float64 (alternating factor update); ``residual``: the part of
    g outside the rows of A enters M with weight (1 - mu^t) / (1 - mu) instead of 1."""
    def damped_inverse(M):
        r = M.shape[0]
        return torch.linalg.inv(M + damping * (torch.trace(M) / r + 1e-60) * torch.eye(r, dtype=M.dtype))

    M = mu * B @ A + g
    if residual:
        M = M + ((1 - mu**t) / (1 - mu) - 1) * (g - g @ A.T @ damped_inverse(A @ A.T) @ A)
    direction = g + mu * M if nesterov else M
    p, q = W.shape
    W = W * (1 - lr * weight_decay) - lr * math.sqrt(max(1.0, p / q)) * reference_newton_schulz(direction)
    gamma = 1 - math.sqrt(mu)
    target = g / (1 - mu)
    B = (1 - gamma) * B + gamma * target @ A.T @ damped_inverse(A @ A.T)
    A = (1 - gamma) * A + gamma * damped_inverse(B.T @ B) @ B.T @ target
    return W, B, A


@pytest.mark.parametrize("residual", [True, False], ids=["residual", "paper_momentum"])
@pytest.mark.parametrize("nesterov", [True, False])
def test_a_step_matches_its_literal_transcription(residual, nesterov):
    from lit_lowrank.optim.lora_pre.factors import Workspace
    from lit_lowrank.optim.lora_pre.muon_update import lora_pre_muon_update_

    gen = torch.Generator().manual_seed(4)
    W, g = torch.randn(13, 9, generator=gen, dtype=F64), torch.randn(13, 9, generator=gen, dtype=F64)
    B, A = torch.randn(13, 3, generator=gen, dtype=F64), torch.randn(3, 9, generator=gen, dtype=F64)
    options = dict(lr=0.03, nesterov=nesterov, weight_decay=0.1, damping=1e-6)
    expected = spec_muon_step(W, g, B, A, t=4, mu=0.9, residual=residual, **options)
    got = [W.clone(), B.clone(), A.clone()]
    lora_pre_muon_update_(got[0], g, got[1], got[2], momentum=0.9, ns_steps=5, scale=math.sqrt(13 / 9),
                          factor_update="alternating", workspace=Workspace(), step=4, residual_step=residual, **options)
    for name, a, b in zip(("W", "B", "A"), got, expected):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12, msg=name)
    if residual:  # the residual term was not negligible, or this would not test it
        plain = spec_muon_step(W, g, B, A, t=4, mu=0.9, residual=False, **options)
        assert (plain[0] - expected[0]).abs().max() > 1e-4


def test_the_per_matrix_step_asks_for_the_count_the_residual_step_needs():
    from lit_lowrank.optim.lora_pre.factors import Workspace
    from lit_lowrank.optim.lora_pre.muon_update import lora_pre_muon_update_

    W, g, B, A = torch.zeros(6, 4), torch.ones(6, 4), torch.zeros(6, 2), torch.ones(2, 4)
    options = dict(lr=0.1, momentum=0.95, nesterov=False, weight_decay=0.0, ns_steps=5, scale=1.0, damping=1e-6,
                   factor_update="alternating", workspace=Workspace())
    with pytest.raises(ValueError, match="step=t"):
        lora_pre_muon_update_(W, g, B, A, **options)
    lora_pre_muon_update_(W, g, B, A, residual_step=False, **options)  # the paper's momentum needs no count
    assert W.abs().max() > 0
