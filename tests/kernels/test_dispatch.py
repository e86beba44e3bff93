"""``use_triton`` semantics and the torch fallback of :mod:`lit_lowrank.kernels.dispatch`.

auto on CPU -> torch; True -> the kernel (CPU through the interpreter); False -> torch; a missing or broken
Triton -> torch with exactly one warning, the same results as ``use_triton=False`` and no exception.
"""
import os
import sys
import warnings

import pytest
import torch
from torch import nn

from lit_lowrank import LoRAConfig, inject_lora
from lit_lowrank.kernels import dispatch
from lit_lowrank.kernels.dispatch import KernelFallbackWarning, should_use_kernel, validate_use_triton
from lit_lowrank.optim import LoRAPro
from lit_lowrank.optim.lora_pro.update import full_mode_update

HAS_TRITON = dispatch.triton_available()
needs_triton = pytest.mark.skipif(not HAS_TRITON, reason="triton cannot be imported")
# benchmarks/gpu_acceptance.sh runs these natively (TRITON_INTERPRET=0): tests that run a kernel on CPU tensors skip.
NATIVE = os.environ.get("TRITON_INTERPRET", "1").lower() in ("0", "false", "off")
interpreted = pytest.mark.skipif(NATIVE, reason="runs the kernel on CPU tensors, i.e. in Triton's interpreter")
KERNEL = "lit_lowrank.kernels.lora_pro_full"


@pytest.fixture(autouse=True)
def fresh_dispatch():
    dispatch.reset()
    yield
    dispatch.reset()


@pytest.fixture
def kernel_module():
    pytest.importorskip("triton", reason="triton cannot be imported")
    from lit_lowrank.kernels import lora_pro_full

    assert lora_pro_full.INTERPRETED != NATIVE, f"{KERNEL} was imported before TRITON_INTERPRET was set"
    return lora_pro_full


@pytest.fixture
def kernel_calls(kernel_module, monkeypatch):
    calls = []
    original = kernel_module.moments_and_projections
    monkeypatch.setattr(kernel_module, "moments_and_projections", lambda *a, **k: calls.append(1) or original(*a, **k))
    return calls


def stack(L=2, m=37, n=53, r=3, seed=0):
    gen = torch.Generator().manual_seed(seed)
    A, B_t = torch.randn(L, r, n, generator=gen), torch.randn(L, r, m, generator=gen) * 0.1
    U_t, V = torch.randn(L, 2 * r, m, generator=gen), torch.randn(L, 2 * r, n, generator=gen) * 1e-2
    return A, B_t, U_t, V


def update(use_triton, A, B_t, U_t, V):
    """One full-mode step from zero moments; returns everything it produced or changed."""
    L, m, n = A.shape[0], B_t.shape[-1], A.shape[-1]
    avg, avg_sq = ([torch.zeros(m, n, dtype=A.dtype) for _ in range(L)] for _ in range(2))
    new_A, new_B_t, step = full_mode_update(A, B_t, U_t, V, avg, avg_sq, torch.zeros(L),
                                             torch.ones(L, dtype=torch.bool),
                                            scaling=2.0, lr=1e-2, beta1=0.9, beta2=0.999, eps=1e-8, weight_decay=0.0,
                                            damping=1e-8, use_triton=use_triton)
    return [new_A, new_B_t, step, *avg, *avg_sq]


def assert_identical(got, want):
    for a, b in zip(got, want, strict=True):
        assert torch.equal(a, b)


def fallback_warnings(record):
    return [w for w in record if issubclass(w.category, KernelFallbackWarning)]


def test_use_triton_values_are_validated():
    for value in ("auto", True, False):
        assert validate_use_triton(value) == value
    for value in ("yes", "true", 1, None):
        with pytest.raises(ValueError, match="'auto', True or False"):
            validate_use_triton(value)
    net = inject_lora(nn.Sequential(nn.Linear(4, 4)), LoRAConfig(r=2))
    with pytest.raises(ValueError, match="use_triton"):
        LoRAPro(net, use_triton="yes")


def test_false_and_auto_on_cpu_run_torch_without_warning(monkeypatch):
    imported = []
    monkeypatch.setattr(dispatch, "load_kernel_module", lambda kernel: imported.append(kernel))
    x = torch.zeros(3)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert should_use_kernel(False, x, kernel="lora_pro_full") is False
        assert should_use_kernel("auto", x, kernel="lora_pro_full") is False
    assert imported == []  # the kernel module (and triton) is not even imported for CPU tensors under "auto"


@needs_triton
@interpreted
def test_true_on_cpu_runs_the_kernel_under_the_interpreter(kernel_calls):
    inputs = stack()
    with warnings.catch_warnings():
        warnings.simplefilter("error", KernelFallbackWarning)
        got = update(True, *inputs)
    assert kernel_calls == [1]
    want = update(False, *inputs)
    assert len(kernel_calls) == 1
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6)


