"""The fused LoRA-Pro full-mode kernel against the torch reference, under Triton's interpreter on CPU.

Expected values come from the torch path of the same functions (``use_triton=False``), which
``tests/optim`` checks against dense weight-space Adam. The kernel sums in another order, so values agree
to fp32 rounding (relative to each tensor's magnitude); skipped layers must agree bit for bit.
"""
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from torch import nn

pytest.importorskip("triton", reason="triton cannot be imported")

from hopper_compile import compile_for_hopper  # noqa: E402

from lit_lowrank import LoRAConfig, inject_lora  # noqa: E402
from lit_lowrank.adapters import lora_modules  # noqa: E402
from lit_lowrank.kernels import (
    dispatch,  # noqa: E402
    lora_pro_full,  # noqa: E402
)
from lit_lowrank.optim import LoRAPro  # noqa: E402
from lit_lowrank.optim.adamw import bias_corrections  # noqa: E402
from lit_lowrank.optim.lora_pro.update import full_mode_update, torch_moments_and_projections  # noqa: E402

ROOT = Path(__file__).resolve().parents[2]
HYPER = dict(lr=1e-2, beta1=0.9, beta2=0.999, eps=1e-8, damping=1e-8)
# benchmarks/gpu_acceptance.sh runs these natively (TRITON_INTERPRET=0): the same comparisons on CUDA tensors, with
# the compiled, autotuned kernel; tests of the interpreter's own config skip.
NATIVE = os.environ.get("TRITON_INTERPRET", "1").lower() in ("0", "false", "off")
DEVICE = torch.device("cuda" if NATIVE and torch.cuda.is_available() else "cpu")
on_device = pytest.mark.skipif(NATIVE and DEVICE.type == "cpu", reason="natively the kernel needs a GPU")


@pytest.fixture(autouse=True)
def fresh_dispatch(monkeypatch):
    assert lora_pro_full.INTERPRETED != NATIVE, (
        "lit_lowrank.kernels.lora_pro_full was imported before TRITON_INTERPRET was set")
    monkeypatch.setenv(dispatch.CHECK_ENV, "0")  # these compare the kernel itself: no self-check swapping torch in
    dispatch.reset()
    yield
    dispatch.reset()


@pytest.fixture
def kernel_calls(monkeypatch):
    """Counts launches of the fused path, so a test cannot pass by silently running torch twice."""
    calls = []
    original = lora_pro_full.moments_and_projections

    def counted(*args, **kwargs):
        calls.append(args[0].shape)
        return original(*args, **kwargs)

    monkeypatch.setattr(lora_pro_full, "moments_and_projections", counted)
    return calls


@pytest.fixture(params=[1, 2], ids=["row_tiles1", "row_tiles2"])
def row_tiles(request, monkeypatch):
    """Both ways of summing B^T G: stored per row tile (1), and in registers over a program's row tiles (2)."""
    if NATIVE and request.param > 1:
        pytest.skip("the interpreter's config; on a GPU autotuning picks ROW_TILES")
    monkeypatch.setitem(lora_pro_full.INTERPRETER_CONFIG, "ROW_TILES", request.param)
    return request.param


def close(actual, expected, rtol=2e-5):
    """Equal up to ``rtol`` of the tensor's largest magnitude (entries near 0 carry absolute error)."""
    actual, expected = actual.detach().cpu(), expected.detach().cpu()
    scale = expected.abs().max().clamp_min(1e-30)
    torch.testing.assert_close(actual, expected, rtol=0, atol=float(rtol * scale))


def random_step(gen, L, m, n, r):
    """Factors of g~ for one step: U_t (L, 2r, m), V (L, 2r, n) at a gradient-like scale."""
    return (torch.randn(L, 2 * r, m, generator=gen).to(DEVICE),
            (torch.randn(L, 2 * r, n, generator=gen) * 1e-2).to(DEVICE))


