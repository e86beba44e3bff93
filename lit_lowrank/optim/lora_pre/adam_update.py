"""One LoRA-Pre Adam step for one matrix (torch reference path).

This is the function a fused kernel replaces: it reads the parameter, its gradient and the four factors,
and updates the parameter and the factors in place (the math, our defaults and why: ``docs/lora-pre.md``):

    m_t = beta1 * (B A) + (1 - beta1) * g                     (B, A from step t-1)
    v_t = beta2 * (D_t V_B V_A)^2 + (1 - beta2) * g^2         D_t: the warm-up correction (1 without debiasing)
    m_hat = m_t / (1 - beta1^t),  v_hat = max(v_t / (1 - beta2^t), m_hat^2 / C)   (the bound; C = 1 by default)
    W  <- W - lr * ( scale * m_hat / (sqrt(v_hat) + eps) + weight_decay * W )
    B  <- (1 - gamma1) B + gamma1 * g A^T (A A^T)^-1          1 - gamma1 = sqrt(beta1)
    A  <- (1 - gamma1) A + gamma1 * (B^T B)^-1 B^T g          B: the new B ("alternating"), or the old one ("jacobi")
    V_B, V_A: the same with gamma2 (1 - gamma2 = beta2^(1/4)) and target |g|
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from lit_lowrank.kernels.dispatch import SelfCheck, UseTriton, fallback_warning, run_with_fallback, should_use_kernel
from lit_lowrank.optim.lora_pre.adam_scalars import (
    NO_FLOOR,
    adam_rates,
    adam_step_constants,
    adam_step_tensors,
    device_step_inputs,
)
from lit_lowrank.optim.lora_pre.factors import Workspace, damped_pinvs, gradient_or_zero, masked_copy_, row_chunks
from lit_lowrank.optim.sharding import RowShards

KERNEL = "lora_pre_adam"
"""The fused Triton step, ``lit_lowrank.kernels.lora_pre_adam`` (loaded by the dispatcher, never imported here)."""
KERNEL_PARAM_DTYPES = (torch.float32, torch.bfloat16, torch.float16)
"""Parameter and gradient dtypes the kernel takes (its factors and arithmetic are float32)."""
KERNEL_MAX_RANK = 128
"""Largest rank the kernel takes: it keeps rank-wide fp32 accumulators in registers, which spill heavily beyond."""
UPDATE_BOUNDS = ("v_floor", "adam_floor", "rms_clip", "none")
"""How the update is bounded: ``v_hat`` floored at ``m_hat^2`` (``|update| <= 1``, the default), floored at
``m_hat^2 / C_t`` (Adam's own worst case, ``|update| <= sqrt(C_t)``), the update's RMS over the matrix clipped at
1 (Adafactor), or not at all (the paper's formula: unsafe, see ``docs/lora-pre.md``)."""
KERNEL_UPDATE_BOUNDS = ("v_floor", "adam_floor", "none")
"""Bounds fused into the kernel's first pass; ``rms_clip`` needs the whole update's RMS first (torch path only)."""


def damped_pinv_pair(first: Tensor, second: Tensor, role: str, damping: float, workspace: Workspace,
                     shards: RowShards | None = None) -> Tensor:
    """Damped pseudo-inverses of two same-shape factors, stacked ``(2, *first.shape)`` in a ``workspace`` buffer."""
    out = workspace.get(role, (2, *first.shape), first.dtype, first.device)
    return damped_pinvs([first, second], damping, out, workspace, shards)


def lora_pre_adam_update_(
    param: Tensor,
    grad: Tensor,
    B: Tensor,
    A: Tensor,
    V_B: Tensor,
    V_A: Tensor,
    *,
    step: int | Tensor,
    lr: float,
    beta1: float,
    beta2: float,
    eps: float,
    weight_decay: float,
    scale: float,
    damping: float,
    factor_update: str,
    chunk_rows: int,
    workspace: Workspace,
    shards: RowShards | None = None,
    debias_second_moment: bool = True,
    update_bound: str = "v_floor",
    use_triton: UseTriton = False,
    grad_absmax: float | None = None,
    ok: Tensor | None = None,
) -> None:
    """Apply LoRA-Pre Adam step ``step`` (>= 1) to a ``p x q`` ``param`` and its factors, all in place.

    ``B, V_B`` are ``p x r`` and ``A, V_A`` are ``r x q``, in the factor dtype (float32, or float64 for float64
    parameters); ``param`` and ``grad`` may have any floating dtype (bf16 included). ``m_t`` and ``v_t`` are
    never stored: they are formed ``chunk_rows`` rows at a time in ``workspace`` buffers, used, and dropped.

    Two algebraic rewrites keep the element-wise work to a few passes and away from overflow:
    ``m_t = (1 - beta1) * (g + kappa * B A)`` with ``kappa = beta1 / (1 - beta1)`` (one ``addmm``), and
    ``sqrt(v_t) = sqrt(1 - beta2) * hypot(g, rho * V_B V_A)`` with ``rho = sqrt(beta2 / (1 - beta2))``, so
    neither ``g^2`` nor ``(V_B V_A)^2`` is formed (they overflow float32 for |g| > 1.8e19). The constant
    factors move into the step size and epsilon. Each factor update is one in-place ``addmm_`` with the other
    factor's damped pseudo-inverse from :func:`~lit_lowrank.optim.lora_pre.factors.damped_pinvs`, e.g.
    ``B <- (1 - gamma1) B + gamma1 g A_pinv^T`` with ``A_pinv^T = A^T (A A^T + lambda I)^-1``.

    ``debias_second_moment`` (default) rescales ``V_B V_A`` by ``sqrt(1 - beta2^(t-1)) / (1 - beta2^((t-1)/2))``
    before it is squared, so that ``v_t`` warms up like Adam's. ``update_bound`` (one of ``UPDATE_BOUNDS``): the
    floors cost one ``abs`` (or square) and one ``maximum`` per element (``m`` is formed pre-scaled by the floor
    factor, so the floor needs no multiply); ``"rms_clip"`` forms the update once more to measure its RMS first.
    ``grad_absmax`` (``max |g|``, which the optimizer knows from its finite check) lets the CPU path form ``hypot``
    and the floor from squares where they cannot overflow (:func:`_squares_are_safe`; docs/design.md).
    ``debias_second_moment=False, update_bound="none"`` is the paper's formula (unbounded: see ``docs/lora-pre.md``).

    Under FSDP2 (``shards`` given) every tensor here is this rank's row block, except ``A`` and ``V_A`` which
    are replicated: the left factors' Gram matrices and the ``r x q`` products ``B^+ g`` and ``V_B^+ |g|`` are
    summed over ranks (two all-reduces each of r x r and r x q numbers per matrix and step); nothing p x q moves.

    ``use_triton``: the fused kernel ``lit_lowrank.kernels.lora_pre_adam``, as in :mod:`lit_lowrank.kernels.dispatch`
    (default ``False``: this path). It takes float32, bfloat16 and float16 parameters with float32 factors (not
    float64), ranks up to ``KERNEL_MAX_RANK`` (128) and FSDP2 local blocks; anything else runs here.

    ``ok`` (a 0-d bool tensor) selects the device-side skip, which reads nothing on the host: ``step`` is then the
    step count as a 0-d tensor (already counting this step when ``ok`` holds; a count of 0 is read as 1), the
    step's scalars are computed from it on the device
    (:func:`~lit_lowrank.optim.lora_pre.adam_scalars.adam_step_tensors`; in-kernel on the kernel path),
    and where ``ok`` is False ``param`` and the factors stay bit for bit as they were, even if ``grad`` holds
    NaN: the kernel masks its stores of ``param``, and each factor update is a ``torch.where``. Off the kernel
    path this runs :func:`_masked_torch_step` (``grad_absmax`` unused), a few element-wise passes slower than the
    host path below; ``"rms_clip"`` then keeps its clip factor on the device too.

    Example:
        >>> from lit_lowrank.optim.lora_pre.factors import init_factor_pairs
        >>> W, g = torch.zeros(8, 6), torch.ones(8, 6)
        >>> (B, A), (V_B, V_A) = init_factor_pairs((8, 6), 2, 0, 2, torch.float32, W.device)
        >>> lora_pre_adam_update_(W, g, B, A, V_B, V_A, step=1, lr=0.1, beta1=0.9, beta2=0.999, eps=1e-8,
        ...     weight_decay=0.0, scale=1.0, damping=1e-6, factor_update="alternating", chunk_rows=4,
        ...     workspace=Workspace())
        >>> round(W[0, 0].item(), 4)  # Adam's first step is lr * sign(g)
        -0.1
    """
    hyper = dict(step=step, lr=lr, beta1=beta1, beta2=beta2, eps=eps, weight_decay=weight_decay, scale=scale,
                 damping=damping, factor_update=factor_update, workspace=workspace, shards=shards,
                 debias_second_moment=debias_second_moment, update_bound=update_bound, ok=ok)
    if _kernel_step(use_triton, param, grad, B, A, V_B, V_A, hyper, chunk_rows):
        return
    if ok is not None:
        _masked_torch_step(param, grad, B, A, V_B, V_A, **hyper, chunk_rows=chunk_rows)
        return
    p, q = param.shape
    dtype, device = B.dtype, B.device
    kappa, rho, step_size, eps_hat, gamma1, gamma2, floor = adam_step_constants(
        step=step, lr=lr, beta1=beta1, beta2=beta2, eps=eps, scale=scale, debias_second_moment=debias_second_moment,
        update_bound=update_bound)
    jacobi = factor_update == "jacobi"
    # With a floor, m is formed as floor * (g + kappa B A), so that the floor is a plain maximum with |m|.
    m_beta, m_alpha = (floor, floor * kappa) if floor else (1.0, kappa)
    if floor:
        step_size /= floor

    def pinvs(first: Tensor, second: Tensor, role: str, shards: RowShards | None = None) -> Tensor:
        return damped_pinv_pair(first, second, role, damping, workspace, shards)

    # Pseudo-inverses of the old right factors (for B, V_B) and, for Jacobi, of the old left factors too.
    A_pinv, V_A_pinv = pinvs(A, V_A, "right_pinv")
    if jacobi:
        B_pinv, V_B_pinv = pinvs(B.T, V_B.T, "left_pinv", shards)

    # Pass 1, a chunk of rows at a time: the parameter update, then the left factors (rows are independent).
    m_buffer = workspace.get("m", (chunk_rows, q), dtype, device)
    root_v_buffer = workspace.get("root_v", (chunk_rows, q), dtype, device)
    abs_grad_buffer = workspace.get("abs_grad", (chunk_rows, q), dtype, device)
    floor_buffer = workspace.get("abs_m", (chunk_rows, q), dtype, device) if floor else None
    grad_buffer = workspace.get("grad", (chunk_rows, q), dtype, device) if grad.dtype != dtype else None
    chunks = list(row_chunks(p, chunk_rows))
    if update_bound == "rms_clip":  # a first look at the whole update: the step that keeps its RMS at most 1
        step_size *= _rms_clip_factor(grad, B, A, V_B, V_A, kappa, rho, eps_hat,
                                      step_size / (lr * scale) if lr else 0.0, chunks, shards)
    squares = _squares_are_safe(grad, B, A, V_B, V_A, kappa, rho, floor, grad_absmax)
    for rows in chunks:
        n = rows.stop - rows.start
        g = grad[rows] if grad_buffer is None else grad_buffer[:n].copy_(grad[rows])
        m = torch.addmm(g, B[rows], A, beta=m_beta, alpha=m_alpha, out=m_buffer[:n])  # m_t / (1 - beta1), scaled
        root_v = torch.addmm(root_v_buffer[:n], V_B[rows], V_A, beta=0.0, alpha=rho, out=root_v_buffer[:n])
        abs_g = torch.abs(g, out=abs_grad_buffer[:n])
        if squares:  # the same, from squares: cheaper than torch.hypot's one slow pass on CPU
            torch.mul(root_v, root_v, out=root_v).addcmul_(g, g)
            if floor:
                torch.maximum(root_v, torch.mul(m, m, out=floor_buffer[:n]), out=root_v)
            root_v.sqrt_()
        else:
            torch.hypot(root_v, abs_g, out=root_v)  # sqrt(v_t / (1 - beta2^t)) / c
            if floor:
                torch.maximum(root_v, torch.abs(m, out=floor_buffer[:n]), out=root_v)
        root_v.add_(eps_hat)
        if weight_decay != 0.0:
            param[rows].mul_(1.0 - lr * weight_decay)
        param[rows].addcdiv_(m, root_v, value=-step_size)
        B[rows].addmm_(g, A_pinv.T, beta=1.0 - gamma1, alpha=gamma1)
        V_B[rows].addmm_(abs_g, V_A_pinv.T, beta=1.0 - gamma2, alpha=gamma2)

    # Pass 2: the right factors, from the new left factors (alternating least squares) or the old ones (Jacobi).
    # It visits the chunks backwards: the last chunk of pass 1 is still in the buffers, so its g and |g| (for a
    # matrix done in one chunk, all of them) are reused rather than recomputed.
    if not jacobi:
        B_pinv, V_B_pinv = pinvs(B.T, V_B.T, "left_pinv", shards)
    # Sharded, each rank sums only its rows: accumulate into a buffer, add the other ranks' sums, then update.
    targets = (A, V_A) if shards is None else workspace.get("right_sums", (2, *A.shape), dtype, device).unbind()
    for index, rows in enumerate(reversed(chunks)):
        n = rows.stop - rows.start
        if index == 0:
            g, abs_g = (grad[rows] if grad_buffer is None else grad_buffer[:n]), abs_grad_buffer[:n]
        else:
            g = grad[rows] if grad_buffer is None else grad_buffer[:n].copy_(grad[rows])
            abs_g = torch.abs(g, out=abs_grad_buffer[:n])
        first = index == 0
        keep1, keep2 = (1.0 - gamma1, 1.0 - gamma2) if shards is None else (0.0, 0.0)
        targets[0].addmm_(B_pinv[:, rows], g, beta=keep1 if first else 1.0, alpha=gamma1)
        targets[1].addmm_(V_B_pinv[:, rows], abs_g, beta=keep2 if first else 1.0, alpha=gamma2)
    if shards is not None:
        shards.sum_(workspace.get("right_sums", (2, *A.shape), dtype, device))
        A.mul_(1.0 - gamma1).add_(targets[0])
        V_A.mul_(1.0 - gamma2).add_(targets[1])


def _masked_torch_step(param: Tensor, grad: Tensor, B: Tensor, A: Tensor, V_B: Tensor, V_A: Tensor, *, step: Tensor,
                       ok: Tensor, lr: float, beta1: float, beta2: float, eps: float, weight_decay: float, scale: float,
                       damping: float, factor_update: str, chunk_rows: int, workspace: Workspace,
                       shards: RowShards | None, debias_second_moment: bool, update_bound: str) -> None:
    """The torch path of a device-side skip: the same step as the host path, with nothing read on the host.

    The step's scalars are 0-d tensors from the step count (:func:`adam_step_tensors`), so they cannot fold into
    ``addmm``'s ``alpha`` nor ``m``'s pre-scaling as on the host: ``rho`` and the floor cost a multiply pass each.
    A skipped matrix (``ok`` False) is computed with a zero gradient, so that nothing turns NaN on the way, and
    every write is a :func:`~lit_lowrank.optim.lora_pre.factors.masked_copy_` that keeps the old values.
    """
    p, q = param.shape
    dtype, device = B.dtype, B.device
    inputs = device_step_inputs(lr=lr, beta1=beta1, beta2=beta2, eps=eps, scale=scale,
                                debias_second_moment=debias_second_moment, update_bound=update_bound)
    kappa, gamma1, gamma2 = adam_rates(beta1, beta2)
    rho, step_size, eps_hat, floor = (value.to(dtype) for value in adam_step_tensors(step, inputs))
    jacobi = factor_update == "jacobi"
    A_pinv, V_A_pinv = damped_pinv_pair(A, V_A, "right_pinv", damping, workspace)
    if jacobi:
        B_pinv, V_B_pinv = damped_pinv_pair(B.T, V_B.T, "left_pinv", damping, workspace, shards)
    chunks = list(row_chunks(p, chunk_rows))
    grad_buffer = workspace.get("grad", (chunk_rows, q), dtype, device)

    def finite_rows(rows: slice) -> Tensor:
        return gradient_or_zero(grad[rows], ok, grad_buffer[: rows.stop - rows.start])

    if update_bound == "rms_clip":  # a NaN here only reaches the update, which ok then discards
        m_hat_per_m = step_size / (lr * scale) if lr else torch.zeros_like(step_size)
        step_size = step_size * _rms_clip_factor(grad, B, A, V_B, V_A, kappa, rho, eps_hat, m_hat_per_m, chunks, shards)

    m_buffer = workspace.get("m", (chunk_rows, q), dtype, device)
    root_v_buffer = workspace.get("root_v", (chunk_rows, q), dtype, device)
    abs_grad_buffer = workspace.get("abs_grad", (chunk_rows, q), dtype, device)
    for rows in chunks:
        n = rows.stop - rows.start
        g = finite_rows(rows)
        m = torch.addmm(g, B[rows], A, alpha=kappa, out=m_buffer[:n])  # m_t / (1 - beta1)
        root_v = torch.mm(V_B[rows], V_A, out=root_v_buffer[:n]).mul_(rho)
        abs_g = torch.abs(g, out=abs_grad_buffer[:n])
        torch.hypot(root_v, abs_g, out=root_v)  # sqrt(v_t / (1 - beta2^t)) / c
        if inputs.bound != NO_FLOOR:
            torch.maximum(root_v, torch.abs(m).mul_(floor), out=root_v)
        update = m.div_(root_v.add_(eps_hat)).mul_(-step_size)
        decayed = param[rows] * (1.0 - lr * weight_decay) if weight_decay != 0.0 else param[rows]
        masked_copy_(param[rows], torch.add(decayed, update), ok)
        masked_copy_(B[rows], torch.addmm(B[rows], g, A_pinv.T, beta=1.0 - gamma1, alpha=gamma1), ok)
        masked_copy_(V_B[rows], torch.addmm(V_B[rows], abs_g, V_A_pinv.T, beta=1.0 - gamma2, alpha=gamma2), ok)

    # The right factors from the new left factors (or the old ones: Jacobi), summed over chunks (and ranks).
    if not jacobi:
        B_pinv, V_B_pinv = damped_pinv_pair(B.T, V_B.T, "left_pinv", damping, workspace, shards)
    sums = workspace.get("right_sums", (2, *A.shape), dtype, device)
    for index, rows in enumerate(chunks):
        g = finite_rows(rows)
        keep = 0.0 if index == 0 else 1.0  # beta = 0 ignores the buffer's stale values
        sums[0].addmm_(B_pinv[:, rows], g, beta=keep, alpha=gamma1)
        sums[1].addmm_(V_B_pinv[:, rows], torch.abs(g), beta=keep, alpha=gamma2)
    if shards is not None:
        shards.sum_(sums)
    masked_copy_(A, torch.mul(A, 1.0 - gamma1).add_(sums[0]), ok)
    masked_copy_(V_A, torch.mul(V_A, 1.0 - gamma2).add_(sums[1]), ok)


def _kernel_step(use_triton: UseTriton, param: Tensor, grad: Tensor, B: Tensor, A: Tensor, V_B: Tensor, V_A: Tensor,
                 hyper: dict, chunk_rows: int) -> bool:
    """Run the step as the fused kernel if ``use_triton`` asks for it and it can run; False: run the torch path.

    The kernel's first launch in a process (which compiles, and may fail on a broken toolchain) is made undoable:
    its first pass writes ``param`` before its second pass compiles, so the dispatcher restores the tensors the
    step updates before falling back. Its first call per shape and options is also run by the torch path (with
    ``chunk_rows`` and a scratch workspace) on copies and compared (``kernels/dispatch.py``: self-check).
    """
    if hyper["update_bound"] not in KERNEL_UPDATE_BOUNDS:
        if use_triton is True:
            fallback_warning(KERNEL, "update_bound", f"it fuses the bounds {KERNEL_UPDATE_BOUNDS}, "
                             f"not {hyper['update_bound']!r}, which needs the whole update's RMS first")
        return False
    if not should_use_kernel(use_triton, param, grad, kernel=KERNEL, dtypes=KERNEL_PARAM_DTYPES):
        return False
    if not should_use_kernel(use_triton, B, A, V_B, V_A, kernel=KERNEL, dtypes=(torch.float32,)):
        return False
    if A.shape[0] > KERNEL_MAX_RANK:
        if use_triton is True:
            fallback_warning(KERNEL, "rank", f"it takes ranks up to {KERNEL_MAX_RANK}, got {A.shape[0]}")
        return False

    def launch(kernel) -> bool:
        kernel.lora_pre_adam_update_(param, grad, B, A, V_B, V_A, **hyper)
        return True

    def reference(copies: list) -> bool:  # a scratch workspace: the torch path's row buffers are not kept
        W, B_, A_, V_B_, V_A_ = copies
        lora_pre_adam_update_(W, grad, B_, A_, V_B_, V_A_, **{**hyper, "workspace": Workspace()}, chunk_rows=chunk_rows,
                              use_triton=False)
        return True

    # FSDP2: the whole parameter's shape is in the key too, so every rank checks (and runs the reference's
    # collectives) at the same calls, whatever its row block.
    whole = getattr(getattr(hyper["shards"], "param", None), "shape", None)
    key = (f"W {tuple(param.shape)} {param.dtype} strides {param.stride()}",
           f"grad {grad.dtype} strides {grad.stride()}", f"r {A.shape[0]}", hyper["factor_update"],
           f"weight_decay {hyper['weight_decay'] != 0.0}", f"bound {hyper['update_bound'] != 'none'}",
           f"sharded {tuple(whole) if whole is not None else hyper['shards'] is not None}",
           f"device-side skip {hyper['ok'] is not None}")
    check = SelfCheck(key=key, state=[param, B, A, V_B, V_A], reference=reference, names=["W", "B", "A", "V_B", "V_A"])
    return run_with_fallback(KERNEL, launch, undo=(param, B, A, V_B, V_A), check=check) is not None


SQUARES_LIMIT = 2.0**62
"""Inputs below this in magnitude cannot overflow ``x^2 + y^2`` in float32 (largest finite value ~2^128)."""


def _squares_are_safe(grad: Tensor, B: Tensor, A: Tensor, V_B: Tensor, V_A: Tensor, kappa: float, rho: float,
                      floor: float, grad_absmax: float | None) -> bool:
    """Whether ``x^2 + g^2`` and ``(floor m)^2`` may be formed (``x = rho V_B V_A``, ``m = g + kappa B A``): on CPU
    only (why: docs/design.md), and only when every operand is known to be below ``SQUARES_LIMIT``.
    ``|(B A)_ij| <= |B|_F |A|_F`` (Cauchy-Schwarz; loose, but the limit is ~1e18): four
    contiguous reductions of ``O((p + q) r)`` and one host read, which costs nothing on a CPU. Squares that
    underflow are harmless: ``eps`` dominates there.
    """
    if grad_absmax is None or grad.device.type != "cpu" or not grad_absmax < SQUARES_LIMIT:
        return False
    norms = torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(t) for t in (B, A, V_B, V_A)]), ord=1)
    # |B|_F |A|_F and rho |V_B|_F |V_A|_F are both below (1 + kappa + rho) * (sum of the four norms)^2 / 4
    operand_bound = max(floor, 1.0) * (grad_absmax + (1.0 + kappa + rho) * float(norms) ** 2 / 4)
    return operand_bound < SQUARES_LIMIT


