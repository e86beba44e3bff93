"""Shared by the LoRA-Pre Adam kernel tests (``tests/kernels/test_lora_pre_adam_launchers.py`` and
``tests/kernels/test_lora_pre_adam_kernel.py``): where they run, the dispatcher reset before each test, the
tolerances, launch counting, float64 formulas of what the two passes write and return, and random batches.

Import it after ``pytest.importorskip("triton")``: it imports the kernel module, which needs triton and
``TRITON_INTERPRET`` set first (``tests/kernels/conftest.py``). Natively (``TRITON_INTERPRET=0``) without a GPU,
importing it skips the importing test module. The fixtures (``fresh_dispatch``, autouse, and ``launches``) take
effect in a test module that binds them to a name of its own.

The float64 formulas are those of the kernel module's docstring, layer by layer (nothing of the optimizer's code):
the kernels sum and round in fp32, in another order, so values agree to fp32 rounding relative to each tensor's
magnitude (:func:`close`), and bf16 / fp16 parameters by one ulp at most in a few entries (:func:`close_param`).
"""
import os
from collections import Counter

import pytest
import torch

from lit_lowrank.kernels import dispatch, lora_pre_adam

KERNEL_MODULE = "lit_lowrank.kernels.lora_pre_adam"
# benchmarks/gpu_acceptance.sh runs the kernel tests natively (TRITON_INTERPRET=0): the same comparisons on CUDA
# tensors, with the compiled, autotuned kernels; tests of the interpreter's own machinery skip (``interpreted``).
NATIVE = os.environ.get("TRITON_INTERPRET", "1").lower() in ("0", "false", "off")
DEVICE = torch.device("cuda" if NATIVE and torch.cuda.is_available() else "cpu")
interpreted = pytest.mark.skipif(NATIVE, reason="Triton's interpreter on CPU only")
if NATIVE and DEVICE.type == "cpu":
    pytest.skip("natively the kernels need a GPU", allow_module_level=True)


@pytest.fixture(autouse=True)
def fresh_dispatch(monkeypatch):
    assert lora_pre_adam.INTERPRETED != NATIVE, f"{KERNEL_MODULE} was imported before TRITON_INTERPRET was set"
    monkeypatch.setenv(dispatch.CHECK_ENV, "0")  # these compare the kernel itself: no self-check swapping torch in
    dispatch.reset()
    yield
    dispatch.reset()


def close(actual, expected, rtol=2e-5):
    """Equal up to ``rtol`` of the expected tensor's largest magnitude (entries near 0 carry absolute error)."""
    actual, expected = actual.detach().float().cpu(), expected.detach().float().cpu()
    scale = expected.abs().max().clamp_min(1e-30)
    torch.testing.assert_close(actual, expected, rtol=0, atol=float(rtol * scale))


def close_param(actual, expected, initial):
    """fp32: the displacements agree to fp32 rounding; bf16/fp16: one ulp at most, in a few entries only."""
    actual, expected, initial = actual.detach().cpu(), expected.detach().cpu(), initial.detach().cpu()
    if actual.dtype == torch.float32:
        close(actual - initial, expected - initial)
    else:
        ulp = torch.finfo(actual.dtype).eps * expected.float().abs().clamp_min(torch.finfo(actual.dtype).tiny)
        assert ((actual.float() - expected.float()).abs() <= ulp).all()
        assert (actual == expected).float().mean() > 0.97



class Launches:
    """Counts launches of the kernel a pass uses (the autotuned one natively), by pass."""

    def __init__(self, monkeypatch):
        self.counts = Counter()
        for name, tuned in (("first", "_first_autotuned"), ("second", "_second_autotuned")):
            attribute = tuned if getattr(lora_pre_adam, tuned) is not None else f"_{name}_pass"
            monkeypatch.setattr(lora_pre_adam, attribute, self.wrap(getattr(lora_pre_adam, attribute), name))

    def wrap(self, kernel, name):
        counts = self.counts

        class Counted:
            def __getitem__(self, grid):
                counts[name] += 1
                return kernel[grid]

        return Counted()


@pytest.fixture
def launches(monkeypatch):
    return Launches(monkeypatch).counts


def f32(x: float) -> float:
    """``x`` as the kernel receives a float argument: rounded to fp32."""
    return float(torch.tensor(x, dtype=torch.float32))


def expected_first_pass(params, grads, left, right, right_pinvs, kappa, decay, scalars):
    """What the first pass writes and returns, in float64 layer by layer: ``scalars[l]`` = (rho, step_size,
    eps_hat, floor) of layer l (floor 0: no bound), None where the layer's step is skipped (W kept)."""
    new_params, sums = [], []
    for layer, (W, G) in enumerate(zip(params, grads, strict=True)):
        g = G.double().cpu()
        B, V_B, A, V_A, A_pinv, V_A_pinv = (t[k, layer].double().cpu() for t in (left, right, right_pinvs)
                                             for k in (0, 1))
        sums.append(torch.stack([g @ A_pinv.T, g.abs() @ V_A_pinv.T]))
        if scalars[layer] is None:
            new_params.append(W.detach().cpu().clone())
            continue
        rho, step_size, eps_hat, floor = scalars[layer]
        m = g + f32(kappa) * (B @ A)
        root_v = torch.hypot(g.abs(), f32(rho) * (V_B @ V_A))
        if floor != 0.0:
            root_v = torch.maximum(root_v, f32(floor) * m.abs())
        w = W.detach().cpu()
        if decay is not None:  # decayed in place first, rounded to W's dtype (an fp32 product)
            w = (w.double() * f32(decay)).float().to(W.dtype)
        new_params.append((w.double() - f32(step_size) * m / (root_v + f32(eps_hat))).float().to(W.dtype))
    return new_params, torch.stack(sums, dim=1)


def expected_second_pass(grads, left_pinvs):
    return torch.stack([torch.stack([left_pinvs[0, layer].double().cpu() @ G.double().cpu(),
                                     left_pinvs[1, layer].double().cpu() @ G.double().abs().cpu()])
                        for layer, G in enumerate(grads)], dim=1)


def matrices(L, p, q, dtype, strided, gen, scale=1.0):
    """L p x q matrices of ``dtype`` (column-major views of transposes when ``strided``), on the device."""
    if strided:
        return [(torch.randn(q, p, generator=gen) * scale).to(DEVICE, dtype).T for _ in range(L)]
    return [(torch.randn(p, q, generator=gen) * scale).to(DEVICE, dtype) for _ in range(L)]


def stacks(L, p, q, r, gen):
    """[B, V_B], [A, V_A], [A_pinv, V_A_pinv] and [B_pinv, V_B_pinv] of a trained-looking state (fp32)."""
    left = torch.randn(2, L, p, r, generator=gen) * 0.05
    right = torch.randn(2, L, r, q, generator=gen) / q**0.5
    right_pinvs = torch.randn(2, L, r, q, generator=gen) / q**0.5
    left_pinvs = torch.randn(2, L, r, p, generator=gen) / p**0.5
    return (t.to(DEVICE) for t in (left, right, right_pinvs, left_pinvs))
