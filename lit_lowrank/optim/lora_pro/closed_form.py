"""LoRA-Pro's closed form: adapter gradients whose equivalent gradient is the best rank-r fit of ``g``.

Notation (see ``docs/lora-pro.md``): ``W = W0 + s * B @ A`` with ``A`` (r x n), ``B`` (m x r);
``g_A = s B^T g`` and ``g_B = s g A^T`` are the plain LoRA gradients of ``g = dL/dW``.

Everything here uses r x r matrices and skinny products only: no m x m or n x n projector is ever
formed, ``g`` itself is never needed, and all layers of a batch are solved at once on their device.
Internally both factors are held as r-row matrices, ``A`` (r x n) and ``B_t = B^T`` (r x m), so every
product is (r x r) @ (r x k) or (r x k) @ (k x r): the faster layout on CPU (measured in docs/design.md).

Damping (pseudo-inverse semantics): the inverse Grams ``Q_B = (B^T B)^+`` and ``Q_A = (A A^T)^+`` come
from one ``torch.linalg.eigh`` per Gram. An eigenvalue at or below

    max(max(damping, 32 * finfo.eps) * largest_eigenvalue,  finfo.tiny / finfo.eps)

is treated as exactly zero (its inverse is 0, not a huge ``1/tiny``), so nothing overflows and no
``inf * 0 = NaN`` can appear. ``B = 0`` therefore gives ``Q_B = 0``, ``dA = 0`` and
``dB = g_B Q_A / s^2`` exactly. Why the two floors: docs/lora-pro.md (Damping).
"""
from __future__ import annotations

from typing import NamedTuple

import torch

from lit_lowrank.optim.state import compute_dtype

Scaling = float | torch.Tensor
#: Gram eigenvalues within this many machine epsilons of the largest are rounding noise (module docstring).
NOISE_EPS = 32


class GramSpectrum(NamedTuple):
    """Eigendecompositions of ``B^T B`` and ``A A^T`` (kept eigenvalues; dropped ones are 0)."""

    vecs_B: torch.Tensor
    vals_B: torch.Tensor
    inv_B: torch.Tensor  # pseudo-inverse eigenvalues, 0 where dropped
    vecs_A: torch.Tensor
    vals_A: torch.Tensor
    inv_A: torch.Tensor

    def q_B(self) -> torch.Tensor:
        """``(B^T B)^+`` (r x r)."""
        return (self.vecs_B * self.inv_B.unsqueeze(-2)) @ self.vecs_B.mT

    def q_A(self) -> torch.Tensor:
        """``(A A^T)^+`` (r x r)."""
        return (self.vecs_A * self.inv_A.unsqueeze(-2)) @ self.vecs_A.mT


def check_shapes(A: torch.Tensor, B: torch.Tensor, grad_A: torch.Tensor, grad_B: torch.Tensor) -> None:
    """Raise a ValueError that names the mismatch when the factors and gradients do not fit together."""
    if A.dim() not in (2, 3) or B.dim() != A.dim():
        raise ValueError(
            f"expected A (r x n) and B (m x r), or stacks (L x r x n) and (L x m x r) of the same batch size; "
            f"got A{tuple(A.shape)} and B{tuple(B.shape)}"
        )
    if A.shape[:-2] != B.shape[:-2] or A.shape[-2] != B.shape[-1]:
        raise ValueError(
            f"A{tuple(A.shape)} and B{tuple(B.shape)} do not form a LoRA pair: need A = (..., r, n) and "
            f"B = (..., m, r) with the same r and batch size. HINT: pass lora_A as A and lora_B as B."
        )
    if grad_A.shape != A.shape or grad_B.shape != B.shape:
        raise ValueError(
            f"gradient shapes must match their parameters: grad_A{tuple(grad_A.shape)} vs A{tuple(A.shape)}, "
            f"grad_B{tuple(grad_B.shape)} vs B{tuple(B.shape)}"
        )


def batch_scalar(value: Scaling, like: torch.Tensor) -> Scaling:
    """A python number as is; a tensor (scalar, or one value per layer) shaped to broadcast over ``like``."""
    if not torch.is_tensor(value):
        if value == 0:
            raise ValueError("scaling must be non-zero (it is alpha / r of the adapter); got 0")
        return float(value)
    value = value.to(device=like.device, dtype=like.dtype)
    return value.reshape(value.shape + (1,) * (like.dim() - value.dim())) if value.dim() else value


def row_factors(A: torch.Tensor, B: torch.Tensor, grad_A: torch.Tensor, grad_B: torch.Tensor):
    """``(A, B^T, grad_A, grad_B^T)`` as contiguous r-row matrices in the compute dtype."""
    dtype = compute_dtype(A, B, grad_A, grad_B)
    return tuple(t.to(dtype).contiguous() for t in (A, B.mT, grad_A, grad_B.mT))