def _rms_clip_factor(grad: Tensor, B: Tensor, A: Tensor, V_B: Tensor, V_A: Tensor, kappa: float,
                     rho: float | Tensor, eps_hat: float | Tensor, m_hat_per_m: float | Tensor, chunks: list,
                     shards: RowShards | None) -> float | Tensor:
    """``min(1, 1 / RMS(u))`` for the Adam-form update ``u = m_hat / (sqrt(v_hat) + eps)`` of the whole matrix
    (all ranks' rows under FSDP2), ``u = m_hat_per_m * (g + kappa B A) / (hypot(...) + eps_hat)``.

    Adafactor's update clipping with threshold 1. With float scalars (the host path) it reads the sum of squares
    on the host: the option is a candidate measured in the benchmarks, not the default, and the fused kernel does
    not implement it. With tensor scalars (a device-side skip) the factor stays a 0-d tensor on the device.
    """
    total = torch.zeros((), dtype=torch.float64, device=B.device)
    for rows in chunks:
        g = grad[rows].to(B.dtype)
        m = torch.addmm(g, B[rows], A, alpha=kappa)
        root_v = torch.hypot(torch.mm(V_B[rows], V_A).mul_(rho), g).add_(eps_hat)
        total += m.div_(root_v).square().sum(dtype=torch.float64)
    if shards is not None:
        shards.sum_(total)
    elements = grad.shape[1] * (shards.param.shape[0] if shards is not None else grad.shape[0])
    if isinstance(m_hat_per_m, Tensor):
        return (m_hat_per_m * torch.sqrt(total / elements)).clamp_min(1.0).reciprocal().to(B.dtype)
    rms = m_hat_per_m * math.sqrt(float(total) / elements)
    return 1.0 / max(1.0, rms)