@needs_triton
def test_true_on_cpu_without_interpreter_warns_once_and_runs_torch(kernel_module, monkeypatch, kernel_calls):
    monkeypatch.setattr(kernel_module, "INTERPRETED", False)  # as if imported without TRITON_INTERPRET=1
    inputs = stack()
    with pytest.warns(KernelFallbackWarning, match="TRITON_INTERPRET=1") as record:
        got = update(True, *inputs)
        update(True, *inputs)
    assert len(fallback_warnings(record)) == 1 and kernel_calls == []
    assert_identical(got, update(False, *inputs))


@needs_triton
def test_unsupported_dtype_falls_back(kernel_calls):
    inputs = [t.double() for t in stack()]
    with pytest.warns(KernelFallbackWarning, match="float64"):
        got = update(True, *inputs)
    assert kernel_calls == []
    assert_identical(got, update(False, *inputs))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert should_use_kernel("auto", inputs[0], kernel="lora_pro_full") is False


def test_tensor_subclasses_take_the_torch_path():
    class Wrapped(torch.Tensor):  # stands for DTensor and other wrappers a kernel cannot take
        pass

    x = torch.Tensor._make_subclass(Wrapped, torch.zeros(3))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert should_use_kernel("auto", x, kernel="lora_pro_full") is False
    with pytest.warns(KernelFallbackWarning, match="plain tensors"):
        assert should_use_kernel(True, x, kernel="lora_pro_full") is False
    assert should_use_kernel(True, torch.nn.Parameter(torch.zeros(3)),
                             kernel="lora_pro_full") is (HAS_TRITON and not NATIVE)


def test_missing_triton_warns_once_and_runs_torch(monkeypatch):
    monkeypatch.setitem(sys.modules, "triton", None)  # `import triton` now raises ImportError
    monkeypatch.delitem(sys.modules, KERNEL, raising=False)
    dispatch.reset()
    inputs = stack()
    with pytest.warns(KernelFallbackWarning, match="triton cannot be imported") as record:
        got = [update(True, *inputs) for _ in range(3)]
    assert len(fallback_warnings(record)) == 1
    assert not dispatch.triton_available()
    want = update(False, *inputs)
    for result in got:
        assert_identical(result, want)


def test_kernel_module_that_fails_to_import_warns_and_runs_torch(monkeypatch):
    class Broken:
        def find_spec(self, name, path=None, target=None):
            if name == KERNEL:
                raise RuntimeError("simulated broken triton install")

    monkeypatch.delitem(sys.modules, KERNEL, raising=False)
    monkeypatch.setattr(sys, "meta_path", [Broken(), *sys.meta_path])
    monkeypatch.setattr(dispatch, "triton_available", lambda: True)
    inputs = stack()
    with pytest.warns(KernelFallbackWarning, match="simulated broken triton install") as record:
        got = update(True, *inputs)
        update(True, *inputs)
    assert len(fallback_warnings(record)) == 1
    assert_identical(got, update(False, *inputs))


@needs_triton
@interpreted
def test_first_launch_failure_warns_once_and_runs_torch(kernel_module, monkeypatch):
    attempts = []

    def broken_launch(*args, **kwargs):  # e.g. no C compiler or ptxas: compilation fails before any write
        attempts.append(1)
        raise RuntimeError("simulated compilation failure")

    monkeypatch.setattr(kernel_module, "moments_and_projections", broken_launch)
    inputs = stack()
    with pytest.warns(KernelFallbackWarning, match="simulated compilation failure") as record:
        got = [update(True, *inputs) for _ in range(2)]
    assert len(fallback_warnings(record)) == 1 and attempts == [1]  # marked broken: not retried every step
    want = update(False, *inputs)
    for result in got:
        assert_identical(result, want)


@needs_triton
@interpreted
def test_errors_after_a_successful_launch_propagate(kernel_module, monkeypatch):
    inputs = stack()
    update(True, *inputs)  # verified
    monkeypatch.setattr(kernel_module, "moments_and_projections", lambda *a, **k: 1 / 0)
    with pytest.raises(ZeroDivisionError):
        update(True, *inputs)


@needs_triton
@interpreted
@pytest.mark.parametrize("mode", ["full", "efficient"])
def test_lorapro_use_triton_true(mode, kernel_calls):
    torch.manual_seed(0)
    net = inject_lora(nn.Sequential(nn.Linear(6, 5), nn.Tanh(), nn.Linear(5, 3)), LoRAConfig(r=2))
    opt = LoRAPro(net, lr=1e-2, mode=mode, use_triton=True)
    net(torch.randn(4, 6)).square().sum().backward()
    with warnings.catch_warnings():
        warnings.simplefilter("error", KernelFallbackWarning)
        opt.step()
    assert len(kernel_calls) == (2 if mode == "full" else 0)  # two shapes; efficient mode has no kernel
