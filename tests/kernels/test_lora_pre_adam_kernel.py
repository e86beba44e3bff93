"""Whole LoRA-Pre Adam steps through the Triton backend, under Triton's interpreter on CPU:
``lora_pre_adam_update_(..., use_triton=True)`` and ``LoRAPreAdamW(use_triton=True)`` against the torch path of the
same function (``use_triton=False``), which ``tests/optim`` checks against the spec's invariants and dense Adam;
the fallbacks to torch, the device-side skip, FSDP2's sharded rows, the GPU configs and autotune hooks under an
emulated autotuner, and the sm_90 compile. The interpreter runs small tiles (32 x 32, two tiles per slot, rank
chunks of 16), so the shapes below span several tiles, slots and rank chunks, with ragged edges in every dimension.
The launchers alone, against float64 formulas: ``test_lora_pre_adam_launchers.py``; shared helpers:
``tests/lora_pre_kernel_cases.py``.
"""
import contextlib
import copy
import sys
import threading
import warnings

import pytest
import torch
from torch import nn

pytest.importorskip("triton", reason="triton cannot be imported")

import lora_pre_kernel_cases as cases  # noqa: E402
import triton  # noqa: E402
import triton.language as tl  # noqa: E402
from hopper_compile import compile_for_hopper  # noqa: E402
from lora_pre_kernel_cases import (  # noqa: E402
    DEVICE,
    KERNEL_MODULE,
    close,
    close_param,
    expected_first_pass,
    expected_second_pass,
    interpreted,
    matrices,
    stacks,
)

from lit_lowrank.kernels import (
    dispatch,  # noqa: E402
    lora_pre_adam,  # noqa: E402
)
from lit_lowrank.kernels.dispatch import KernelFallbackWarning, should_use_kernel  # noqa: E402
from lit_lowrank.optim import LoRAPreAdamW, LoRAPreMuon  # noqa: E402
from lit_lowrank.optim.lora_pre import (
    adam_kernel,  # noqa: E402
    adam_scalars,  # noqa: E402
)
from lit_lowrank.optim.lora_pre.adam_update import lora_pre_adam_update_  # noqa: E402
from lit_lowrank.optim.lora_pre.factors import Workspace, init_factor_pairs  # noqa: E402

# The shared fixtures, bound here so that pytest uses them for this module's tests.
fresh_dispatch, launches = cases.fresh_dispatch, cases.launches


# ------------------------------------------------------------------------------------ steps through the adapter
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


@pytest.mark.parametrize("p,q,r,dtype,factor_update,weight_decay,debias,scale,bound", CASES,
                         ids=[f"{c[0]}x{c[1]}r{c[2]}-{str(c[3])[6:]}-{c[4]}-wd{c[5]}-debias{c[6]}-scale{c[7]}-{c[8]}"
                              for c in CASES])
def test_kernel_step_equals_the_torch_path_over_steps(p, q, r, dtype, factor_update, weight_decay, debias, scale,
                                                      bound, kernel_calls):
    gen = torch.Generator().manual_seed(p * q + r)
    W0 = torch.randn(p, q, generator=gen).to(dtype)
    # A gradient stream with a persistent low-rank part, so the factors have something to track.
    signal = torch.randn(p, 2, generator=gen) @ torch.randn(2, q, generator=gen)
    grads = [(signal + torch.randn(p, q, generator=gen)).mul(1e-2).to(dtype) for _ in range(3)]
    kernel, torch_path = run_both(W0, grads, r, factor_update=factor_update, weight_decay=weight_decay,
                                  debias_second_moment=debias, scale=scale, update_bound=bound)
    assert kernel_calls == [(1, (p, q))] * 3
    assert not torch.equal(kernel.W.cpu(), W0) and kernel.B.abs().max() > 0  # the step did move things
    assert_paths_agree(kernel, torch_path, W0)


@pytest.mark.parametrize("bound", ["v_floor", "adam_floor"])
def test_the_fused_bound_holds_where_it_binds_like_the_torch_path(bound, kernel_calls):
    """A zero gradient after two normal ones: the floor binds (|m_hat| > sqrt(v_hat) in many entries), in the
    kernel's registers as in the torch path, and no entry moves by more than lr * scale * sqrt(C_t)."""
    gen = torch.Generator().manual_seed(5)
    W0 = torch.randn(45, 70, generator=gen)
    grads = [torch.randn(45, 70, generator=gen), torch.randn(45, 70, generator=gen), torch.zeros(45, 70)]
    kernel, torch_path = Matrix(W0, 4), Matrix(W0, 4)
    for step, grad in enumerate(grads, start=1):
        before = kernel.W.clone()
        kernel.step(grad, step, True, update_bound=bound, scale=0.5)
        torch_path.step(grad, step, False, update_bound=bound, scale=0.5)
        limit = 1.0 if bound == "v_floor" else adam_scalars.adam_worst_case(step, 0.9, 0.999) ** 0.5
        assert (kernel.W - before).abs().max() <= HYPER["lr"] * 0.5 * limit * (1 + 1e-5) + 1e-6
    unbounded = Matrix(W0, 4)
    for step, grad in enumerate(grads, start=1):
        unbounded.step(grad, step, False, update_bound="none", scale=0.5)
    assert (unbounded.W.cpu() - W0).abs().max() > 2 * (kernel.W.cpu() - W0).abs().max()  # the bound did bind
    assert len(kernel_calls) == 3
    assert_paths_agree(kernel, torch_path, W0)