def small_eigh(matrices: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``torch.linalg.eigh`` for a batch of small (r x r) matrices, single-threaded on CPU (why: docs/design.md)."""
    threads = torch.get_num_threads()
    if matrices.device.type != "cpu" or threads == 1:
        return torch.linalg.eigh(matrices)
    torch.set_num_threads(1)
    try:
        return torch.linalg.eigh(matrices)
    finally:
        torch.set_num_threads(threads)


def gram_spectrum(A: torch.Tensor, B_t: torch.Tensor, damping: float = 1e-8) -> GramSpectrum:
    """Eigendecompose ``B^T B`` and ``A A^T`` in one batched ``eigh`` and build their damped pseudo-inverses.

    ``A`` (r x n) and ``B_t = B^T`` (r x m) must already be in the compute dtype. See the module
    docstring for the damping rule.
    """
    grams = torch.stack([B_t @ B_t.mT, A @ A.mT])
    vals, vecs = small_eigh(grams)
    finfo = torch.finfo(vals.dtype)
    largest = vals.amax(dim=-1, keepdim=True).clamp_min(0)
    threshold = (max(damping, NOISE_EPS * finfo.eps) * largest).clamp_min(finfo.tiny / finfo.eps)
    keep = vals > threshold
    vals = torch.where(keep, vals, torch.zeros_like(vals))
    inv = torch.where(keep, 1.0 / torch.where(keep, vals, torch.ones_like(vals)), torch.zeros_like(vals))
    return GramSpectrum(vecs[0], vals[0], inv[0], vecs[1], vals[1], inv[1])


def sylvester_x(spectrum: GramSpectrum, rhs: torch.Tensor) -> torch.Tensor:
    """Solve ``(B^T B) X + X (A A^T) = rhs`` in the Grams' eigenbases (dropped eigenvalues count as 0).

    Where both eigenvalues of a pair are dropped the equation does not constrain that entry; the
    minimum-norm choice 0 is taken instead of dividing by zero.
    """
    rotated = spectrum.vecs_B.mT @ rhs @ spectrum.vecs_A
    denom = spectrum.vals_B.unsqueeze(-1) + spectrum.vals_A.unsqueeze(-2)
    solvable = denom > 0
    rotated = torch.where(solvable, rotated / torch.where(solvable, denom, torch.ones_like(denom)),
                          torch.zeros_like(rotated))
    return spectrum.vecs_B @ rotated @ spectrum.vecs_A.mT


def closed_form(spectrum: GramSpectrum, A: torch.Tensor, B_t: torch.Tensor, grad_A: torch.Tensor,
                grad_B_t: torch.Tensor, scaling: Scaling,
                b_grad_b: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """``(dA, dB^T)`` from r-row factors in the compute dtype (``scaling`` from :func:`batch_scalar`).

    dA = (1/s^2) Q_B g_A + X A
    dB = (1/s^2) (I - P_B) g_B Q_A - B X  =  (1/s^2) g_B Q_A - B ((1/s^2) Q_B B^T g_B Q_A + X)
    The second form of dB folds two m x r products into one r x r sum (3 skinny products, not 4).

    dB is row-local given the r x r ``B^T g_B``: with ``b_grad_b`` (that product summed over every row block),
    ``B_t`` and ``grad_B_t`` may hold one block of columns (a rank's rows of B) and ``dB^T`` comes back for
    those columns only; ``spectrum`` and ``grad_A`` must still be those of the whole layer.
    """
    q_B, q_A = spectrum.q_B(), spectrum.q_A()
    inv_s2 = 1.0 / (scaling * scaling)
    # 1/s^2 scales r x r matrices, not r x n ones, and the sums are fused into the GEMMs.
    dA_min = (inv_s2 * q_B) @ grad_A
    # X keeps (dA, dB) closest to the plain LoRA gradients among all pairs with the same g~.
    X = sylvester_x(spectrum, -(dA_min @ A.mT))
    dA = matmul_add(dA_min, X, A)  # dA_min is not needed afterwards
    if b_grad_b is None:
        b_grad_b = B_t @ grad_B_t.mT
    Y = inv_s2 * (q_B @ b_grad_b @ q_A) + X
    dB_t = matmul_add((inv_s2 * q_A) @ grad_B_t, Y.mT, B_t, alpha=-1.0)
    return dA, dB_t


def matmul_add(bias: torch.Tensor, left: torch.Tensor, right: torch.Tensor, alpha: float = 1.0) -> torch.Tensor:
    """``bias += alpha * left @ right`` in one GEMM call (no extra pass); ``bias`` must be a temporary."""
    if bias.dim() == 3:
        return bias.baddbmm_(left, right, alpha=alpha)
    return bias.addmm_(left, right, alpha=alpha)


def equivalent_factors(spectrum: GramSpectrum, A: torch.Tensor, B_t: torch.Tensor, grad_A: torch.Tensor,
                       grad_B_t: torch.Tensor, scaling: Scaling) -> tuple[torch.Tensor, torch.Tensor]:
    """``(U^T, V)`` with ``U^T.mT @ V = g~`` (rank <= 2r), from r-row factors in the compute dtype.

    g~ = (1/s) B Q_B g_A + (1/s) (I - P_B) g_B Q_A A, so U = [B | (I - P_B) g_B Q_A] and
    V = (1/s) [Q_B g_A ; A]; ((I - P_B) g_B Q_A)^T = Q_A g_B^T - Q_A (g_B^T B) Q_B B^T.
    """
    q_B, q_A = spectrum.q_B(), spectrum.q_A()
    perp_t = q_A @ grad_B_t - (q_A @ (grad_B_t @ B_t.mT) @ q_B) @ B_t
    U_t = torch.cat([B_t, perp_t], dim=-2)
    V = torch.cat([q_B @ grad_A, A], dim=-2) / scaling
    return U_t, V


def lora_pro_gradients(A: torch.Tensor, B: torch.Tensor, grad_A: torch.Tensor, grad_B: torch.Tensor,
                       scaling: Scaling, damping: float = 1e-8) -> tuple[torch.Tensor, torch.Tensor]:
    """LoRA-Pro adapter gradients ``(dA, dB)`` from the plain ones, with the Sylvester-optimal ``X``.

    ``s * (B @ dA + dB @ A)`` equals the best rank-r approximation ``P_B g + (I - P_B) g P_A`` of the
    full gradient ``g``, and among all pairs with that property ``(dA, dB)`` is the closest to
    ``(grad_A, grad_B)``. Works on one layer (``A``: r x n, ``B``: m x r) or a stack of layers with a
    leading batch dimension. The math runs in fp32 (fp64 for fp64 inputs); results come back in the
    dtypes of ``A`` and ``B``. Non-finite gradients propagate (no error, no host sync).

    Args:
        A, B: the adapter factors ``lora_A`` and ``lora_B``.
        grad_A, grad_B: their gradients.
        scaling: ``alpha / r`` (or ``alpha / sqrt(r)``); a float, or a tensor with one value per layer.
        damping: relative eigenvalue cut-off of the Gram pseudo-inverses (see the module docstring).

    Example:
        >>> import torch
        >>> A, B, g = torch.randn(2, 6), torch.randn(5, 2), torch.randn(5, 6)
        >>> s = 2.0
        >>> dA, dB = lora_pro_gradients(A, B, s * B.T @ g, s * g @ A.T, scaling=s)
        >>> dA.shape, dB.shape
        (torch.Size([2, 6]), torch.Size([5, 2]))
    """
    check_shapes(A, B, grad_A, grad_B)
    A_r, B_t, gA_r, gB_t = row_factors(A, B, grad_A, grad_B)
    spectrum = gram_spectrum(A_r, B_t, damping)
    dA, dB_t = closed_form(spectrum, A_r, B_t, gA_r, gB_t, batch_scalar(scaling, A_r))
    return dA.to(A.dtype), dB_t.mT.to(B.dtype)


def equivalent_gradient(A: torch.Tensor, B: torch.Tensor, grad_A: torch.Tensor, grad_B: torch.Tensor,
                        scaling: Scaling, dense: bool = False, damping: float = 1e-8):
    """LoRA-Pro's equivalent gradient ``g~ = P_B g + (I - P_B) g P_A``, computed from the factors alone.

    Returns ``(U, V)`` with ``U @ V == g~`` (``U``: m x 2r, ``V``: 2r x n), or the dense m x n matrix
    when ``dense=True`` (meant for tests and small layers). Results are in the compute dtype (fp32, or
    fp64 for fp64 inputs); a leading batch dimension is supported as in :func:`lora_pro_gradients`.

    Example:
        >>> import torch
        >>> A, B, g = (torch.randn(2, 6, dtype=torch.float64), torch.randn(5, 2, dtype=torch.float64),
        ...            torch.randn(5, 6, dtype=torch.float64))
        >>> U, V = equivalent_gradient(A, B, 2.0 * B.T @ g, 2.0 * g @ A.T, scaling=2.0)
        >>> P_B = B @ torch.linalg.pinv(B)
        >>> P_A = torch.linalg.pinv(A) @ A
        >>> torch.allclose(U @ V, P_B @ g + (torch.eye(5, dtype=torch.float64) - P_B) @ g @ P_A)
        True
    """
    check_shapes(A, B, grad_A, grad_B)
    A_r, B_t, gA_r, gB_t = row_factors(A, B, grad_A, grad_B)
    spectrum = gram_spectrum(A_r, B_t, damping)
    U_t, V = equivalent_factors(spectrum, A_r, B_t, gA_r, gB_t, batch_scalar(scaling, A_r))
    return U_t.mT @ V if dense else (U_t.mT, V)
