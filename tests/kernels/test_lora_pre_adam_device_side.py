"""The LoRA-Pre Adam kernel step where the optimizer runs it without host reads or on row shards, under Triton's
interpreter on CPU: the device-side skip (the step's scalars computed in-kernel from the step counts, a skipped
layer's W not stored, no host read in ``step()``; natively, no synchronisation on CUDA) and FSDP2's sharded rows,
each against the host-side or unsharded torch path. Steps through the adapter: ``test_lora_pre_adam_kernel.py``;
shared helpers: ``tests/lora_pre_kernel_cases.py``.
"""
import contextlib
import threading
import warnings

import pytest
import torch
from torch import nn

pytest.importorskip("triton", reason="triton cannot be imported")

import lora_pre_kernel_cases as cases  # noqa: E402
import triton  # noqa: E402
import triton.language as tl  # noqa: E402
from lora_pre_kernel_cases import (  # noqa: E402
    CASES,
    DEVICE,
    Matrix,
    assert_paths_agree,
    close,
    interpreted,
    verify_kernel,
)

from lit_lowrank.kernels import (
    lora_pre_adam,  # noqa: E402
    lora_pre_adam_jit,  # noqa: E402
)
from lit_lowrank.kernels.dispatch import KernelFallbackWarning  # noqa: E402
from lit_lowrank.optim import LoRAPreAdamW, LoRAPreMuon  # noqa: E402
from lit_lowrank.optim.lora_pre import adam_scalars  # noqa: E402

# The shared fixtures, bound here so that pytest uses them for this module's tests.
fresh_dispatch, kernel_calls = cases.fresh_dispatch, cases.kernel_calls


# ------------------------------------------------------------------------------------------ device-side skip
@triton.jit
def _scalars_of_steps(step_ptr, out_ptr, log_beta1: tl.float64, log_beta2: tl.float64, one_minus_beta1: tl.float64,
                      root_one_minus_beta2: tl.float64, rho0: tl.float64, lr_scale: tl.float64, eps: tl.float64,
                      log_ratio: tl.float64, one_minus_ratio: tl.float64, worst_case_scale: tl.float64,
                      DEBIAS: tl.constexpr, BOUND: tl.constexpr):
    """The first pass's in-kernel scalars of the step count ``step_ptr[i]``, stored in ``out_ptr[4 i: 4 i + 4]``."""
    i = tl.program_id(0)
    t = tl.maximum(tl.load(step_ptr + i).to(tl.float64), 1.0)
    rho, step_size, eps_hat, floor = lora_pre_adam_jit._step_scalars(
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

