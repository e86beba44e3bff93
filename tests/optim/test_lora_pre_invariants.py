"""The invariants of LoRA-Pre Adam (docs/lora-pre.md), numbered 1-6, each against an independent computation.

The reference is a direct float64 transcription of the spec's equations (explicit inverses, m_t and v_t formed
whole), written here without the optimizer's rewrites (hypot, folded constants, row chunks, Cholesky).
"""

import math

import pytest
import torch

from lit_lowrank.optim import LoRAPreAdamW
from lit_lowrank.optim.lora_pre.adam_update import lora_pre_adam_update_
from lit_lowrank.optim.lora_pre.factors import Workspace

F64 = torch.float64
SPEC_ALTERNATING_ERRORS = {1: 0.84, 2: 0.70, 4: 0.45, 8: 0.25}  # the spec's simulation, r = 1 / 2 / 4 / 8


pytestmark = pytest.mark.usefixtures("one_thread")  # tiny tensors (tests/optim/conftest.py)


def adam_worst_case_by_sum(t, beta1, beta2):
    """C_t = sum_i w_i^2 / u_i over the normalised EMA weights, summed term by term."""
    w = [(1 - beta1) * beta1 ** (t - i) / (1 - beta1**t) for i in range(1, t + 1)]
    u = [(1 - beta2) * beta2 ** (t - i) / (1 - beta2**t) for i in range(1, t + 1)]
    return sum(a * a / b for a, b in zip(w, u))


def spec_step(W, g, B, A, V_B, V_A, *, t, lr, beta1, beta2, eps, wd, scale, damping, jacobi=False,
              debias=False, bound="none", residual=False):
    """The spec's LoRA-Pre Adam step, transcribed literally (returns new tensors). ``debias`` and ``bound`` are
    the 2026-11-30 amendment: the |g| EMA rescaled to Adam's warm-up, and v_hat floored at m_hat^2 / C.
    ``residual`` the 2026-12-07 one: the part of g outside the rows of A, g (I - A^T (A A^T + lam I)^-1 A), enters
    m_t with weight 1 - beta1^t (1 after bias correction) instead of 1 - beta1."""

    def damped_inverse(M):
        r = M.shape[0]
        return torch.linalg.inv(M + damping * (torch.trace(M) / r + 1e-60) * torch.eye(r, dtype=M.dtype))

    warmup = math.sqrt(1 - beta2 ** (t - 1)) / (1 - beta2 ** ((t - 1) / 2)) if debias and t > 1 else 1.0
    m = beta1 * (B @ A) + (1 - beta1) * g
    if residual:
        outside = g - g @ A.T @ damped_inverse(A @ A.T) @ A
        m = m + (beta1 - beta1**t) * outside
    v = beta2 * (warmup * V_B @ V_A) ** 2 + (1 - beta2) * g**2
    m_hat, v_hat = m / (1 - beta1**t), v / (1 - beta2**t)
    if bound != "none":
        C = 1.0 if bound == "v_floor" else adam_worst_case_by_sum(t, beta1, beta2)
        v_hat = torch.maximum(v_hat, m_hat**2 / C)
    W = W - lr * (scale * m_hat / (torch.sqrt(v_hat) + eps) + wd * W)
    new = {}
    for left, right, target, gamma, key in (
        (B, A, g, 1 - math.sqrt(beta1), ""),
        (V_B, V_A, g.abs(), 1 - beta2**0.25, "V_"),
    ):
        new_left = (1 - gamma) * left + gamma * target @ right.T @ damped_inverse(right @ right.T)
        solve_with = left if jacobi else new_left
        new_right = (1 - gamma) * right + gamma * damped_inverse(solve_with.T @ solve_with) @ solve_with.T @ target
        new[key + "B"], new[key + "A"] = new_left, new_right
    return W, new["B"], new["A"], new["V_B"], new["V_A"]


def random_factors(p, q, r, seed, dtype=F64):
    gen = torch.Generator().manual_seed(seed)
    return [torch.randn(*shape, generator=gen, dtype=dtype) for shape in ((p, r), (r, q), (p, r), (r, q))]