@on_device
@pytest.mark.parametrize("weight_decay", [0.0, 0.1])
@pytest.mark.parametrize("L,m,n,r", [(1, 37, 53, 3), (1, 64, 130, 8), (2, 37, 53, 3), (2, 24, 40, 20)])
def test_update_equals_torch_reference_over_steps(L, m, n, r, weight_decay, kernel_calls, row_tiles):
    # (24, 40, r = 20): K = 40 and r = 20 span several BLOCK_K / BLOCK_R chunks, and with ROW_TILES = 2 a
    # program's second row tile lies wholly outside the layer; the others have ragged tiles.
    gen = torch.Generator().manual_seed(m * n + r)
    A = (torch.randn(L, r, n, generator=gen) / n**0.5).to(DEVICE)
    B_t = (torch.randn(L, r, m, generator=gen) * 0.1).to(DEVICE)
    zeros = [torch.zeros(m, n, device=DEVICE) for _ in range(2 * L)]
    states = {path: (A.clone(), B_t.clone(), [t.clone() for t in zeros[:L]], [t.clone() for t in zeros[L:]],
                     torch.zeros(L, device=DEVICE)) for path in (True, False)}
    ok = torch.ones(L, dtype=torch.bool, device=DEVICE)
    for _ in range(3):
        U_t, V = random_step(gen, L, m, n, r)
        for use_triton, (A_, B_, avg, avg_sq, step) in list(states.items()):
            new = full_mode_update(A_, B_, U_t, V, avg, avg_sq, step, ok, scaling=2.0, weight_decay=weight_decay,
                                   use_triton=use_triton, **HYPER)
            states[use_triton] = (new[0], new[1], avg, avg_sq, new[2])
        (A_k, B_k, avg_k, sq_k, step_k), (A_t, B_tt, avg_t, sq_t, step_t) = states[True], states[False]
        assert torch.equal(step_k, step_t)
        for i in range(L):
            close(avg_k[i], avg_t[i])
            close(sq_k[i], sq_t[i])
        # The displacements, not the parameters (which hardly move); the r x r solves amplify rounding a little.
        close(A_k - A, A_t - A, rtol=5e-5)
        close(B_k - B_t, B_tt - B_t, rtol=5e-5)
    assert len(kernel_calls) == 3


@on_device
@pytest.mark.parametrize("beta1", [0.9, 0.3])  # lerp weight 0.1 and 0.7: both of torch.lerp's formulas
def test_moments_and_projections_equal_reference(beta1, row_tiles):
    gen = torch.Generator().manual_seed(1)
    L, m, n, r = 2, 37, 53, 3
    A, B_t = torch.randn(L, r, n, generator=gen).to(DEVICE), torch.randn(L, r, m, generator=gen).to(DEVICE)
    U_t, V = random_step(gen, L, m, n, r)
    avg = [(torch.randn(m, n, generator=gen) * 1e-2).to(DEVICE) for _ in range(L)]
    avg_sq = [(torch.rand(m, n, generator=gen) * 1e-4).to(DEVICE) for _ in range(L)]
    # Moments with other strides than row-major (a transposed buffer) must work too.
    avg[1] = avg[1].T.contiguous().T
    ok = torch.ones(L, dtype=torch.bool, device=DEVICE)
    bc1, bc2_sqrt = bias_corrections(torch.tensor([4.0, 7.0], device=DEVICE), beta1, 0.99, torch.float32)
    hyper = dict(beta1=beta1, beta2=0.99, eps=1e-8)
    ref_avg, ref_sq = [t.clone() for t in avg], [t.clone() for t in avg_sq]
    got = lora_pro_full.moments_and_projections(A, B_t, U_t, V, avg, avg_sq, ok, bc1, bc2_sqrt, **hyper)
    want = torch_moments_and_projections(A, B_t, U_t, V, ref_avg, ref_sq, ok, bc1, bc2_sqrt, **hyper)
    for got_, want_ in [*zip(got, want), *zip(avg, ref_avg), *zip(avg_sq, ref_sq)]:
        close(got_, want_)
    assert avg[1].stride() == (1, m)


