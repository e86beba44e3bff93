"""Full mode of :class:`~lit_lowrank.optim.LoRAPro` for a layer stack (its AdamW: :mod:`lit_lowrank.optim.adamw`).

Like :func:`~lit_lowrank.optim.adamw.adamw_masked_update_` it takes an ``ok`` mask (finite gradients) and leaves
parameters *and* state bit-for-bit unchanged where it is False, with per-entry coefficients and ``torch.where`` on
the device: no host sync, no NaN parameters.
In :func:`full_mode_update` the m x n part (moments and projections, :func:`torch_moments_and_projections`)
can run as the fused Triton kernel ``lit_lowrank.kernels.lora_pro_full`` (``use_triton``); the r x r solves
stay in torch.
"""
from __future__ import annotations

from collections.abc import Sequence

import torch

from lit_lowrank.kernels.dispatch import SelfCheck, UseTriton, run_with_fallback, should_use_kernel
from lit_lowrank.optim.adamw import Number, bias_corrections, per_entry
from lit_lowrank.optim.lora_pro.closed_form import GramSpectrum, closed_form, gram_spectrum
from lit_lowrank.optim.sharding import RowShards

KERNEL = "lora_pro_full"
"""The fused Triton step, ``lit_lowrank.kernels.lora_pro_full`` (loaded by the dispatcher, never imported here)."""