def test_rms_clip_is_not_fused_and_falls_back_with_one_warning(kernel_calls):
    matrix = Matrix(torch.randn(40, 36), 4)
    with pytest.warns(KernelFallbackWarning, match="rms_clip"):
        matrix.step(torch.randn(40, 36), 1, True, update_bound="rms_clip")
    assert kernel_calls == []


def test_the_residual_step_is_not_fused_and_falls_back_with_one_warning(kernel_calls, monkeypatch):
    """The default residual step needs g A_pinv^T of whole rows before m_t: the torch path runs it, and says so where
    the kernel was asked for; it equals the torch path's step exactly (it is that step)."""
    monkeypatch.setattr(dispatch, "_warned", set())  # whatever ran before in this process
    W0, grad = torch.randn(40, 36), torch.randn(40, 36)
    asked, plain = Matrix(W0, 4), Matrix(W0, 4)
    with pytest.warns(KernelFallbackWarning, match="residual_step"):
        asked.step(grad, 1, True, residual_step=True)
    plain.step(grad, 1, False, residual_step=True)
    asked.step(grad, 2, True, residual_step=True)  # no second warning: one per process and cause
    plain.step(grad, 2, False, residual_step=True)
    assert kernel_calls == []
    assert torch.equal(asked.W, plain.W) and all(map(torch.equal, asked.factors(), plain.factors()))


def test_strided_parameter_and_gradient(kernel_calls):
    """A column-major weight and gradient (views of transposes): the kernel takes any strides, like torch."""
    gen = torch.Generator().manual_seed(5)
    W0 = torch.randn(53, 37, generator=gen).T  # 37 x 53 with strides (1, 37)
    grads = [torch.randn(53, 37, generator=gen).T * 1e-2 for _ in range(3)]
    kernel, torch_path = Matrix(W0, 4), Matrix(W0.contiguous(), 4)
    for step, grad in enumerate(grads, start=1):
        kernel.step(grad, step, True, weight_decay=0.1)
        torch_path.step(grad.contiguous(), step, False, weight_decay=0.1)
    assert kernel.W.stride() == (1, 37) and len(kernel_calls) == 3
    assert_paths_agree(kernel, torch_path, W0)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("magnitude", [0.0, 1e-30, 1e30], ids=["zero", "tiny", "huge"])
def test_zero_tiny_and_huge_gradients_stay_finite_like_the_torch_path(magnitude, dtype, kernel_calls):
    gen = torch.Generator().manual_seed(7)
    W0 = torch.randn(37, 53, generator=gen).to(dtype)
    grads = [(torch.randn(37, 53, generator=gen) * magnitude).to(dtype) for _ in range(3)]
    kernel, torch_path = run_both(W0, grads, 3, weight_decay=0.1, debias_second_moment=True)
    for tensor in [kernel.W, *kernel.factors()]:
        assert torch.isfinite(tensor).all()
    assert_paths_agree(kernel, torch_path, W0, factor_rtol=1e-4)
    if magnitude == 0.0:  # decoupled weight decay only; the moments' factors shrink towards zero
        assert kernel.B.abs().max() == 0 and kernel.V_B.abs().max() == 0


def assert_optimizers_agree(nets, initial, optimizers, dtype):
    for p_k, p_t, p_0 in zip(nets[True].parameters(), nets[False].parameters(), initial.parameters(), strict=True):
        assert p_k.dtype == dtype
        if dtype == torch.float32:
            close(p_k - p_0, p_t - p_0)  # AdamW tensors too: their gradients come through the factored weights
        else:
            close_param(p_k.detach(), p_t.detach(), p_0.detach())
        s_k, s_t = optimizers[True].state[p_k], optimizers[False].state[p_t]
        assert s_k.keys() == s_t.keys()
        for key, value in s_k.items():
            if isinstance(value, torch.Tensor):
                assert value.dtype == torch.float32
                close(value, s_t[key])
            else:
                assert value == s_t[key]


