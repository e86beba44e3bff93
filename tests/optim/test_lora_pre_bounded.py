"""LoRA-Pre Adam's bounded, finite steps (the 2026-11-30 amendment): the debiased second moment and the update
bound are the defaults, each checked against torch.optim.Adam or against the bound itself, never against the
optimizer's own output."""
import math

import pytest
import torch
from benchmark_scripts import load_benchmark

from lit_lowrank.optim import LoRAPreAdamW
from lit_lowrank.optim.lora_pre.adam_scalars import adam_worst_case

PAPER = {"debias_second_moment": False, "update_bound": "none"}  # the paper's formula, unsafe
BETAS = (0.9, 0.999)

pytestmark = pytest.mark.usefixtures("one_thread")


def _run(optimizer_factory, gradients):
    weight = torch.nn.Parameter(torch.zeros_like(gradients[0]))
    optimizer = optimizer_factory([weight])
    trajectory = []
    for gradient in gradients:
        weight.grad = gradient.clone()
        optimizer.step()
        trajectory.append(weight.detach().clone())
    return torch.stack(trajectory)


def test_worst_case_constant_matches_its_definition_and_limit():
    beta1, beta2 = BETAS
    for t in (1, 2, 7, 100):
        w = [(1 - beta1) * beta1 ** (t - i) / (1 - beta1**t) for i in range(1, t + 1)]
        u = [(1 - beta2) * beta2 ** (t - i) / (1 - beta2**t) for i in range(1, t + 1)]
        assert adam_worst_case(t, beta1, beta2) == pytest.approx(sum(a * a / b for a, b in zip(w, u)), rel=1e-12)
    assert adam_worst_case(2, beta1, beta2) == pytest.approx(1.003, abs=1e-3)
    limit = (1 - beta1) ** 2 / ((1 - beta2) * (1 - beta1**2 / beta2))
    assert adam_worst_case(10**6, beta1, beta2) == pytest.approx(limit, rel=1e-9) and 52 < limit < 54