def step_factors(W, g, factors, *, damping=1e-6, factor_update="alternating", t=3, **overrides):
    """Run the optimizer's per-matrix update on copies; returns (W, B, A, V_B, V_A)."""
    W, factors = W.clone(), [f.clone() for f in factors]
    options = {"lr": 1e-2, "beta1": 0.9, "beta2": 0.999, "eps": 1e-8, "weight_decay": 0.0, "scale": 1.0} | overrides
    lora_pre_adam_update_(
        W,
        g,
        *factors,
        step=t,
        damping=damping,
        factor_update=factor_update,
        chunk_rows=5,
        workspace=Workspace(),
        **options,
    )
    return (W, *factors)


@pytest.mark.parametrize("grad_dtype", [F64, torch.bfloat16])  # bf16: converted chunk by chunk (13 rows, chunks of 5)
@pytest.mark.parametrize("factor_update", ["alternating", "jacobi"])
@pytest.mark.parametrize("debias, bound", [(False, "none"), (True, "v_floor"), (True, "adam_floor"),
                                           (False, "v_floor")])
@pytest.mark.parametrize("residual", [True, False], ids=["residual", "paper_m"])
def test_update_matches_literal_transcription_of_the_spec(factor_update, grad_dtype, debias, bound, residual):
    p, q, r = 13, 9, 3
    factors = random_factors(p, q, r, seed=1)
    gen = torch.Generator().manual_seed(2)
    W, g = torch.randn(p, q, generator=gen, dtype=F64), torch.randn(p, q, generator=gen).to(grad_dtype)
    options = {"lr": 0.03, "beta1": 0.8, "beta2": 0.99, "eps": 1e-6, "weight_decay": 0.1, "scale": 0.25}
    got = step_factors(W, g, factors, factor_update=factor_update, t=4, debias_second_moment=debias,
                       update_bound=bound, residual_step=residual, **options)
    expected = spec_step(
        W,
        g.double(),
        *factors,
        t=4,
        lr=0.03,
        beta1=0.8,
        beta2=0.99,
        eps=1e-6,
        wd=0.1,
        scale=0.25,
        damping=1e-6,
        jacobi=factor_update == "jacobi",
        debias=debias,
        bound=bound,
        residual=residual,
    )
    if bound != "none":  # the floor must have been active somewhere, or this would not test it
        m_hat = (0.8 * factors[0] @ factors[1] + 0.2 * g.double()) / (1 - 0.8**4)
        unbounded = spec_step(W, g.double(), *factors, t=4, lr=0.03, beta1=0.8, beta2=0.99, eps=1e-6, wd=0.1,
                              scale=0.25, damping=1e-6, jacobi=factor_update == "jacobi", debias=debias,
                              residual=residual)
        assert not torch.allclose(unbounded[0], expected[0]) and m_hat.abs().max() > 0
    for name, a, b in zip(("W", "B", "A", "V_B", "V_A"), got, expected):
        torch.testing.assert_close(a, b, rtol=1e-11, atol=1e-13, msg=name)


@pytest.mark.parametrize("factor_update", ["alternating", "jacobi"])
def test_1_zero_gradient_decays_both_moments_exactly(factor_update):
    B, A, V_B, V_A = factors = random_factors(12, 7, 3, seed=3)
    zeros = torch.zeros(12, 7, dtype=F64)
    _, B1, A1, V_B1, V_A1 = step_factors(zeros.clone(), zeros, factors, factor_update=factor_update)
    torch.testing.assert_close(B1 @ A1, 0.9 * (B @ A), rtol=1e-13, atol=1e-15)
    torch.testing.assert_close((V_B1 @ V_A1) ** 2, 0.999 * (V_B @ V_A) ** 2, rtol=1e-13, atol=1e-15)


def test_2_fixed_point_first_moment_factors_do_not_move():
    B, A, _V_B, _V_A = factors = random_factors(10, 8, 3, seed=4)  # random: full column / row rank
    _, B1, A1, _, _ = step_factors(torch.zeros(10, 8, dtype=F64), B @ A, factors, damping=1e-12)
    torch.testing.assert_close(B1, B, rtol=0, atol=1e-10)
    torch.testing.assert_close(A1, A, rtol=0, atol=1e-10)