def train_both(make, batch, steps=3, device_side=None):
    """The same model under LoRAPreAdamW with and without the kernels, ``steps`` steps on the same data;
    ``device_side``: force the device-side skip on (True) or off (False)."""
    nets = {flag: make() for flag in (True, False)}
    optimizers = {flag: LoRAPreAdamW(net.parameters(), lr=1e-2, rank=3, weight_decay=0.1, scale=0.5, seed=1,
                                     debias_second_moment=True, use_triton=flag, residual_step=False)
                  for flag, net in nets.items()}
    for optimizer in optimizers.values():
        optimizer._device_side_skip = device_side
    gen = torch.Generator().manual_seed(3)
    for _ in range(steps):
        x, y = (t.to(DEVICE, next(nets[True].parameters()).dtype) for t in batch(gen))
        for flag, net in nets.items():
            (net(x) - y).float().square().mean().backward()
            with warnings.catch_warnings():
                warnings.simplefilter("error", KernelFallbackWarning)
                optimizers[flag].step()
            optimizers[flag].zero_grad()
    return nets, optimizers


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_optimizer_with_kernel_equals_torch_path(dtype, kernel_calls):
    """LoRAPreAdamW(use_triton=True) on a small model: ragged matrices factored, biases and a norm on AdamW."""

    def make():
        torch.manual_seed(0)
        return nn.Sequential(nn.Linear(53, 37), nn.Tanh(), nn.LayerNorm(37), nn.Linear(37, 70)).to(DEVICE, dtype)

    nets, optimizers = train_both(make, lambda gen: (torch.randn(8, 53, generator=gen), torch.randn(8, 70,
                                                                                                  generator=gen)))
    assert kernel_calls == [(1, (37, 53)), (1, (70, 37))] * 3
    assert_optimizers_agree(nets, make(), optimizers, dtype)


def test_optimizer_steps_same_shape_matrices_in_one_launch_per_pass(kernel_calls, launches):
    """Four 32 x 32 layers (and one 24 x 32): one batch of four, one of one, so two first-pass and two second-pass
    launches per step; the result is the torch path's, device-side skip included."""

    def make():
        torch.manual_seed(0)
        layers = [m for _ in range(4) for m in (nn.Linear(32, 32), nn.Tanh())]
        return nn.Sequential(*layers, nn.Linear(32, 24)).to(DEVICE)

    verify_kernel()
    for device_side in (False, True):
        kernel_calls.clear()
        launches.clear()
        nets, optimizers = train_both(make, lambda gen: (torch.randn(8, 32, generator=gen),
                                                         torch.randn(8, 24, generator=gen)), 2, device_side)
        assert sorted(kernel_calls) == sorted([(4, (32, 32)), (1, (24, 32))] * 2)
        assert launches == {"first": 4, "second": 4}
        assert_optimizers_agree(nets, make(), optimizers, torch.float32)


# ------------------------------------------------------------------------------------------ device-side skip
@triton.jit
def _scalars_of_steps(step_ptr, out_ptr, log_beta1: tl.float64, log_beta2: tl.float64, one_minus_beta1: tl.float64,
                      root_one_minus_beta2: tl.float64, rho0: tl.float64, lr_scale: tl.float64, eps: tl.float64,
                      log_ratio: tl.float64, one_minus_ratio: tl.float64, worst_case_scale: tl.float64,
                      DEBIAS: tl.constexpr, BOUND: tl.constexpr):
    """The first pass's in-kernel scalars of the step count ``step_ptr[i]``, stored in ``out_ptr[4 i: 4 i + 4]``."""
    i = tl.program_id(0)
    t = tl.maximum(tl.load(step_ptr + i).to(tl.float64), 1.0)
    rho, step_size, eps_hat, floor = lora_pre_adam._step_scalars(
        t, log_beta1, log_beta2, one_minus_beta1, root_one_minus_beta2, rho0, lr_scale, eps, log_ratio,
        one_minus_ratio, worst_case_scale, DEBIAS, BOUND)
    tl.store(out_ptr + 4 * i, rho)
    tl.store(out_ptr + 4 * i + 1, step_size)
    tl.store(out_ptr + 4 * i + 2, eps_hat)
    tl.store(out_ptr + 4 * i + 3, floor)


@pytest.mark.filterwarnings("ignore:overflow encountered in exp:RuntimeWarning")  # beta1^2 > beta2: C_t -> inf
@pytest.mark.parametrize("beta1, beta2, debias, bound", [
    (0.9, 0.999, True, "v_floor"), (0.9, 0.999, False, "none"), (0.8, 0.99, True, "adam_floor"),
    (0.9, 0.81, False, "adam_floor"), (0.95, 0.9, True, "adam_floor"), (0.0, 0.999, True, "v_floor")])
