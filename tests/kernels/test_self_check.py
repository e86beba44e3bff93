"""The kernels' self-check (``kernels/dispatch.py``): the first call per key is compared with the torch reference.

A deliberately wrong kernel (the real one plus an error, for one shape only) must be caught on its first call with
one warning, the torch result kept, torch used for that key from then on, and the kernel kept for other keys; a
correct kernel must pass silently. The check is forced with ``LIT_LOWRANK_KERNEL_CHECK=1``: by default it is off
in the interpreter. Natively (``benchmarks/gpu_acceptance.sh``, no TRITON_INTERPRET) the same tests run on CUDA.
"""
import os
import warnings

import pytest
import torch

pytest.importorskip("triton", reason="triton cannot be imported")

from lit_lowrank.kernels import dispatch, lora_pre_adam, lora_pro_full  # noqa: E402
from lit_lowrank.kernels.dispatch import CHECK_ENV, KernelFallbackWarning, output_error  # noqa: E402
from lit_lowrank.optim.lora_pre.adam_update import lora_pre_adam_update_  # noqa: E402
from lit_lowrank.optim.lora_pre.factors import Workspace, init_factor_pairs  # noqa: E402
from lit_lowrank.optim.lora_pro import update as pro_update  # noqa: E402
from lit_lowrank.optim.lora_pro.update import full_mode_update  # noqa: E402

NATIVE = os.environ.get("TRITON_INTERPRET", "1") != "1"
if NATIVE and not torch.cuda.is_available():
    pytest.skip("natively (no TRITON_INTERPRET) the kernels need a GPU", allow_module_level=True)
DEVICE = torch.device("cuda" if NATIVE else "cpu")
WRONG = (37, 53)  # the shape whose kernel result gets the injected error


@pytest.fixture(autouse=True)
def checked(monkeypatch):
    assert NATIVE or (lora_pro_full.INTERPRETED and lora_pre_adam.INTERPRETED), (
        "kernels imported before TRITON_INTERPRET=1")
    monkeypatch.setenv(CHECK_ENV, "1")
    dispatch.reset()
    yield
    dispatch.reset()


def check_warnings(record):
    return [w for w in record if issubclass(w.category, KernelFallbackWarning)]


# ----------------------------------------------------------------------------------------------- LoRA-Pro
def pro_inputs(m, n, L=2, r=3, seed=0):
    gen = torch.Generator().manual_seed(seed)
    tensors = (torch.randn(L, r, n, generator=gen) / n**0.5, torch.randn(L, r, m, generator=gen) * 0.1,
               torch.randn(L, 2 * r, m, generator=gen), torch.randn(L, 2 * r, n, generator=gen) * 1e-2)
    return [t.to(DEVICE) for t in tensors]


class ProPath:
    """One full-mode stack stepped from zero moments; ``step`` returns the new factors and step counts."""

    def __init__(self, m, n, L=2):
        self.moments = [[torch.zeros(m, n, device=DEVICE) for _ in range(L)] for _ in range(2)]
        self.step_count = torch.zeros(L, device=DEVICE)

    def step(self, inputs, use_triton):
        A, B_t, U_t, V = inputs
        ok = torch.ones(A.shape[0], dtype=torch.bool, device=DEVICE)
        new_A, new_B_t, self.step_count = full_mode_update(
            A, B_t, U_t, V, *self.moments, self.step_count, ok, scaling=2.0, lr=1e-2, beta1=0.9, beta2=0.999,
            eps=1e-8, weight_decay=0.1, damping=1e-8, use_triton=use_triton)
        return [new_A, new_B_t, *self.moments[0], *self.moments[1]]