def full_mode_update(
    A: torch.Tensor,
    B_t: torch.Tensor,
    U_t: torch.Tensor,
    V: torch.Tensor,
    exp_avg: Sequence[torch.Tensor],
    exp_avg_sq: Sequence[torch.Tensor],
    step: torch.Tensor,
    ok: torch.Tensor,
    *,
    scaling: float,
    lr: Number,
    beta1: float,
    beta2: float,
    eps: float,
    weight_decay: float,
    damping: float,
    spectrum: GramSpectrum | None = None,
    use_triton: UseTriton = False,
    shards: RowShards | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """One full-mode LoRA-Pro step for a stack of L layers of one shape (the unit a fused kernel replaces).

    Adam moments live in weight space: they track ``g~ = U_t^T @ V`` (m x n per layer). The Adam direction
    ``G = m_hat / (sqrt(v_hat) + eps)`` is projected back onto the adapter with the LoRA-Pro closed form
    (``s B^T G`` and ``s G A^T`` in place of ``g_A`` and ``g_B``), then ``A -= lr * dA``, ``B -= lr * dB``.
    Decoupled weight decay acts on ``W = W0 + s B A`` through the factors: both are scaled by
    ``sqrt(1 - lr * weight_decay)`` so ``s B A`` shrinks by ``1 - lr * weight_decay``; ``W0`` stays frozen.

    Args:
        A, B_t: (L, r, n) and (L, r, m): ``lora_A`` and ``lora_B`` transposed, in the compute dtype.
        U_t, V: (L, 2r, m) and (L, 2r, n) with ``U_t^T @ V = g~`` (may be non-finite where ``ok`` is False).
        exp_avg, exp_avg_sq: L tensors (m x n, compute dtype), updated in place; unchanged where not ok.
            ``eps`` is raised to the dtype's ``tiny`` if 0, so an all-zero moment gives 0, not ``0/0``.
        step: (L,) float steps taken so far; ok: (L,) bool, False for layers with non-finite gradients.
        spectrum: :func:`gram_spectrum` of (A, B_t) when the caller already has it.
        use_triton: the fused kernel ``lit_lowrank.kernels.lora_pro_full``, as defined in
            :mod:`lit_lowrank.kernels.dispatch` (default ``False``: this torch path). It takes fp32 only; fp64 runs
            here.
        shards: under FSDP2, how ``lora_B`` (and the weight) is split by rows. The moments are then this
            rank's rows (``m_local x n``) and ``B_t``, ``U_t`` still the whole layer's: the moments and the
            row-local ``G A^T`` use their matching columns, and the row sums ``B^T G`` and ``B^T (G A^T)`` are
            added up over ranks in one all-reduce of ``L x r x (n + r)`` numbers.

    Returns:
        New ``A`` and ``B_t`` (compute dtype; the old values where not ok) and the new step counts; with
        ``shards``, ``B_t`` holds this rank's columns only.

    The torch path materialises ``g~`` and ``G`` one layer at a time (m x n); the kernel updates the
    moments tile by tile from ``U_t`` and ``V`` and accumulates the projections without them.
    """
    if spectrum is None:
        spectrum = gram_spectrum(A, B_t, damping)
    if shards is not None:  # the Grams above need all of B; the m x n part only this rank's rows
        B_t, U_t = shards.columns_of(B_t), shards.columns_of(U_t)
    step = step + ok.to(step.dtype)
    bc1, bc2_sqrt = bias_corrections(step, beta1, beta2, A.dtype)
    moments = (A, B_t, U_t, V, exp_avg, exp_avg_sq, ok, bc1, bc2_sqrt)
    hyper = dict(beta1=beta1, beta2=beta2, eps=max(eps, torch.finfo(A.dtype).tiny))
    projections = _kernel_projections(use_triton, moments, hyper)
    if projections is None:
        projections = torch_moments_and_projections(*moments, **hyper)
    proj_A, proj_B_t = projections
    grad_A, grad_B_t = proj_A * scaling, proj_B_t * scaling
    b_grad_b = None
    if shards is not None:  # this rank's rows hold only a part of the sums over rows
        grad_A, b_grad_b = shards.sum_parts_(grad_A, B_t @ grad_B_t.mT)
    dA, dB_t = closed_form(spectrum, A, B_t, grad_A, grad_B_t, scaling, b_grad_b=b_grad_b)
    decay = (1 - lr * weight_decay) ** 0.5
    keep = ok.view(-1, 1, 1)
    return torch.where(keep, A * decay - lr * dA, A), torch.where(keep, B_t * decay - lr * dB_t, B_t), step


def _kernel_projections(use_triton: UseTriton, moments: tuple, hyper: dict) -> tuple[torch.Tensor, torch.Tensor] | None:
    """The moments' update and the projections as the fused kernel if ``use_triton`` asks for it and it can run;
    None: run the torch path. Its first call per shape is also run by :func:`torch_moments_and_projections` on copies
    of the moments and compared (``kernels/dispatch.py``: self-check).
    """
    A, B_t, U_t, V, exp_avg, exp_avg_sq = moments[:6]
    if not should_use_kernel(use_triton, A, B_t, U_t, V, *exp_avg, *exp_avg_sq, kernel=KERNEL):
        return None
    L = len(exp_avg)

    def launch(kernel) -> tuple[torch.Tensor, torch.Tensor]:
        return kernel.moments_and_projections(*moments, **hyper)

    def reference(copies: list) -> tuple[torch.Tensor, torch.Tensor]:
        return torch_moments_and_projections(A, B_t, U_t, V, copies[:L], copies[L:], *moments[6:], **hyper)

    key = (f"A {tuple(A.shape)}", f"B_t {tuple(B_t.shape)}",
           f"moment strides {sorted({t.stride() for t in (*exp_avg, *exp_avg_sq)})}")
    check = SelfCheck(key=key, state=[*exp_avg, *exp_avg_sq], reference=reference,
                      names=[*(f"exp_avg[{i}]" for i in range(L)), *(f"exp_avg_sq[{i}]" for i in range(L)),
                             "B^T G", "A G^T"])
    return run_with_fallback(KERNEL, launch, check=check)


def torch_moments_and_projections(
    A: torch.Tensor,
    B_t: torch.Tensor,
    U_t: torch.Tensor,
    V: torch.Tensor,
    exp_avg: Sequence[torch.Tensor],
    exp_avg_sq: Sequence[torch.Tensor],
    ok: torch.Tensor,
    bc1: torch.Tensor,
    bc2_sqrt: torch.Tensor,
    *,
    beta1: float,
    beta2: float,
    eps: float,
) -> tuple[torch.Tensor, torch.Tensor]:
    """The m x n part of :func:`full_mode_update` (the reference of the fused kernel), one layer at a time.

    Updates the moments with ``g~ = U_t^T V`` in place (unchanged where not ``ok``), forms the Adam
    direction ``G = (m / (sqrt(v) / bc2_sqrt + eps)) / bc1`` and returns ``(B^T G, (G A^T)^T)``, each
    (L, r, k). ``bc1``, ``bc2_sqrt``: (L,) bias corrections of the new step counts; ``eps`` > 0.
    """
    # As in adamw_masked_update_: a skipped layer sees g~ = 0 with beta = 1, so its moments stay bit-for-bit.
    skipped = ~ok.view(-1, 1, 1)
    U_t, V = U_t.masked_fill(skipped, 0), V.masked_fill(skipped, 0)
    weight1, decay2 = per_entry(ok, 1 - beta1, 0.0, bc1), per_entry(ok, beta2, 1.0, bc1)
    proj_A = torch.empty_like(A)
    proj_B_t = torch.empty_like(B_t)
    for i, (avg, avg_sq) in enumerate(zip(exp_avg, exp_avg_sq)):
        g = U_t[i].mT @ V[i]
        avg.lerp_(g, weight1[i])
        avg_sq.mul_(decay2[i]).addcmul_(g, g, value=1 - beta2)
        direction = avg_sq.sqrt().div_(bc2_sqrt[i]).add_(eps)
        torch.div(avg, direction, out=direction).div_(bc1[i])  # G = m_hat / (sqrt(v_hat) + eps)
        proj_A[i] = B_t[i] @ direction  # B^T G
        proj_B_t[i] = A[i] @ direction.mT  # (G A^T)^T
    return proj_A, proj_B_t