def test_in_kernel_step_scalars_equal_adam_step_tensors(beta1, beta2, debias, bound):
    """The kernel computes the step's scalars from the step count in fp64, as ``adam_step_tensors`` does in torch
    (which tests/optim checks against the host's ``adam_step_constants``); count 0 reads as step 1."""
    inputs = adam_scalars.device_step_inputs(lr=3e-3, beta1=beta1, beta2=beta2, eps=1e-8, scale=0.25,
                                             debias_second_moment=debias, update_bound=bound)
    steps = torch.tensor([0, 1, 2, 3, 10, 100, 1000, 12345, 10**6], dtype=torch.float32, device=DEVICE)
    out = torch.zeros(len(steps), 4, dtype=torch.float64, device=DEVICE)
    _scalars_of_steps[(len(steps),)](steps, out, *inputs[:-2], DEBIAS=inputs.debias, BOUND=inputs.bound)
    expected = torch.stack(adam_scalars.adam_step_tensors(steps, inputs), dim=1)
    torch.testing.assert_close(out, expected, rtol=1e-12, atol=0.0)


DEVICE_SIDE_CASES = [CASES[1], CASES[2], CASES[3], CASES[4]]


@pytest.mark.parametrize("p,q,r,dtype,factor_update,weight_decay,debias,scale,bound", DEVICE_SIDE_CASES,
                         ids=[f"{c[0]}x{c[1]}r{c[2]}-{str(c[3])[6:]}-{c[4]}-{c[8]}" for c in DEVICE_SIDE_CASES])
def test_device_side_kernel_step_equals_the_host_side_one(p, q, r, dtype, factor_update, weight_decay, debias,
                                                          scale, bound, kernel_calls):
    """Scalars from the step-count tensor in-kernel (fp64, rounded to fp32) against scalars from the host: the same
    fp32 scalars up to a rare tie, so the same steps; and the device-side torch path agrees as the torch path does."""
    gen = torch.Generator().manual_seed(p * q + r + 1)
    W0 = torch.randn(p, q, generator=gen).to(dtype)
    grads = [(torch.randn(p, q, generator=gen) * 1e-2).to(dtype) for _ in range(3)]
    options = dict(factor_update=factor_update, weight_decay=weight_decay, debias_second_moment=debias, scale=scale,
                   update_bound=bound)
    host, device_side, torch_path = Matrix(W0, r), Matrix(W0, r), Matrix(W0, r)
    for step, grad in enumerate(grads, start=1):
        host.step(grad, step, True, **options)
        device_side.step(grad, step, True, device_side=True, **options)
        torch_path.step(grad, step, False, device_side=True, **options)
    assert len(kernel_calls) == 6
    assert_paths_agree(device_side, host, W0, factor_rtol=1e-6)
    assert_paths_agree(device_side, torch_path, W0)


@pytest.mark.filterwarnings("ignore::RuntimeWarning")  # the interpreter's numpy, on the inf gradient
@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_device_side_kernel_skip_leaves_the_matrix_bitwise(dtype, bad, kernel_calls):
    """A non-finite gradient with ``ok`` False: no store of W in the first pass, every factor kept by its where."""
    gen = torch.Generator().manual_seed(11)
    W0 = torch.randn(45, 70, generator=gen).to(dtype)
    matrix = Matrix(W0, 4)
    matrix.step(torch.randn(45, 70, generator=gen).to(dtype), 1, True, device_side=True, weight_decay=0.1)
    before = [tensor.clone() for tensor in (matrix.W, *matrix.factors())]
    grad = torch.randn(45, 70, generator=gen).to(dtype)
    grad[7, 9] = bad
    matrix.step(grad, 1, True, device_side=True, ok=False, weight_decay=0.1)  # the count stays at 1
    assert len(kernel_calls) == 2
    for got, want in zip((matrix.W, *matrix.factors()), before):
        assert torch.equal(got, want)
    matrix.step(torch.randn(45, 70, generator=gen).to(dtype), 2, True, device_side=True, weight_decay=0.1)
    assert not torch.equal(matrix.W, before[0]) and torch.isfinite(matrix.W).all()


@interpreted
def test_device_side_optimizer_step_with_the_kernel_reads_nothing_on_the_host(monkeypatch, kernel_calls):
    """LoRAPreAdamW on the kernel path with the device-side skip forced on CPU: no host read in ``step()`` besides
    the interpreter's own (it stands for the device, so its launches are exempt), a NaN gradient included."""
    from host_reads import AllowedLaunch, no_host_reads

    monkeypatch.setattr(lora_pre_adam, "_first_pass", AllowedLaunch(lora_pre_adam._first_pass))
    monkeypatch.setattr(lora_pre_adam, "_second_pass", AllowedLaunch(lora_pre_adam._second_pass))

    def train(device_side):
        torch.manual_seed(0)
        model = nn.Sequential(nn.Linear(53, 37), nn.Tanh(), nn.Linear(37, 20))
        optimizer = LoRAPreAdamW(model.parameters(), lr=1e-2, rank=3, weight_decay=0.1, use_triton=True,
                                 residual_step=False)
        optimizer._device_side_skip = device_side
        gen = torch.Generator().manual_seed(3)
        for step in range(3):
            optimizer.zero_grad()
            model(torch.randn(8, 53, generator=gen)).square().mean().backward()
            if step == 1:
                model[2].weight.grad[0, 0] = float("nan")
            with no_host_reads() if device_side else contextlib.nullcontext():
                optimizer.step()
        return model, optimizer

    model, optimizer = train(device_side=True)
    assert kernel_calls == [(1, (37, 53)), (1, (20, 37))] * 3
    assert optimizer.skipped_steps() == 1
    assert float(optimizer.state[model[2].weight]["step"]) == 2 and float(optimizer.state[model[0].weight]["step"]) == 3
    host_model, host = train(device_side=False)  # the same steps with the scalars from the host
    for param, host_param in zip(model.parameters(), host_model.parameters()):
        close(param, host_param, rtol=1e-6)
        for key in ("B", "A", "V_B", "V_A", "exp_avg", "exp_avg_sq"):
            if key in host.state[host_param]:
                close(optimizer.state[param][key], host.state[host_param][key], rtol=1e-5)