@pytest.fixture
def wrong_pro_kernel(monkeypatch):
    """The real kernel, then an error of 1% of the largest projection in one entry of the last (ragged) tile."""
    launched = []
    original = lora_pro_full.moments_and_projections

    def wrong(A, B_t, *args, **kwargs):
        launched.append((B_t.shape[-1], A.shape[-1]))
        proj_A, proj_B_t = original(A, B_t, *args, **kwargs)
        if (B_t.shape[-1], A.shape[-1]) == WRONG:
            proj_A[-1, -1, -1] += 0.01 * proj_A.abs().max()
        return proj_A, proj_B_t

    monkeypatch.setattr(lora_pro_full, "moments_and_projections", wrong)
    return launched


def test_wrong_lora_pro_kernel_is_caught_once_and_torch_kept_for_that_shape(wrong_pro_kernel):
    wrong, right = pro_inputs(*WRONG), pro_inputs(40, 24, seed=1)
    paths = {name: (ProPath(*WRONG), ProPath(40, 24)) for name in ("kernel", "torch")}
    with pytest.warns(KernelFallbackWarning) as record:
        got = [(paths["kernel"][0].step(wrong, True), paths["kernel"][1].step(right, True)) for _ in range(3)]
    want = [(paths["torch"][0].step(wrong, False), paths["torch"][1].step(right, False)) for _ in range(3)]
    (warning,) = check_warnings(record)
    message = str(warning.message)
    assert "differs from the torch reference" in message and "B^T G is off by" in message, message
    assert "A (2, 3, 53)" in message and "LIT_LOWRANK_KERNEL_CHECK=0" in message, message
    # The wrong shape: launched once (the checked call), never again; its results are torch's, bit for bit.
    assert wrong_pro_kernel == [WRONG, (40, 24), (40, 24), (40, 24)]
    for (got_wrong, got_right), (want_wrong, want_right) in zip(got, want):
        for a, b in zip(got_wrong, want_wrong, strict=True):
            assert torch.equal(a, b)
        for a, b in zip(got_right, want_right, strict=True):  # the other shape kept the (correct) kernel
            torch.testing.assert_close(a, b, rtol=0, atol=float(1e-4 * b.abs().max()))


def test_correct_lora_pro_kernel_passes_the_check_silently(wrong_pro_kernel, monkeypatch):
    references = []
    original = dispatch._checked_launch
    monkeypatch.setattr(dispatch, "_checked_launch", lambda *a: references.append(a[4]) or original(*a))
    inputs, path = pro_inputs(40, 24), ProPath(40, 24)
    with warnings.catch_warnings():
        warnings.simplefilter("error", KernelFallbackWarning)
        for _ in range(2):
            path.step(inputs, True)
    assert wrong_pro_kernel == [(40, 24)] * 2 and len(references) == 1  # checked on the first call only
    assert dispatch._checked == {references[0]: True}


# ---------------------------------------------------------------------------------------------- LoRA-Pre
LR = 1e-2


class PreMatrix:
    def __init__(self, shape, r=3, dtype=torch.float32, seed=0):
        gen = torch.Generator().manual_seed(seed)
        self.W = torch.randn(*shape, generator=gen).to(DEVICE, dtype)
        (self.B, self.A), (self.V_B, self.V_A) = init_factor_pairs(shape, r, seed, 2, torch.float32, DEVICE)
        self.workspace = Workspace()
        self.gen, self.steps = gen, 0

    def step(self, use_triton, **options):
        self.steps += 1
        grad = (torch.randn(*self.W.shape, generator=self.gen) * 1e-2).to(DEVICE, self.W.dtype)
        options = {"weight_decay": 0.1, "factor_update": "alternating", "residual_step": False, **options}
        lora_pre_adam_update_(self.W, grad, self.B, self.A, self.V_B, self.V_A, step=self.steps, lr=LR, beta1=0.9,
                              beta2=0.999, eps=1e-8, scale=1.0, damping=1e-6, chunk_rows=16, workspace=self.workspace,
                              use_triton=use_triton, **options)


