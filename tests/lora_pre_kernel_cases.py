"""Shared by the LoRA-Pre Adam kernel tests (``tests/kernels/test_lora_pre_adam_*.py``): where they run, the
dispatcher reset before each test, the tolerances, launch counting, float64 formulas of what the two passes write
and return, random batches, and (below the formulas) one matrix's steps through the optimizer's update function on
either path, with the first passes counted.

Import it after ``pytest.importorskip("triton")``: it imports the kernel module, which needs triton and
``TRITON_INTERPRET`` set first (``tests/kernels/conftest.py``). Natively (``TRITON_INTERPRET=0``) without a GPU,
importing it skips the importing test module. The fixtures (``fresh_dispatch``, autouse, ``launches`` and
``kernel_calls``) take effect in a test module that binds them to a name of its own.

The float64 formulas are those of the kernels' docstring (``kernels/lora_pre_adam_jit.py``), layer by layer
(nothing of the optimizer's code): the kernels sum and round in fp32, in another order, so values agree to fp32
rounding relative to each tensor's magnitude (:func:`close`), and bf16 / fp16 parameters by one ulp at most in a few
entries (:func:`close_param`).
"""
import os
from collections import Counter

import pytest
import torch

from lit_lowrank.kernels import dispatch, lora_pre_adam
from lit_lowrank.optim.lora_pre.adam_update import lora_pre_adam_update_
from lit_lowrank.optim.lora_pre.factors import Workspace, init_factor_pairs

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


# ---------------------------------------------------------------------------- one matrix's steps, either path
@pytest.fixture
def kernel_calls(monkeypatch):
    """Counts the Triton backend's first passes as (L, shape), so a test cannot pass by silently running torch."""
    calls = []
    original = lora_pre_adam.first_pass

    def counted(params, *args, **kwargs):
        calls.append((len(params), tuple(params[0].shape)))
        return original(params, *args, **kwargs)

    monkeypatch.setattr(lora_pre_adam, "first_pass", counted)
    return calls


# The kernel forms m_t without the residual step (it falls back to torch for it): pinned off here.
HYPER = dict(lr=1e-2, beta1=0.9, beta2=0.999, eps=1e-8, damping=1e-6, residual_step=False)


def verify_kernel():
    """One small kernel step, so the dispatcher counts the kernel as verified: a process's first launch also
    compiles what it needs up front (the adapter's business), which tests counting steady-state launches skip."""
    gen = torch.Generator().manual_seed(99)
    Matrix(torch.randn(20, 24, generator=gen), 2).step(torch.randn(20, 24, generator=gen), 1, True)
    assert dispatch.verified("lora_pre_adam")


class Matrix:
    """A weight, its four factors (as the optimizer initialises them) and a workspace: one path's state."""

    def __init__(self, W, r, seed=0, device=DEVICE):
        self.W = W.to(device, copy=True)  # keeps W's strides
        (self.B, self.A), (self.V_B, self.V_A) = init_factor_pairs(tuple(W.shape), r, seed, 2, torch.float32, W.device)
        self.workspace = Workspace()

    def step(self, grad, step, use_triton, device_side=False, ok=True, **options):
        """Step ``step``; ``device_side``: as a device-side skip (the count a 0-d tensor, ``ok`` a 0-d flag)."""
        options = {**HYPER, "weight_decay": 0.0, "scale": 1.0, "factor_update": "alternating", **options}
        if device_side:
            device = self.W.device
            options.update(ok=torch.tensor(ok, device=device), step=torch.tensor(float(step), device=device))
        else:
            options.update(step=step)
        lora_pre_adam_update_(self.W, grad.to(self.W.device), self.B, self.A, self.V_B, self.V_A, chunk_rows=16,
                              workspace=self.workspace, use_triton=use_triton, **options)

    def factors(self):
        return [self.B, self.A, self.V_B, self.V_A]


def run_both(W, grads, r, **options):
    """The kernel and torch paths from the same start over the same gradients: (kernel, torch) Matrix pair."""
    kernel, torch_path = Matrix(W, r), Matrix(W, r)
    for step, grad in enumerate(grads, start=1):
        kernel.step(grad, step, True, **options)
        torch_path.step(grad, step, False, **options)
    return kernel, torch_path


def assert_paths_agree(kernel, torch_path, W0, factor_rtol=2e-5):
    assert kernel.W.dtype == W0.dtype and all(f.dtype == torch.float32 for f in kernel.factors())
    close_param(kernel.W, torch_path.W, W0)
    for got, want in zip(kernel.factors(), torch_path.factors(), strict=True):
        close(got, want, rtol=factor_rtol)


CASES = [  # p, q, r, dtype, factor_update, weight_decay, debias_second_moment, scale, update_bound
    (37, 53, 3, torch.float32, "alternating", 0.0, False, 2.0, "none"),
    (37, 53, 3, torch.float32, "jacobi", 0.1, True, 0.25, "v_floor"),
    (37, 53, 3, torch.bfloat16, "alternating", 0.1, True, 0.25, "adam_floor"),
    (70, 45, 18, torch.float32, "alternating", 0.1, True, 0.5, "adam_floor"),  # r = 18: two rank chunks, R_PAD = 32
    (33, 40, 5, torch.float16, "alternating", 0.1, True, 1.0, "v_floor"),
]