@pytest.mark.skipif(DEVICE.type != "cuda", reason="needs CUDA: run natively by benchmarks/gpu_acceptance.sh")
@pytest.mark.parametrize("make", [
    lambda params: LoRAPreAdamW(params, lr=1e-2, rank=4, weight_decay=0.1, use_triton=True, residual_step=False),
    lambda params: LoRAPreAdamW(params, lr=1e-2, rank=4, update_bound="rms_clip"),  # the torch path
    lambda params: LoRAPreMuon(params, lr=1e-2, rank=4, weight_decay=0.1),
], ids=["adam_kernel", "adam_torch_rms_clip", "muon"])
def test_device_side_steps_never_sync_on_cuda(make):
    """What the CPU tests cannot see: no synchronisation inside C++ either. After two warm-up steps (state creation
    copies the initial factors to the GPU; the kernels compile, autotune and self-check; the pointer tables are
    built), torch's sync debug mode turns any synchronising call into an error, for finite and non-finite
    gradients."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(96, 80), nn.Tanh(), nn.Linear(80, 80), nn.Tanh(), nn.LayerNorm(80),
                          nn.Linear(80, 40)).to(DEVICE)
    optimizer = make(model.parameters())
    gen = torch.Generator(device=DEVICE).manual_seed(1)

    def step(poison=False):
        optimizer.zero_grad()
        model(torch.randn(16, 96, device=DEVICE, generator=gen)).square().mean().backward()
        if poison:
            model[0].weight.grad[0, 0] = float("inf")
            model[4].bias.grad[0] = float("nan")
        optimizer.step()

    for _ in range(2):  # warm-up: state creation, compilation, autotuning, self-check
        step()
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        for poison in (False, True, False):
            step(poison)
    finally:
        torch.cuda.set_sync_debug_mode("default")
    assert optimizer.skipped_steps() == 2
    assert all(torch.isfinite(param).all() for param in model.parameters())


def test_use_triton_survives_pickling():
    optimizer = LoRAPreAdamW(nn.Linear(6, 5).parameters(), rank=2, use_triton=True)
    assert copy.deepcopy(optimizer).use_triton is True


# ------------------------------------------------------------------------------------------------- dispatch
def test_auto_on_cpu_runs_torch_without_importing_the_kernel(monkeypatch):
    imported = []
    monkeypatch.setattr(dispatch, "load_kernel_module", lambda kernel: imported.append(kernel))
    gen = torch.Generator().manual_seed(1)
    W0, grad = torch.randn(20, 30, generator=gen), torch.randn(20, 30, generator=gen)
    auto, off = Matrix(W0, 3, device="cpu"), Matrix(W0, 3, device="cpu")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        auto.step(grad, 1, "auto")
    off.step(grad, 1, False)
    assert imported == []
    for a, b in zip([auto.W, *auto.factors()], [off.W, *off.factors()]):
        assert torch.equal(a, b)


def fallback_warnings(record):
    return [w for w in record if issubclass(w.category, KernelFallbackWarning)]


def assert_same_as_torch(matrix_pairs):
    for got, want in matrix_pairs:
        for a, b in zip([got.W, *got.factors()], [want.W, *want.factors()], strict=True):
            assert torch.equal(a, b)


def two_steps(use_triton, W0, grads):
    matrix = Matrix(W0, 3)
    for step, grad in enumerate(grads, start=1):
        matrix.step(grad, step, use_triton, weight_decay=0.1)
    return matrix


def test_missing_triton_warns_once_and_runs_torch(monkeypatch):
    monkeypatch.setitem(sys.modules, "triton", None)  # `import triton` now raises ImportError
    monkeypatch.delitem(sys.modules, KERNEL_MODULE, raising=False)
    dispatch.reset()
    gen = torch.Generator().manual_seed(2)
    W0, grads = torch.randn(20, 30, generator=gen), [torch.randn(20, 30, generator=gen) for _ in range(2)]
    with pytest.warns(KernelFallbackWarning, match="triton cannot be imported") as record:
        got = two_steps(True, W0, grads)
    assert len(fallback_warnings(record)) == 1
    assert_same_as_torch([(got, two_steps(False, W0, grads))])


def test_failure_in_the_second_pass_of_the_first_launch_falls_back_to_torch(monkeypatch, kernel_calls):
    """A toolchain failing when the second pass compiles, after the first pass has run: one warning, torch from
    then on (not retried every step), and the steps agree with the torch path's (the first pass of step 1 was the
    kernel's, hence rounding, not bits)."""
    attempts = []

    def broken_second_pass(*args, **kwargs):
        attempts.append(1)
        raise RuntimeError("simulated ptxas failure")

    monkeypatch.setattr(lora_pre_adam, "second_pass", broken_second_pass)
    gen = torch.Generator().manual_seed(4)
    W0, grads = torch.randn(20, 30, generator=gen), [torch.randn(20, 30, generator=gen) for _ in range(3)]
    with pytest.warns(KernelFallbackWarning, match="simulated ptxas failure") as record:
        got = two_steps(True, W0, grads)
    assert len(fallback_warnings(record)) == 1 and attempts == [1] and len(kernel_calls) <= 1
    assert_paths_agree(got, two_steps(False, W0, grads), W0)