@pytest.fixture
def wrong_pre_kernel(monkeypatch):
    """The real first pass, then one entry of the first W (the last, ragged, tile) moved by five learning rates (a few
    bf16 ulps)."""
    launched = []
    original = lora_pre_adam.first_pass

    def wrong(params, *args, **kwargs):
        launched.append(tuple(params[0].shape))
        sums = original(params, *args, **kwargs)
        if tuple(params[0].shape) == WRONG:
            params[0][-1, -1] += 5 * LR
        return sums

    monkeypatch.setattr(lora_pre_adam, "first_pass", wrong)
    return launched


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_wrong_lora_pre_kernel_is_caught_once_and_torch_kept_for_that_shape(dtype, wrong_pre_kernel):
    kernel = (PreMatrix(WRONG, dtype=dtype), PreMatrix((40, 24), dtype=dtype, seed=1))
    torch_path = (PreMatrix(WRONG, dtype=dtype), PreMatrix((40, 24), dtype=dtype, seed=1))
    with pytest.warns(KernelFallbackWarning) as record:
        for _ in range(3):
            for matrix in kernel:
                matrix.step(True)
    for _ in range(3):
        for matrix in torch_path:
            matrix.step(False)
    (warning,) = check_warnings(record)
    unit = "relative" if dtype == torch.float32 else "ulps"
    assert "W[0] is off by" in str(warning.message) and unit in str(warning.message), warning.message
    assert f"W {WRONG} {dtype}" in str(warning.message) and "first pass" in str(warning.message)
    assert wrong_pre_kernel == [WRONG, (40, 24), (40, 24), (40, 24)]  # the wrong first pass: torch from then on
    for fused, reference in zip(kernel, torch_path):  # both: torch's numbers up to rounding, the error never kept
        for got, want in zip([fused.W, fused.B, fused.A], [reference.W, reference.B, reference.A]):
            got, want = got.float(), want.float()
            assert (got - want).abs().max() <= 2 * torch.finfo(dtype).eps * want.abs().max()


def test_correct_lora_pre_kernel_passes_and_a_new_option_is_a_new_key(wrong_pre_kernel):
    matrix = PreMatrix((40, 24))
    with warnings.catch_warnings():
        warnings.simplefilter("error", KernelFallbackWarning)
        matrix.step(True)
        matrix.step(True)
        assert len(dispatch._checked) == 2  # each pass checked once
        matrix.step(True, weight_decay=0.0, factor_update="jacobi")  # another constexpr (DECAY) and torch glue
    assert len(dispatch._checked) == 4 and all(dispatch._checked.values())
    assert wrong_pre_kernel == [(40, 24)] * 3


# ----------------------------------------------------------------------------------------- switches
def test_check_off_keeps_the_wrong_kernel_and_auto_is_off_in_the_interpreter(wrong_pro_kernel, monkeypatch):
    settings = ["0"] if NATIVE else ["0", "auto"]
    for setting in settings:
        monkeypatch.setenv(CHECK_ENV, setting)
        dispatch.reset()
        inputs = pro_inputs(*WRONG)
        with warnings.catch_warnings():
            warnings.simplefilter("error", KernelFallbackWarning)
            got = ProPath(*WRONG).step(inputs, True)
        want = ProPath(*WRONG).step(inputs, False)
        assert not torch.allclose(got[0], want[0], rtol=0, atol=1e-6)  # the injected error went through
        assert dispatch._checked == {}
    dispatch.set_kernel_check(True)  # the argument wins over the variable
    try:
        with pytest.warns(KernelFallbackWarning, match="differs from the torch reference"):
            ProPath(*WRONG).step(pro_inputs(*WRONG), True)
    finally:
        dispatch.set_kernel_check(None)


@pytest.mark.skipif(not NATIVE, reason="on a GPU the check is on by default")
def test_auto_checks_on_a_gpu(wrong_pro_kernel, monkeypatch):
    monkeypatch.delenv(CHECK_ENV)
    with pytest.warns(KernelFallbackWarning, match="differs from the torch reference"):
        ProPath(*WRONG).step(pro_inputs(*WRONG), "auto")