def test_3_gauge_invariance_of_the_products():
    B, A, V_B, V_A = factors = random_factors(11, 9, 3, seed=5)
    gen = torch.Generator().manual_seed(6)
    g = torch.randn(11, 9, generator=gen, dtype=F64)
    R = torch.eye(3, dtype=F64) + 0.5 * torch.randn(3, 3, generator=gen, dtype=F64)  # well conditioned
    R_V = torch.eye(3, dtype=F64) + 0.5 * torch.randn(3, 3, generator=gen, dtype=F64)
    regauged = [B @ R, torch.linalg.solve(R, A), V_B @ R_V, torch.linalg.solve(R_V, V_A)]
    # The damping term delta * tr(M) / r is not gauge invariant, so it is made negligible here.
    _, B1, A1, V_B1, V_A1 = step_factors(torch.zeros(11, 9, dtype=F64), g, factors, damping=1e-13)
    _, B2, A2, V_B2, V_A2 = step_factors(torch.zeros(11, 9, dtype=F64), g, regauged, damping=1e-13)
    torch.testing.assert_close(B2 @ A2, B1 @ A1, rtol=1e-9, atol=1e-11)
    torch.testing.assert_close(V_B2 @ V_A2, V_B1 @ V_A1, rtol=1e-9, atol=1e-11)


@pytest.mark.parametrize("reference, weight_decay", [(torch.optim.Adam, 0.0), (torch.optim.AdamW, 0.1)])
@pytest.mark.parametrize("dtype", [torch.float32, F64])
def test_4_first_step_equals_torch_adam(reference, weight_decay, dtype):
    gen = torch.Generator().manual_seed(7)
    W0, g = torch.randn(16, 24, generator=gen, dtype=dtype), torch.randn(16, 24, generator=gen, dtype=dtype)
    ours, theirs = torch.nn.Parameter(W0.clone()), torch.nn.Parameter(W0.clone())
    ours.grad, theirs.grad = g.clone(), g.clone()
    LoRAPreAdamW([ours], lr=0.01, rank=4, weight_decay=weight_decay).step()
    reference([theirs], lr=0.01, weight_decay=weight_decay).step()
    assert not torch.equal(theirs, W0)
    tolerance = {"rtol": 1e-6, "atol": 1e-7} if dtype == torch.float32 else {"rtol": 1e-13, "atol": 1e-15}
    torch.testing.assert_close(ours, theirs, **tolerance)


def track_ema(rank, factor_update, *, steps=100, burn_in=100, noise=0.1, beta=0.9, seed=0):
    """Mean ||B A - m|| / ||m|| over ``steps`` steps of a noisy rank-6 40 x 30 gradient stream (the spec's setup);
    m is the exact EMA, computed here in float64."""
    gen = torch.Generator().manual_seed(seed)
    p, q, k = 40, 30, 6
    left, right = torch.randn(p, k, generator=gen, dtype=F64), torch.randn(k, q, generator=gen, dtype=F64)
    param = torch.nn.Parameter(torch.zeros(p, q, dtype=F64))
    optimizer = LoRAPreAdamW([param], lr=0.0, betas=(beta, 0.999), rank=rank, factor_update=factor_update, seed=seed)
    ema, errors = torch.zeros(p, q, dtype=F64), []
    for t in range(burn_in + steps):
        mixing = torch.diag(torch.randn(k, generator=gen, dtype=F64))
        param.grad = left @ mixing @ right + noise * math.sqrt(k) * torch.randn(p, q, generator=gen, dtype=F64)
        ema = beta * ema + (1 - beta) * param.grad
        optimizer.step()
        if t >= burn_in:
            state = optimizer.state[param]
            errors.append(((state["B"] @ state["A"] - ema).norm() / ema.norm()).item())
    return sum(errors) / len(errors)


