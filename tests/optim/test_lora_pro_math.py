"""LoRA-Pro closed form on plain tensors: spec invariants 1-8 against independent dense computations.

References are built here only: explicit projectors from ``torch.linalg.pinv`` and a dense
least-squares solve of the vec'd (Kronecker) problem in float64.
"""
import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from lit_lowrank.optim import equivalent_gradient, lora_pro_gradients

F64 = torch.float64


pytestmark = pytest.mark.usefixtures("one_thread")  # tiny tensors (tests/optim/conftest.py)


def problem(m, n, r, s=2.0, seed=0, dtype=F64):
    gen = torch.Generator().manual_seed(seed)
    A, B, g = (torch.randn(shape, generator=gen, dtype=F64) for shape in ((r, n), (m, r), (m, n)))
    return A.to(dtype), B.to(dtype), g.to(dtype), s


def lora_grads(A, B, g, s):
    return s * B.T @ g, s * g @ A.T


def projectors(A, B, rtol=1e-10):
    """P_B (m x m) and P_A (n x n), built densely; only tests may do this."""
    return B @ torch.linalg.pinv(B, rtol=rtol), torch.linalg.pinv(A, rtol=rtol) @ A


def projected_gradient(A, B, g, rtol=1e-10):
    P_B, P_A = projectors(A.to(F64), B.to(F64), rtol)
    g = g.to(F64)
    return P_B @ g + (torch.eye(len(P_B), dtype=F64) - P_B) @ g @ P_A


def weight_change(A, B, dA, dB, s):
    return s * (B.to(F64) @ dA.to(F64) + dB.to(F64) @ A.to(F64))


def kronecker_reference(A, B, gA, gB, s):
    """Among all least-squares minimisers of ||s(B dA + dB A) - g||, the one closest to (gA, gB).

    With L the linear map (dA, dB) -> s(B dA + dB A) as a dense matrix K and p = vec(gA, gB), the closest
    minimiser is p + K^+ (g - K p); g itself is recovered from gA, gB only through K's range, so we pass
    the true g explicitly.
    """
    r, n = A.shape
    m = B.shape[0]
    cols = []
    for e in torch.eye(r * n + m * r, dtype=F64):
        dA, dB = e[: r * n].reshape(r, n), e[r * n:].reshape(m, r)
        cols.append((s * (B @ dA + dB @ A)).reshape(-1))
    K = torch.stack(cols, dim=1)
    p = torch.cat([gA.reshape(-1), gB.reshape(-1)])
    return K, p


def reference_solution(A, B, g, s):
    gA, gB = lora_grads(A, B, g, s)
    K, p = kronecker_reference(A, B, gA, gB, s)
    x = p + torch.linalg.pinv(K, rtol=1e-10) @ (g.reshape(-1) - K @ p)
    r, n = A.shape
    return x[: r * n].reshape(r, n), x[r * n:].reshape(B.shape)


SHAPES = [(5, 4, 2), (3, 7, 2), (6, 6, 3), (8, 5, 1)]


