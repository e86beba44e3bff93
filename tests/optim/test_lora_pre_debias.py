"""The second moment's warm-up: the spec's bias correction vs the debiased extension, against torch.optim.Adam."""
import torch

from lit_lowrank.optim import LoRAPreAdamW


def _run(optimizer_factory, gradient, steps):
    weight = torch.nn.Parameter(torch.zeros_like(gradient))
    optimizer = optimizer_factory([weight])
    trajectory = []
    for _ in range(steps):
        weight.grad = gradient.clone()
        optimizer.step()
        trajectory.append(weight.detach().clone())
    return torch.stack(trajectory)


def test_debiased_second_moment_equals_adam_for_a_steady_gradient():
    generator = torch.Generator().manual_seed(0)
    gradient = torch.randn(12, 9, generator=generator, dtype=torch.float64)
    # rank = min(p, q): A is square and B spans the gradient's columns from step 1, so both regressions are
    # exact up to the damping (a smaller rank is exact only asymptotically, once A's rows have turned)
    exact = dict(lr=1e-2, rank=9, full_rank="factored", damping=1e-12)
    adam = _run(lambda p: torch.optim.Adam(p, lr=1e-2), gradient, 12)
    debiased = _run(lambda p: LoRAPreAdamW(p, **exact, debias_second_moment=True), gradient, 12)
    spec = _run(lambda p: LoRAPreAdamW(p, **exact), gradient, 12)
    torch.testing.assert_close(debiased, adam, rtol=1e-6, atol=1e-10)
    torch.testing.assert_close(spec[0], adam[0])  # step 1 is Adam's either way (invariant 4)
    # afterwards the spec's v is below Adam's: at t = 2 its bias-corrected v is
    # (beta2 (1 - sqrt(beta2))^2 + 1 - beta2) / (1 - beta2^2) g^2 instead of g^2, so the step is larger by:
    beta2 = 0.999
    expected = ((1 - beta2**2) / (beta2 * (1 - beta2**0.5) ** 2 + 1 - beta2)) ** 0.5
    step_ratio = (spec[1] - spec[0]).abs().max() / (adam[1] - adam[0]).abs().max()
    assert abs(step_ratio - expected) < 1e-3 * expected and expected > 1.4


def test_debias_keeps_steps_bounded_on_a_noisy_stream():
    generator = torch.Generator().manual_seed(1)
    grads = [torch.randn(40, 30, generator=generator) for _ in range(5)]
    results = {}
    for debias in (False, True):
        weight = torch.nn.Parameter(torch.zeros(40, 30))
        optimizer = LoRAPreAdamW([weight], lr=1e-2, rank=4, debias_second_moment=debias)
        largest = 0.0
        for grad in grads:
            before = weight.detach().clone()
            weight.grad = grad
            optimizer.step()
            largest = max(largest, float((weight - before).abs().max()))
        results[debias] = largest
    # Adam's steps are about lr at most; the spec's can be orders larger where the current gradient is small
    assert results[True] < 5e-2 < results[False]