def test_5_ema_tracking_error_falls_with_rank_as_in_the_spec_simulation():
    alternating = {r: track_ema(r, "alternating") for r in SPEC_ALTERNATING_ERRORS}
    errors = list(alternating.values())
    assert errors == sorted(errors, reverse=True), alternating
    for r, spec_error in SPEC_ALTERNATING_ERRORS.items():
        assert abs(alternating[r] - spec_error) < 0.1, (r, alternating[r], spec_error)
    # The documented Jacobi caveat: worse than alternating, and worse at r = 8 than at r = 2.
    jacobi = {r: track_ema(r, "jacobi") for r in (2, 8)}
    assert jacobi[8] > jacobi[2] > alternating[2] and jacobi[8] > 2 * alternating[8], (jacobi, alternating)


@pytest.mark.parametrize("rank", [3, 5])
def test_5_constant_gradient_of_rank_at_most_r_is_tracked_exactly(rank):
    gen = torch.Generator().manual_seed(8)
    g = torch.randn(20, 3, generator=gen, dtype=F64) @ torch.randn(3, 15, generator=gen, dtype=F64)
    param = torch.nn.Parameter(torch.zeros(20, 15, dtype=F64))
    optimizer = LoRAPreAdamW([param], lr=0.0, rank=rank)
    for _ in range(300):
        param.grad = g
        optimizer.step()
    state = optimizer.state[param]
    exact_ema = (1 - 0.9**300) * g
    assert ((state["B"] @ state["A"] - exact_ema).norm() / exact_ema.norm()).item() < 1e-4  # noisy stream: 0.25+


@pytest.mark.parametrize("magnitude", [0.0, 1e-30, 5e18])
def test_6_no_nan_or_inf_for_zero_tiny_or_huge_gradients(magnitude):
    # Huge: up to 7.5e18, just below the gradient limit (~9.2e18 for float32 state; a larger entry skips the step,
    # tests/optim/test_huge_gradients.py), whose squares overflow float32 in a sum of two.
    torch.manual_seed(9)
    param = torch.nn.Parameter(torch.randn(24, 16))
    optimizer = LoRAPreAdamW([param], lr=1e-3, rank=4, weight_decay=0.01)
    for step in range(1, 6):
        before = param.detach().clone()
        param.grad = magnitude * torch.randn(24, 16).clamp(-1.5, 1.5)
        optimizer.step()
        assert optimizer.skipped_steps() == 0
        state = optimizer.state[param]
        for tensor in (param, state["B"], state["A"], state["V_B"], state["V_A"]):
            assert torch.isfinite(tensor).all()
        # The second moment as read at the next step (g = 0); in float64, as 1e38 barely fits a float32 (the
        # optimizer never squares such values: it takes hypot(g, rho V_B V_A) instead of sqrt(v)).
        v = 0.999 * (state["V_B"].double() @ state["V_A"].double()) ** 2
        assert (v >= 0).all() and torch.isfinite(v).all()
        if magnitude == 5e18 and step == 1:  # Adam's first step is lr * sign(g), even where g^2 overflows
            decayed = before * (1 - 1e-3 * 0.01)
            torch.testing.assert_close(param.detach(), decayed - 1e-3 * param.grad.sign(), rtol=0, atol=1e-6)


def test_6_bf16_parameters_keep_float32_state_and_follow_the_float32_run():
    torch.manual_seed(10)
    # Weights of size ~0.1: bf16 resolves them to ~4e-4, well below the bounded steps (~lr = 1e-2). (With unit
    # weights, bf16's spacing of 8e-3 near 1 would be the size of a step, and only an unbounded step could pass.)
    W0 = 0.1 * torch.randn(32, 24)
    grads = [torch.randn(32, 24) for _ in range(5)]
    runs = {}
    for dtype in (torch.bfloat16, torch.float32):
        param = torch.nn.Parameter(W0.to(dtype, copy=True))
        optimizer = LoRAPreAdamW([param], lr=1e-2, rank=4, seed=0)
        for grad in grads:
            param.grad = grad.to(dtype)
            optimizer.step()
        assert param.dtype == dtype
        assert all(optimizer.state[param][key].dtype == torch.float32 for key in ("B", "A", "V_B", "V_A"))
        runs[dtype] = param.detach().float()
    assert torch.isfinite(runs[torch.bfloat16]).all()
    moved = (runs[torch.float32] - W0).abs().mean()
    assert (runs[torch.bfloat16] - runs[torch.float32]).abs().mean() < 0.1 * moved