@pytest.mark.parametrize("m,n,r", SHAPES)
def test_projection_identity(m, n, r):  # invariant 1
    A, B, g, s = problem(m, n, r, s=1.7)
    dA, dB = lora_pro_gradients(A, B, *lora_grads(A, B, g, s), scaling=s)
    torch.testing.assert_close(weight_change(A, B, dA, dB, s), projected_gradient(A, B, g), rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("m,n,r", SHAPES)
def test_sylvester_x_gives_the_closest_minimiser(m, n, r):  # invariant 2
    A, B, g, s = problem(m, n, r, s=0.5, seed=1)
    dA, dB = lora_pro_gradients(A, B, *lora_grads(A, B, g, s), scaling=s)
    ref_dA, ref_dB = reference_solution(A, B, g, s)
    torch.testing.assert_close(dA, ref_dA, rtol=1e-9, atol=1e-9)
    torch.testing.assert_close(dB, ref_dB, rtol=1e-9, atol=1e-9)


def test_any_x_gives_the_same_equivalent_gradient_but_a_larger_distance():  # invariant 2
    A, B, g, s = problem(7, 5, 3, seed=2)
    gA, gB = lora_grads(A, B, g, s)
    dA, dB = lora_pro_gradients(A, B, gA, gB, scaling=s)
    best = (dA - gA).square().sum() + (dB - gB).square().sum()
    for seed in range(5):
        X = torch.randn(3, 3, dtype=F64, generator=torch.Generator().manual_seed(seed))
        dA_x, dB_x = dA + X @ A, dB - B @ X
        torch.testing.assert_close(weight_change(A, B, dA_x, dB_x, s), weight_change(A, B, dA, dB, s))
        assert (dA_x - gA).square().sum() + (dB_x - gB).square().sum() > best


def test_no_pair_fits_g_better():  # invariant 3
    A, B, g, s = problem(6, 5, 2, seed=3)
    dA, dB = lora_pro_gradients(A, B, *lora_grads(A, B, g, s), scaling=s)
    best = (weight_change(A, B, dA, dB, s) - g).norm()
    gen = torch.Generator().manual_seed(0)
    for _ in range(50):
        other_A = dA + 0.3 * torch.randn(dA.shape, dtype=F64, generator=gen)
        other_B = dB + 0.3 * torch.randn(dB.shape, dtype=F64, generator=gen)
        assert (weight_change(A, B, other_A, other_B, s) - g).norm() >= best - 1e-12


@pytest.mark.parametrize("m,n", [(7, 4), (4, 7)])
def test_full_rank_recovers_the_full_gradient(m, n):  # invariant 4: r = min(m, n)
    A, B, g, s = problem(m, n, min(m, n), seed=4)
    dA, dB = lora_pro_gradients(A, B, *lora_grads(A, B, g, s), scaling=s)
    torch.testing.assert_close(weight_change(A, B, dA, dB, s), g, rtol=1e-9, atol=1e-9)


@pytest.mark.parametrize("dtype", [F64, torch.float32, torch.bfloat16])
def test_zero_B_gives_zero_dA_and_gB_QA(dtype):  # invariant 5
    A, _, g, s = problem(6, 5, 2, seed=5)
    B = torch.zeros(6, 2, dtype=F64)
    gA, gB = lora_grads(A, B, g, s)
    dA, dB = lora_pro_gradients(A.to(dtype), B.to(dtype), gA.to(dtype), gB.to(dtype), scaling=s)
    assert dA.dtype == dB.dtype == dtype
    assert torch.equal(dA, torch.zeros_like(dA))
    expected = gB.to(dtype).to(F64) @ torch.linalg.inv(A.to(dtype).to(F64) @ A.to(dtype).to(F64).T) / s**2
    tol = {F64: 1e-12, torch.float32: 1e-5, torch.bfloat16: 2e-2}[dtype]
    torch.testing.assert_close(dB.to(F64), expected, rtol=tol, atol=tol)
    torch.testing.assert_close(weight_change(A, B, dA, dB, s), projected_gradient(A, B, g), rtol=tol, atol=tol)


def test_zero_A_and_B_give_zeros_not_nan():
    zeros_A, zeros_B = torch.zeros(2, 5), torch.zeros(6, 2)
    dA, dB = lora_pro_gradients(zeros_A, zeros_B, torch.zeros(2, 5), torch.randn(6, 2), scaling=2.0)
    assert torch.equal(dA, torch.zeros_like(dA)) and torch.equal(dB, torch.zeros_like(dB))


def test_gauge_invariance():  # invariant 6
    A, B, g, s = problem(6, 5, 3, seed=6)
    R = torch.randn(3, 3, dtype=F64, generator=torch.Generator().manual_seed(1)) + 3 * torch.eye(3, dtype=F64)
    A2, B2 = torch.linalg.solve(R, A), B @ R
    before = equivalent_gradient(A, B, *lora_grads(A, B, g, s), scaling=s, dense=True)
    after = equivalent_gradient(A2, B2, *lora_grads(A2, B2, g, s), scaling=s, dense=True)
    torch.testing.assert_close(after, before, rtol=1e-9, atol=1e-9)


def test_scale_handling():  # invariant 7
    A, B, g, _ = problem(6, 5, 2, seed=7)
    results = {s: lora_pro_gradients(A, B, *lora_grads(A, B, g, s), scaling=s) for s in (0.25, 1.0, 8.0)}
    for s, (dA, dB) in results.items():
        torch.testing.assert_close(weight_change(A, B, dA, dB, s), projected_gradient(A, B, g), rtol=1e-10, atol=1e-10)
        # dA = (1/s) (Q_B B^T g + ...): s * dA and s * dB do not depend on s
        torch.testing.assert_close(s * dA, 1.0 * results[1.0][0], rtol=1e-10, atol=1e-10)
        torch.testing.assert_close(s * dB, 1.0 * results[1.0][1], rtol=1e-10, atol=1e-10)


def test_batched_equals_per_layer():  # invariant 8
    layers = [problem(6, 5, 2, seed=10 + i, dtype=torch.float32) for i in range(4)]
    scalings = torch.tensor([0.5, 1.0, 2.0, 4.0])
    A, B = torch.stack([l[0] for l in layers]), torch.stack([l[1] for l in layers])
    grads = [lora_grads(l[0], l[1], l[2], float(s)) for l, s in zip(layers, scalings)]
    gA, gB = torch.stack([gr[0] for gr in grads]), torch.stack([gr[1] for gr in grads])
    dA, dB = lora_pro_gradients(A, B, gA, gB, scaling=scalings)
    for i, (layer, s) in enumerate(zip(layers, scalings)):
        one_A, one_B = lora_pro_gradients(layer[0], layer[1], gA[i], gB[i], scaling=float(s))
        torch.testing.assert_close(dA[i], one_A, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(dB[i], one_B, rtol=1e-5, atol=1e-6)
    U, V = equivalent_gradient(A, B, gA, gB, scaling=2.0)
    assert U.shape == (4, 6, 4) and V.shape == (4, 4, 5)


def test_float32_agrees_with_float64():  # invariant 8
    A, B, g, s = problem(40, 30, 4, seed=11)
    gA, gB = lora_grads(A, B, g, s)
    dA64, dB64 = lora_pro_gradients(A, B, gA, gB, scaling=s)
    dA32, dB32 = lora_pro_gradients(*(t.float() for t in (A, B, gA, gB)), scaling=s)
    assert dA32.dtype == torch.float32
    torch.testing.assert_close(dA32.double(), dA64, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(dB32.double(), dB64, rtol=1e-4, atol=1e-5)


def test_bf16_inputs_are_solved_in_fp32():  # invariant 8
    A, B, g, s = problem(24, 16, 4, seed=12, dtype=torch.bfloat16)
    gA, gB = lora_grads(A, B, g, s)
    dA, dB = lora_pro_gradients(A, B, gA, gB, scaling=s)
    assert dA.dtype == dB.dtype == torch.bfloat16
    # Same inputs upcast and solved in fp64: only the final rounding to bf16 may differ.
    ref_A, ref_B = lora_pro_gradients(*(t.double() for t in (A, B, gA, gB)), scaling=s)
    torch.testing.assert_close(dA.double(), ref_A.to(torch.bfloat16).double(), rtol=1.6e-2, atol=1e-3)
    torch.testing.assert_close(dB.double(), ref_B.to(torch.bfloat16).double(), rtol=1.6e-2, atol=1e-3)


@pytest.mark.parametrize("dtype", [F64, torch.float32])
@pytest.mark.parametrize("deficient", ["A", "B", "both"])
def test_rank_deficient_factors_follow_pseudo_inverse(dtype, deficient):
    m, n, r = 48, 40, 6
    gen = torch.Generator().manual_seed(13)
    A, B, g, s = problem(m, n, r, seed=13)
    if deficient in ("A", "both"):
        A = torch.randn(r, 3, dtype=F64, generator=gen) @ torch.randn(3, n, dtype=F64, generator=gen)
    if deficient in ("B", "both"):
        B = torch.randn(m, 2, dtype=F64, generator=gen) @ torch.randn(2, r, dtype=F64, generator=gen)
    gA, gB = lora_grads(A, B, g, s)
    dA, dB = lora_pro_gradients(*(t.to(dtype) for t in (A, B, gA, gB)), scaling=s)
    assert torch.isfinite(dA).all() and torch.isfinite(dB).all()
    expected = projected_gradient(A, B, g, rtol=1e-6)
    tol = 1e-9 if dtype == F64 else 1e-4
    torch.testing.assert_close(weight_change(A, B, dA, dB, s), expected, rtol=tol, atol=tol * expected.abs().max())


def test_denormal_factor_does_not_overflow():
    A, B, g, s = problem(6, 5, 2, seed=14, dtype=torch.float32)
    B = B * 1e-20  # B^T B is denormal in fp32: 1 / eigenvalue would be inf
    gA, gB = lora_grads(A, B, g, s)
    dA, dB = lora_pro_gradients(A, B, gA, gB, scaling=s)
    assert torch.isfinite(dA).all() and torch.isfinite(dB).all()


def test_equivalent_gradient_factors_and_dense_form():
    A, B, g, s = problem(9, 7, 3, seed=15)
    gA, gB = lora_grads(A, B, g, s)
    U, V = equivalent_gradient(A, B, gA, gB, scaling=s)
    assert U.shape == (9, 6) and V.shape == (6, 7)
    dense = equivalent_gradient(A, B, gA, gB, scaling=s, dense=True)
    torch.testing.assert_close(U @ V, dense)
    torch.testing.assert_close(dense, projected_gradient(A, B, g), rtol=1e-10, atol=1e-10)


def test_non_finite_gradients_propagate_without_error():
    A, B, g, s = problem(6, 5, 2, seed=16, dtype=torch.float32)
    gA, gB = lora_grads(A, B, g, s)
    gA[0, 0] = float("inf")
    dA, dB = lora_pro_gradients(A, B, gA, gB, scaling=s)
    assert not torch.isfinite(dA).all()


def test_shape_and_scaling_errors_explain_the_fix():
    A, B = torch.randn(2, 5), torch.randn(6, 2)
    with pytest.raises(ValueError, match="do not form a LoRA pair"):
        lora_pro_gradients(B, A, torch.zeros(6, 2), torch.zeros(2, 5), scaling=1.0)
    with pytest.raises(ValueError, match="gradient shapes must match"):
        lora_pro_gradients(A, B, torch.zeros(2, 4), torch.zeros(6, 2), scaling=1.0)
    with pytest.raises(ValueError, match="non-zero"):
        lora_pro_gradients(A, B, torch.zeros(2, 5), torch.zeros(6, 2), scaling=0.0)


class _Recorder(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.shapes, self.ops = [], set()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        self.ops.add(func.overloadpacket.__name__)
        for t in out if isinstance(out, (tuple, list)) else (out,):
            if isinstance(t, torch.Tensor):
                self.shapes.append(tuple(t.shape))
        return out


def test_only_skinny_intermediates_and_no_host_sync():
    m, n, r = 50, 40, 3
    A, B, g, s = problem(m, n, r, seed=17, dtype=torch.float32)
    gA, gB = lora_grads(A, B, g, s)
    with _Recorder() as rec:
        lora_pro_gradients(A, B, gA, gB, scaling=s)
        equivalent_gradient(A, B, gA, gB, scaling=s)
    assert rec.shapes, "the recorder saw no ops"
    assert all(min(shape[-2:], default=0) <= 2 * r for shape in rec.shapes if len(shape) >= 2), rec.shapes
    assert "_local_scalar_dense" not in rec.ops  # .item() / bool(tensor) would sync with the device
    assert "linalg_eigh" in rec.ops or "_linalg_eigh" in rec.ops