def test_unknown_setting_says_what_to_set(monkeypatch):
    monkeypatch.setenv(CHECK_ENV, "sometimes")
    with pytest.raises(ValueError, match="LIT_LOWRANK_KERNEL_CHECK='sometimes' is not understood. HINT"):
        ProPath(*WRONG).step(pro_inputs(*WRONG), True)


def test_reference_runs_with_fp32_matmuls_and_the_user_setting_is_restored(monkeypatch):
    seen = []
    original = pro_update.torch_moments_and_projections
    monkeypatch.setattr(pro_update, "torch_moments_and_projections",
                        lambda *a, **k: seen.append(torch.get_float32_matmul_precision()) or original(*a, **k))
    previous = torch.get_float32_matmul_precision()
    torch.set_float32_matmul_precision("medium")
    try:
        ProPath(40, 24).step(pro_inputs(40, 24), True)
        assert torch.get_float32_matmul_precision() == "medium"
    finally:
        torch.set_float32_matmul_precision(previous)
    assert seen == ["highest"]  # the check's reference; the kernel passed, so no torch step after it


def test_first_launch_failure_under_the_check_keeps_the_reference_result(monkeypatch):
    def broken(*args, **kwargs):
        raise RuntimeError("simulated ptxas failure")

    monkeypatch.setattr(lora_pro_full, "moments_and_projections", broken)
    inputs = pro_inputs(40, 24)
    with pytest.warns(KernelFallbackWarning, match="simulated ptxas failure"):
        got = ProPath(40, 24).step(inputs, True)
    for a, b in zip(got, ProPath(40, 24).step(inputs, False), strict=True):
        assert torch.equal(a, b)


# --------------------------------------------------------------------------------------- output_error
def test_output_error_measures_relative_to_magnitude_and_in_ulps():
    want = torch.tensor([1.0, -2.0, 0.0, float("nan"), float("inf")])
    assert output_error(want.clone(), want) == (0.0, dispatch.CHECK_RTOL["ieee"], "relative")
    error, _, _ = output_error(want + torch.tensor([0.0, 1e-3, 0.0, 0.0, 0.0]), want)
    assert error == pytest.approx(5e-4, rel=1e-3)  # 1e-3 of the largest finite magnitude, 2 (fp32 rounded)
    assert output_error(want, want, scale=torch.tensor(4.0), rtol=0.5)[1:] == (0.5, "relative")
    assert output_error(torch.tensor([1.0, -2.0, 0.0, 0.0, float("inf")]), want)[0] == float("inf")  # NaN lost
    half = torch.tensor([1.0, 3.0], dtype=torch.bfloat16)
    one_ulp = torch.tensor([1.0 + 2**-7, 3.0], dtype=torch.bfloat16)
    assert output_error(one_ulp, half) == (1.0, dispatch.CHECK_ULPS, "ulps")
    assert output_error(torch.tensor([1.0 + 2**-6, 3.0], dtype=torch.bfloat16), half)[0] == 2.0


def test_one_dot_precision_for_both_kernels():
    cuda = torch.device("cuda")
    expected = "ieee" if torch.version.hip else dispatch.GPU_DOT_PRECISION
    assert dispatch.GPU_DOT_PRECISION == "tf32x3" and dispatch.dot_precision(cuda) == expected
    assert dispatch.dot_precision(cuda, interpreted=True) == dispatch.dot_precision(torch.device("cpu")) == "ieee"
    for module in (lora_pro_full, lora_pre_adam):
        assert module.dot_precision(cuda) == dispatch.dot_precision(cuda, module.INTERPRETED)
    assert set(dispatch.CHECK_RTOL) >= {"ieee", dispatch.GPU_DOT_PRECISION}