def test_unsupported_dtype_and_rank_fall_back_with_one_warning_each(monkeypatch, kernel_calls):
    gen = torch.Generator().manual_seed(6)
    W0, grads = torch.randn(20, 30, generator=gen).double(), [torch.randn(20, 30, generator=gen).double()]
    matrix = Matrix(W0, 3)
    for factor in matrix.factors():
        factor.data = factor.double()
    with pytest.warns(KernelFallbackWarning, match="float64"):
        matrix.step(grads[0], 1, True)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert not should_use_kernel("auto", W0, kernel="lora_pre_adam", dtypes=adam_kernel.KERNEL_PARAM_DTYPES)
    monkeypatch.setattr(adam_kernel, "KERNEL_MAX_RANK", 2)  # (128 in fact)
    W0 = W0.float()
    with pytest.warns(KernelFallbackWarning, match="ranks up to 2, got 3") as record:
        got = two_steps(True, W0, [g.float() for g in grads] * 2)
    assert len(fallback_warnings(record)) == 1 and kernel_calls == []
    assert_same_as_torch([(got, two_steps(False, W0, [g.float() for g in grads] * 2))])


# ---------------------------------------------------------------------------------------------------- FSDP2
class ThreadShards:
    """Stands for RowShards of a 2-rank FSDP2 mesh whose ranks are threads: ``sum_`` adds both ranks' values
    (in rank order, so every rank gets the same bits). The kernel sees only plain local tensors."""

    def __init__(self, rank, exchange, shape):
        self.rank, self.exchange = rank, exchange
        self.param = torch.empty(shape, device="meta")  # the whole parameter, as a DTensor would describe it

    def sum_(self, value):
        slots, barrier = self.exchange
        slots[self.rank] = value.clone()
        barrier.wait()
        total = slots[0] + slots[1]
        barrier.wait()  # nobody overwrites a slot before both ranks have read it
        return value.copy_(total)