@on_device
@pytest.mark.filterwarnings("ignore:invalid value encountered:RuntimeWarning")  # numpy, on the NaN the test plants
def test_skipped_layer_stays_bit_for_bit(kernel_calls, row_tiles):
    gen = torch.Generator().manual_seed(2)
    L, m, n, r = 2, 37, 53, 3
    A, B_t = torch.randn(L, r, n, generator=gen).to(DEVICE), torch.randn(L, r, m, generator=gen).to(DEVICE)
    U_t, V = random_step(gen, L, m, n, r)
    U_t[1, 0, 5], V[1, 2, 7] = float("nan"), float("inf")  # what a non-finite gradient leaves in g~'s factors
    avg = [(torch.randn(m, n, generator=gen) * 1e-2).to(DEVICE) for _ in range(L)]
    avg_sq = [(torch.rand(m, n, generator=gen) * 1e-4).to(DEVICE) for _ in range(L)]
    before = [t.clone() for t in avg + avg_sq]
    ref_avg, ref_sq = [t.clone() for t in avg], [t.clone() for t in avg_sq]
    ok, step = torch.tensor([True, False], device=DEVICE), torch.tensor([3.0, 3.0], device=DEVICE)
    new_A, new_B_t, new_step = full_mode_update(A, B_t, U_t, V, avg, avg_sq, step, ok, scaling=1.5,
                                                weight_decay=0.1, use_triton=True, **HYPER)
    assert len(kernel_calls) == 1
    assert torch.equal(avg[1], before[1]) and torch.equal(avg_sq[1], before[3])
    assert torch.equal(new_A[1], A[1]) and torch.equal(new_B_t[1], B_t[1])
    assert new_step.tolist() == [4.0, 3.0]
    assert torch.isfinite(new_A).all() and torch.isfinite(new_B_t).all()
    ref_A, ref_B_t, _ = full_mode_update(A, B_t, U_t, V, ref_avg, ref_sq, step, ok, scaling=1.5,
                                         weight_decay=0.1, use_triton=False, **HYPER)
    close(avg[0], ref_avg[0])
    close(avg_sq[0], ref_sq[0])
    close(new_A - A, ref_A - A, rtol=5e-5)
    close(new_B_t - B_t, ref_B_t - B_t, rtol=5e-5)
    # The skipped layer's projections (discarded by the caller) come from its old moments: finite, as in torch.
    bc1, bc2_sqrt = bias_corrections(step, 0.9, 0.999, torch.float32)
    hyper = dict(beta1=0.9, beta2=0.999, eps=1e-8)
    got = lora_pro_full.moments_and_projections(A, B_t, U_t, V, avg, avg_sq, ok, bc1, bc2_sqrt, **hyper)
    want = torch_moments_and_projections(A, B_t, U_t, V, ref_avg, ref_sq, ok, bc1, bc2_sqrt, **hyper)
    for got_, want_ in zip(got, want):
        close(got_[1], want_[1])


def ragged_net(dtype: torch.dtype, r: int) -> nn.Module:
    """Adapted weights 64 x 53, 130 x 64 (twice: a stack of L = 2) and 64 x 130: every tile grid is ragged."""
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(53, 64), nn.Tanh(), nn.Linear(64, 130), nn.Tanh(), nn.Linear(130, 64), nn.Tanh(),
                        nn.Linear(64, 130))
    net = inject_lora(net, LoRAConfig(r=r, alpha=2.0 * r)).to(DEVICE, dtype)
    with torch.no_grad():
        for _, module in lora_modules(net):
            module.lora_B.normal_(std=0.05)
    return net


