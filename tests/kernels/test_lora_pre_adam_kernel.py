"""Whole LoRA-Pre Adam steps through the Triton backend, under Triton's interpreter on CPU:
``lora_pre_adam_update_(..., use_triton=True)`` and ``LoRAPreAdamW(use_triton=True)`` against the torch path of the
same function (``use_triton=False``), which ``tests/optim`` checks against the spec's invariants and dense Adam, and
the fallbacks to torch. The interpreter runs small tiles (32 x 32, two tiles per slot, rank chunks of 16), so the
shapes below span several tiles, slots and rank chunks, with ragged edges in every dimension.
The device-side skip and FSDP2's sharded rows: ``test_lora_pre_adam_device_side.py``; the GPU configs, autotune
hooks and the sm_90 compile: ``test_lora_pre_adam_gpu_build.py``; the launchers alone, against float64 formulas:
``test_lora_pre_adam_launchers.py``; shared helpers: ``tests/lora_pre_kernel_cases.py``.
"""
import copy
import sys
import warnings

import pytest
import torch
from torch import nn

pytest.importorskip("triton", reason="triton cannot be imported")

import lora_pre_kernel_cases as cases  # noqa: E402
from lora_pre_kernel_cases import (  # noqa: E402
    CASES,
    DEVICE,
    HYPER,
    KERNEL_MODULE,
    Matrix,
    assert_paths_agree,
    close,
    close_param,
    run_both,
    verify_kernel,
)

from lit_lowrank.kernels import (
    dispatch,  # noqa: E402
    lora_pre_adam,  # noqa: E402
)
from lit_lowrank.kernels.dispatch import KernelFallbackWarning, should_use_kernel  # noqa: E402
from lit_lowrank.optim import LoRAPreAdamW  # noqa: E402
from lit_lowrank.optim.lora_pre import (
    adam_kernel,  # noqa: E402
    adam_scalars,  # noqa: E402
)

# The shared fixtures, bound here so that pytest uses them for this module's tests.
fresh_dispatch, launches, kernel_calls = cases.fresh_dispatch, cases.launches, cases.kernel_calls


# ------------------------------------------------------------------------------------ steps through the adapter
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