@pytest.mark.parametrize("update_bound", ["v_floor", "adam_floor", "rms_clip"])
def test_default_equals_adam_for_a_steady_gradient(update_bound):
    gradient = torch.randn(12, 9, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    # rank = min(p, q): A is square and B spans the gradient's columns from step 1, so both regressions are
    # exact up to the damping (a smaller rank is exact only asymptotically, once A's rows have turned)
    exact = dict(lr=1e-2, rank=9, full_rank="factored", damping=1e-12, update_bound=update_bound)
    adam = _run(lambda p: torch.optim.Adam(p, lr=1e-2), [gradient] * 12)
    default = _run(lambda p: LoRAPreAdamW(p, **exact), [gradient] * 12)
    torch.testing.assert_close(default, adam, rtol=1e-6, atol=1e-10)


def test_default_converges_to_adam_for_a_steady_low_rank_gradient():
    # Rank 1, so that |g| = |u| |v|^T has rank 1 too and both regressions can become exact at r < min(p, q).
    # They start from random right factors, so the steps reach Adam's only as those turn (about 1 / t here).
    generator = torch.Generator().manual_seed(1)
    gradient = torch.randn(20, 1, generator=generator, dtype=torch.float64) @ torch.randn(
        1, 16, generator=generator, dtype=torch.float64)
    checkpoints = (100, 1000, 3000)
    adam = _run(lambda p: torch.optim.Adam(p, lr=1e-3), [gradient] * checkpoints[-1]).diff(dim=0)
    default = _run(lambda p: LoRAPreAdamW(p, lr=1e-3, rank=4, damping=1e-12), [gradient] * checkpoints[-1]).diff(dim=0)
    errors = [float(((default[t - 2] - adam[t - 2]).abs() / adam[t - 2].abs()).max()) for t in checkpoints]
    assert errors[0] > errors[1] > errors[2] and errors[2] < 0.02, errors
    assert float(default.abs().max()) <= 1e-3  # the default's bound: no step larger than lr


def test_paper_formula_is_kept_behind_its_option_with_its_larger_second_step():
    gradient = torch.randn(12, 9, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    exact = dict(lr=1e-2, rank=9, full_rank="factored", damping=1e-12)
    adam = _run(lambda p: torch.optim.Adam(p, lr=1e-2), [gradient] * 3)
    paper = _run(lambda p: LoRAPreAdamW(p, **exact, **PAPER), [gradient] * 3)
    torch.testing.assert_close(paper[0], adam[0])  # step 1 is Adam's either way (invariant 4)
    # afterwards the paper's v is below Adam's: at t = 2 its bias-corrected v is
    # (beta2 (1 - sqrt(beta2))^2 + 1 - beta2) / (1 - beta2^2) g^2 instead of g^2, so the step is larger by:
    beta2 = BETAS[1]
    expected = ((1 - beta2**2) / (beta2 * (1 - beta2**0.5) ** 2 + 1 - beta2)) ** 0.5
    step_ratio = (paper[1] - paper[0]).abs().max() / (adam[1] - adam[0]).abs().max()
    assert abs(step_ratio - expected) < 1e-3 * expected and expected > 1.4


def test_paper_formula_warns_that_it_is_unbounded(caplog):
    LoRAPreAdamW([torch.nn.Parameter(torch.zeros(8, 8))], rank=2, **PAPER)
    assert "not bounded" in caplog.text


def _largest_moves(options, zero_at):
    """The issue's probe, as ``benchmarks/lora_pre_bound_probe.py`` runs it: a 16-32-32-4 MLP, cross-entropy, lr 1e-2,
    rank 2, six steps, one all-zero gradient at step ``zero_at``; the largest change of any weight per step."""
    return load_benchmark("lora_pre_bound_probe").probe(options, zero_at)[0]


def _slack(weight_size=4.0):
    """Rounding of the measured move |W_new - W_old| in float32 for weights up to ``weight_size``."""
    return 2 * torch.finfo(torch.float32).eps * weight_size


@pytest.mark.parametrize("zero_at", [2, 4])
def test_a_zero_gradient_moves_no_weight_by_more_than_lr_by_default(zero_at):
    # The biases are plain AdamW (inside the same optimizer), whose own bound is lr * sqrt(C_t), not lr.
    for step, move in enumerate(_largest_moves({}, zero_at), start=1):
        assert move <= 1e-2 * math.sqrt(adam_worst_case(step, *BETAS)) + _slack(), (step, move)
    assert max(_largest_moves(PAPER, zero_at)) > 1.0  # the paper's formula: the steps of 1 to 2900 x lr


def _bound(update_bound, step):
    return {"v_floor": 1.0, "adam_floor": math.sqrt(adam_worst_case(step, *BETAS))}[update_bound]


def _gradient_sequence(generator, shape, steps):
    """Random gradients with the cases that break an unbounded update: zeros, tiny values, spikes, sign flips."""
    previous = torch.randn(shape, generator=generator)
    for _ in range(steps):
        kind = int(torch.randint(0, 6, (), generator=generator))
        magnitude = 10.0 ** float(torch.empty(()).uniform_(-12, 12, generator=generator))
        if kind == 0:
            grad = torch.zeros(shape)
        elif kind == 1:
            grad = -previous  # sign flip
        elif kind == 2:
            grad = previous * (torch.rand(shape, generator=generator) < 0.1)  # sparse spike pattern
        else:
            grad = torch.randn(shape, generator=generator)
        previous = magnitude * grad
        yield previous


@pytest.mark.parametrize("update_bound", ["v_floor", "adam_floor"])
@pytest.mark.parametrize("seed", range(6))
def test_property_random_gradient_sequences_never_exceed_the_bound(update_bound, seed):
    generator = torch.Generator().manual_seed(seed)
    weight = torch.nn.Parameter(torch.randn(24, 18, generator=generator))
    lr, scale = 1e-2, 0.25
    optimizer = LoRAPreAdamW([weight], lr=lr, scale=scale, rank=3, update_bound=update_bound, seed=seed)
    for step, grad in enumerate(_gradient_sequence(generator, (24, 18), 40), start=1):
        before = weight.detach().clone()
        weight.grad = grad
        optimizer.step()
        move = float((weight.detach() - before).abs().max())
        assert move <= lr * scale * _bound(update_bound, step) * (1 + 1e-5) + _slack(), (step, move)
        assert torch.isfinite(weight).all()


@pytest.mark.parametrize("seed", range(3))
def test_property_rms_clip_keeps_the_update_rms_at_most_lr(seed):
    generator = torch.Generator().manual_seed(seed)
    weight = torch.nn.Parameter(torch.randn(24, 18, generator=generator))
    optimizer = LoRAPreAdamW([weight], lr=1e-2, rank=3, update_bound="rms_clip", seed=seed)
    for grad in _gradient_sequence(generator, (24, 18), 30):
        before = weight.detach().clone()
        weight.grad = grad
        optimizer.step()
        assert float((weight.detach() - before).pow(2).mean().sqrt()) <= 1e-2 * (1 + 1e-5) + _slack()


def test_weight_decay_is_outside_the_bound():
    weight = torch.nn.Parameter(torch.full((10, 8), 2.0))
    optimizer = LoRAPreAdamW([weight], lr=1e-2, rank=2, weight_decay=0.5)
    for grad in (torch.randn(10, 8), torch.zeros(10, 8)):
        before = weight.detach().clone()
        weight.grad = grad
        optimizer.step()
        decayed = before * (1 - 1e-2 * 0.5)
        assert float((weight.detach() - decayed).abs().max()) <= 1e-2 * (1 + 1e-5) + _slack()


def test_invalid_bound_options_raise_clear_errors():
    weight = torch.nn.Parameter(torch.zeros(8, 8))
    with pytest.raises(ValueError, match="invalid update_bound 'clip'.*expected one of"):
        LoRAPreAdamW([weight], rank=2, update_bound="clip")
    with pytest.raises(TypeError, match="invalid debias_second_moment"):
        LoRAPreAdamW([weight], rank=2, debias_second_moment="yes")


@pytest.mark.parametrize("magnitude", [1.0, 1e-30, 5e18])
def test_cpu_squares_agree_with_hypot_and_are_not_used_where_they_could_overflow(monkeypatch, magnitude):
    # The CPU path forms sqrt(x^2 + g^2) and the floor from squares when nothing can overflow; |g| up to 7.5e18 (below
    # the gradient limit, ~9.2e18, beyond which the step is skipped) is too close to float32's largest square there,
    # so it must take torch.hypot. Either way: the hypot path's numbers, within the bound.
    from lit_lowrank.optim.lora_pre.adam_passes import TorchAdamPasses

    generator = torch.Generator().manual_seed(0)
    gradients = [magnitude * torch.randn(16, 12, generator=generator).clamp(-1.5, 1.5) for _ in range(5)]
    used = []
    real = TorchAdamPasses._squares_are_safe
    monkeypatch.setattr(TorchAdamPasses, "_squares_are_safe", lambda self: used.append(real(self)) or used[-1])
    squares = _run(lambda p: LoRAPreAdamW(p, lr=1e-2, rank=3, seed=0), gradients)
    assert used == [magnitude < 1e18] * 5
    monkeypatch.setattr(TorchAdamPasses, "_squares_are_safe", lambda self: False)
    hypot = _run(lambda p: LoRAPreAdamW(p, lr=1e-2, rank=3, seed=0), gradients)
    torch.testing.assert_close(squares, hypot, rtol=1e-5, atol=1e-7)
    assert float(squares.diff(dim=0).abs().max()) <= 1e-2 * (1 + 1e-5)