@on_device
@pytest.mark.parametrize("weight_decay", [0.0, 0.1])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_optimizer_with_kernel_equals_torch_path(dtype, weight_decay, kernel_calls):
    nets = {use_triton: ragged_net(dtype, r=3) for use_triton in (True, False)}
    opts = {use_triton: LoRAPro(net, lr=1e-2, mode="full", weight_decay=weight_decay, use_triton=use_triton)
            for use_triton, net in nets.items()}
    gen = torch.Generator().manual_seed(3)
    for _ in range(3):
        x, y = torch.randn(8, 53, generator=gen).to(DEVICE, dtype), torch.randn(8, 130, generator=gen).to(DEVICE, dtype)
        for use_triton, net in nets.items():
            (net(x) - y).float().square().mean().backward()
            opts[use_triton].step()
            opts[use_triton].zero_grad()
    assert len(kernel_calls) == 3 * 3  # three shape groups per step
    # bf16 parameters are rounded after every step: an fp32 rounding difference may flip one bf16 ulp (2^-8).
    param_rtol, state_rtol = (1e-5, 2e-5) if dtype == torch.float32 else (8e-3, 1e-3)
    initial = ragged_net(dtype, r=3)
    for p_k, p_t, p_0 in zip(nets[True].parameters(), nets[False].parameters(), initial.parameters()):
        assert p_k.dtype == dtype
        close(p_k.detach().float(), p_t.detach().float(), rtol=param_rtol)
        if dtype == torch.float32:
            close((p_k - p_0).detach(), (p_t - p_0).detach(), rtol=5e-5)
    for p_k, p_t in zip(nets[True].parameters(), nets[False].parameters()):
        s_k, s_t = opts[True].state.get(p_k, {}), opts[False].state.get(p_t, {})
        assert s_k.keys() == s_t.keys()
        for key in s_k:
            assert s_k[key].dtype == s_t[key].dtype == torch.float32  # fp32 state for bf16 adapters too
            close(s_k[key], s_t[key], rtol=state_rtol)


COMPILE_FOR_HOPPER = r"""
from lit_lowrank.kernels import lora_pro_full as K
fn = K._full_step_tile
types = {name: "*fp32" for name in fn.arg_names[:9]}
types.update({name: "i32" for name in ("m", "n", "stride_avg_m", "stride_avg_n", "stride_sq_m", "stride_sq_n")})
def largest(configs):
    return max(configs, key=lambda c: (c.kwargs["BLOCK_M"] * c.kwargs["BLOCK_N"] * c.kwargs["ROW_TILES"], c.num_stages))

summing = [c for c in K.GPU_CONFIGS if c.kwargs["ROW_TILES"] > 1]
storing = [c for c in K.GPU_CONFIGS if c.kwargs["ROW_TILES"] == 1]
cases = [(K.GPU_CONFIGS[0], 16, "tf32x3"), (largest(storing), 128, "tf32x3"),
         (largest(summing), K.MAX_R_ROW_SUM, "tf32x3"), (K.GPU_CONFIGS[0], 3, "ieee")]
for config, r, precision in cases:
    constexprs = dict(config.kwargs, r=r, BLOCK_K=K._pow2_between(2 * r, 16, 64), BLOCK_R=K._pow2_between(r, 16, 64),
                      R_PAD=max(16, triton.next_power_of_2(r)), DOT_PRECISION=precision)
    compiled = compile_(fn, types, constexprs, config.num_warps, config.num_stages)
    assert compiled.metadata.shared <= 227 * 1024, (config, r, compiled.metadata.shared)
print("compiled", len(cases))
"""


def test_kernel_compiles_for_hopper_without_a_gpu(tmp_path):
    """The interpreter never lowers the kernel; this compiles every GPU config to an sm_90 cubin (no GPU needed)."""
    compile_for_hopper(tmp_path, COMPILE_FOR_HOPPER, timeout=300)


def test_gpu_benchmark_exits_cleanly_without_gpu(tmp_path):
    env = dict(os.environ, CUDA_VISIBLE_DEVICES="")
    env.pop("TRITON_INTERPRET", None)
    done = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "kernels_gpu.py"), "--out", str(tmp_path)],
                          env=env, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert "no GPU present" in done.stdout
    assert not list(tmp_path.iterdir())  # nothing measured, nothing written