@interpreted
def test_sharded_rows_with_kernel_equal_the_sharded_torch_path(monkeypatch):
    """FSDP2: each rank runs the kernel on its row block; only r x r Grams and r x q sums cross ranks."""
    verify_kernel()
    lock = threading.Lock()  # the interpreter patches triton.language while a kernel runs: one launch at a time
    launched = []
    for name in ("first_pass", "second_pass"):
        original = getattr(lora_pre_adam, name)

        def serialised(*args, _original=original, **kwargs):
            with lock:
                launched.append(_original.__name__)
                return _original(*args, **kwargs)

        monkeypatch.setattr(lora_pre_adam, name, serialised)
    gen = torch.Generator().manual_seed(8)
    p, q, r = 45, 38, 4
    W0 = torch.randn(p, q, generator=gen)
    grads = [torch.randn(p, q, generator=gen) * 1e-2 for _ in range(3)]
    blocks = [slice(0, 23), slice(23, p)]

    def run_sharded(use_triton):
        exchange = ([None, None], threading.Barrier(2))
        ranks = [Matrix(W0, r) for _ in blocks]  # same seed: replicated A and V_A; B, V_B are zero anyway
        for matrix, rows in zip(ranks, blocks):
            matrix.W, matrix.B, matrix.V_B = matrix.W[rows].clone(), matrix.B[rows].clone(), matrix.V_B[rows].clone()
        errors = []

        def work(rank):
            try:
                for step, grad in enumerate(grads, start=1):
                    ranks[rank].step(grad[blocks[rank]], step, use_triton, weight_decay=0.1,
                                     shards=ThreadShards(rank, exchange, (p, q)))
            except BaseException as error:  # pragma: no cover - surfaced below
                errors.append(error)
                exchange[1].abort()

        threads = [threading.Thread(target=work, args=(rank,)) for rank in range(2)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(timeout=120)
        assert not errors, errors
        assert torch.equal(ranks[0].A, ranks[1].A) and torch.equal(ranks[0].V_A, ranks[1].V_A)
        return ranks

    with warnings.catch_warnings():
        warnings.simplefilter("error", KernelFallbackWarning)
        kernel = run_sharded(True)
    assert sorted(launched) == ["first_pass"] * 6 + ["second_pass"] * 6  # 2 ranks x 3 steps
    torch_path = run_sharded(False)
    whole = Matrix(W0, r)
    for step, grad in enumerate(grads, start=1):
        whole.step(grad, step, False, weight_decay=0.1)
    for rank, rows in enumerate(blocks):
        W0_rows = W0[rows]
        assert_paths_agree(kernel[rank], torch_path[rank], W0_rows)
        close(kernel[rank].W - W0_rows, whole.W[rows] - W0_rows)
        close(kernel[rank].B, whole.B[rows])
        close(kernel[rank].A, whole.A)


# ---------------------------------------------------------------------------------------------- GPU build
class AutotuneEmulator:
    """Stands for ``triton.autotune`` in the interpreter, doing what Triton's ``Autotuner.run`` does on a first
    call per key: prune (``early_config_prune(configs, positional args, **keyword args)``), time every remaining
    config (here: run it once) between the autotuner's ``pre_hook`` and ``post_hook``, call
    ``pre_hook(reset_only=True)``, then launch the chosen config for real. ``observe(args)`` records each timing
    run's outputs, so the GPU configs' tilings get checked on CPU."""

    def __init__(self, autotuned_like, configs, prune, observe, hooks=(None, None)):
        self.fn, self.configs, self.prune, self.observe = autotuned_like, configs, prune, observe
        self.pre_hook = hooks[0] or (lambda kwargs, reset_only=False: None)
        self.post_hook = hooks[1] or (lambda kwargs, exception: None)
        self.outputs, self.best_config = [], None

    def __getitem__(self, grid):
        def run(*args, **kwargs):
            named = dict(zip(self.fn.arg_names, args))
            configs = self.prune(self.configs, named, **kwargs)
            every = {**named, **kwargs}
            for config in configs:
                self.pre_hook(every)
                self.fn[grid({**every, **config.kwargs})](*args, **kwargs, **config.kwargs)
                self.outputs.append((config, self.observe(named)))
                self.post_hook(every, exception=None)
            self.pre_hook(every, reset_only=True)
            self.best_config = configs[-1]  # any: they agree
            self.fn[grid({**every, **self.best_config.kwargs})](*args, **kwargs, **self.best_config.kwargs)
        return run


@interpreted
def test_gpu_configs_autotune_hooks_and_launch_glue_in_the_interpreter(monkeypatch):
    """The GPU launch path (autotuned kernels, fixed 512-wide reduction slots, rank chunks of 32) with every GPU
    config that the pruning keeps for r = 40 (R_PAD = 64), run by the interpreter on a batch of two: each config
    gives the same partial sums and parameters, the hooks put the parameters back after each timing run (the real
    launch then updates them once), and the results equal the float64 formulas."""
    K = lora_pre_adam
    first = AutotuneEmulator(K._first_pass, K.FIRST_PASS_CONFIGS, K._prune_first,
                             lambda named: [W.clone() for W in K._launching.params] + [named["part_ptr"].clone()],
                             hooks=(K._autotune_pre_hook, K._autotune_post_hook))
    second = AutotuneEmulator(K._second_pass, K.SECOND_PASS_CONFIGS, K._prune_second,
                              lambda named: [named["part_ptr"].clone()])
    monkeypatch.setattr(K, "_first_autotuned", first)
    monkeypatch.setattr(K, "_second_autotuned", second)
    L, p, q, r = 2, 70, 75, 40
    gen = torch.Generator().manual_seed(9)
    params, grads = matrices(L, p, q, torch.float32, False, gen), matrices(L, p, q, torch.float32, False, gen, 1e-2)
    left, right, right_pinvs, left_pinvs = stacks(L, p, q, r, gen)
    initial = [W.clone() for W in params]
    scalars = (31.6, 1e-2, 1e-6, 0.7)
    expected_params, expected_sums = expected_first_pass(params, grads, left, right, right_pinvs, 9.0, 0.99,
                                                         [scalars] * L)
    sums = K.first_pass(params, grads, left, right, right_pinvs, kappa=9.0, decay=0.99, host_scalars=scalars,
                        precision="ieee")
    right_sums = K.second_pass(grads, left_pinvs, precision="ieee")
    assert len(first.outputs) == len(second.outputs) == 4  # all four configs of each pass
    for outputs in (first.outputs, second.outputs):
        for _, tensors in outputs[1:]:
            for got, want in zip(tensors, outputs[0][1], strict=True):
                close(got, want, rtol=1e-6)  # bitwise equal with numpy here; BLAS kernels may differ
    for W, want, W0, timed in zip(params, expected_params, initial, first.outputs[-1][1], strict=False):
        assert torch.equal(W, timed)  # the chosen config, updating once: restored after every timing run
        close_param(W, want, W0)
    close(sums, expected_sums)
    close(right_sums, expected_second_pass(grads, left_pinvs))
    assert K._launching.params is None and K._launching.copies is None  # nothing held after the launch


COMPILE_FOR_HOPPER = r"""
from lit_lowrank.kernels import lora_pre_adam as K
first, second = K._first_pass, K._second_pass
DTYPES = {"fp32": tl.float32, "bf16": tl.bfloat16}
def first_types():
    types = {name: "*fp32" for name in ("left_ptr", "right_ptr", "pinv_ptr", "part_ptr", "step_ptr")}
    types.update(w_tab="*i64", g_tab="*i64", ok_ptr="*u8")
    types.update({name: "i32" for name in ("p", "q", "stride_wp", "stride_wq", "stride_gp", "stride_gq")})
    types.update({name: "fp32" for name in ("kappa", "rho", "neg_step", "eps_hat", "decay", "floor")})
    types.update({name: "fp64" for name in ("log_beta1", "log_beta2", "one_minus_beta1", "root_one_minus_beta2",
                                            "rho0", "lr_scale", "eps", "log_ratio", "one_minus_ratio",
                                            "worst_case_scale")})
    assert set(types) | {"r"} <= set(first.arg_names), set(types) - set(first.arg_names)
    return types
def second_types():
    types = {"g_tab": "*i64", "pinv_ptr": "*fp32", "part_ptr": "*fp32"}
    types.update({name: "i32" for name in ("p", "q", "stride_gp", "stride_gq")})
    return types

cases = 0
# The configs at the largest rank they serve: rank 128 (fp32) for those that prune keeps there, the two largest
# tiles at rank 16 (bf16). Of two configs that differ only in stages or by one tile step, one is compiled.
def first_at(r, dtype, config, on_device=False):
    r_pad = K._r_pad(r)
    constexprs = dict(config.kwargs, r=r, R_PAD=r_pad, DECAY=True, FLOOR=True, BLOCK_R=min(K.MAX_BLOCK_R, r_pad),
                      W_DTYPE=DTYPES[dtype], G_DTYPE=DTYPES[dtype], W_ALIGNED=True, G_ALIGNED=True,
                      DOT_PRECISION="tf32x3", SOFT_BF16=False, STEP_ON_DEVICE=on_device, DEBIAS=on_device,
                      BOUND=2 if on_device else 0)
    compiled = compile_(first, first_types(), constexprs, config.num_warps, config.num_stages)
    assert compiled.metadata.shared <= 227 * 1024, ("first", config, r, compiled.metadata.shared)
def second_at(r, dtype, config):
    constexprs = dict(config.kwargs, r=r, R_PAD=K._r_pad(r), G_DTYPE=DTYPES[dtype], G_ALIGNED=True,
                      DOT_PRECISION="tf32x3")
    compiled = compile_(second, second_types(), constexprs, config.num_warps, config.num_stages)
    assert compiled.metadata.shared <= 227 * 1024, ("second", config, r, compiled.metadata.shared)
by_block = lambda configs, block: {c.kwargs[block]: c for c in configs}
firsts, seconds = by_block(K.FIRST_PASS_CONFIGS, "BLOCK_M"), by_block(K.SECOND_PASS_CONFIGS, "BLOCK_N")
assert [c.kwargs["BLOCK_M"] for c in K._fitting(K.FIRST_PASS_CONFIGS, "BLOCK_M", 128)] == [16, 32, 64]
assert [c.kwargs["BLOCK_N"] for c in K._fitting(K.SECOND_PASS_CONFIGS, "BLOCK_N", 128)] == [32, 64, 64]
for r, dtype, compile_at, config in [(128, "fp32", first_at, firsts[16]), (128, "fp32", first_at, firsts[64]),
                                     (16, "bf16", first_at, firsts[128]), (128, "fp32", second_at, seconds[32]),
                                     (128, "fp32", second_at, seconds[64]), (16, "bf16", second_at, seconds[128])]:
    compile_at(r, dtype, config)
    cases += 1
# The device-side step (fp64 scalars from the step counts in-kernel, W's stores masked), at the largest tile.
first_at(16, "bf16", firsts[128], on_device=True)
cases += 1
print("compiled", cases)
"""


def test_kernels_compile_for_hopper_without_a_gpu(tmp_path):
    """The interpreter never lowers the kernels; this compiles the GPU configs to sm_90 cubins (no GPU needed)."""
    compile_for_hopper(tmp_path, COMPILE_FOR_HOPPER, timeout=600)
