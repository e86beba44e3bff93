"""AdamW for lists of tensors, shared by every optimizer of this package (one implementation, two step forms).

- :func:`adamw_foreach_update_`: Python int step counts (the host path); the operations and their order are those
  of ``torch.optim.AdamW(foreach=True)``, so results agree bitwise.
- :func:`adamw_masked_update_`: 0-d step-count tensors and per-tensor finite flags on the device (LoRAPro, and the
  LoRA-Pre optimizers on accelerators): a skipped tensor and its state stay bit for bit, nothing is read on the host.
"""
from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch import Tensor

Number = float | Tensor


def adamw_foreach_update_(
    params: list[Tensor],
    grads: list[Tensor],
    exp_avgs: list[Tensor],
    exp_avg_sqs: list[Tensor],
    steps: list[int],
    *,
    lr: float,
    beta1: float,
    beta2: float,
    eps: float,
    weight_decay: float,
) -> None:
    """Decoupled-weight-decay Adam on a list of same-device, same-dtype tensors, in place.

    The operations and their order are those of ``torch.optim.AdamW(foreach=True)`` so results agree bitwise;
    ``steps`` are the already incremented Python step counters (one per tensor).
    """
    if weight_decay != 0.0:
        torch._foreach_mul_(params, 1.0 - lr * weight_decay)
    torch._foreach_lerp_(exp_avgs, grads, 1.0 - beta1)
    torch._foreach_mul_(exp_avg_sqs, beta2)
    torch._foreach_addcmul_(exp_avg_sqs, grads, grads, 1.0 - beta2)
    step_sizes = [(lr / (1.0 - beta1**step)) * -1 for step in steps]
    bias_correction2_sqrts = [(1.0 - beta2**step) ** 0.5 for step in steps]
    denominators = torch._foreach_sqrt(exp_avg_sqs)
    torch._foreach_div_(denominators, bias_correction2_sqrts)
    torch._foreach_add_(denominators, eps)
    torch._foreach_addcdiv_(params, exp_avgs, denominators, step_sizes)


def bias_corrections(step: Tensor, beta1: float, beta2: float, dtype: torch.dtype) -> tuple[Tensor, Tensor]:
    """Adam's ``1 - beta1^t`` and ``sqrt(1 - beta2^t)`` for step tensors, ``t`` counted from 1.

    Computed as ``-expm1(t * log(beta))`` from the python float ``log(beta)``: rounding ``beta2 = 0.999``
    to fp32 first would put a 1e-4 relative error into ``1 - beta2``. A tensor that never stepped is
    clamped to t = 1 so its (unused, masked) update stays finite.
    """
    taken = step.to(dtype).clamp_min(1)
    return one_minus_power(beta1, taken), one_minus_power(beta2, taken).sqrt()


def one_minus_power(beta: float, steps: Tensor) -> Tensor:
    """``1 - beta^t`` for step counts ``t >= 1`` (a float tensor), on their device (``beta = 0`` gives 1)."""
    if beta == 0.0:
        return torch.ones_like(steps)
    return -torch.expm1(steps * math.log(beta))


def per_entry(ok: Tensor, value: float, skipped: float, like: Tensor) -> Tensor:
    """``value`` where ``ok``, else ``skipped``, filled on the device (no host-to-device copy)."""
    return torch.full_like(like, value).masked_fill_(~ok, skipped)


def adamw_masked_update_(
    params: Sequence[Tensor],
    grads: Sequence[Tensor],
    states: Sequence[dict],
    ok: Tensor,
    *,
    lr: Number,
    beta1: float,
    beta2: float,
    eps: float,
    weight_decay: float,
) -> None:
    """AdamW (``torch.optim.AdamW``'s formula) on a list of tensors, in place; skips tensors where ``ok`` is False.

    All tensors share one device and one state dtype; ``states`` hold ``step`` (0-d float32, counted up by ``ok``),
    ``exp_avg`` and ``exp_avg_sq`` in that dtype (fp32 for bf16/fp16 parameters). ``ok`` is a 1-D bool tensor, one
    flag per tensor. ``grads`` must be zero where ``ok`` is False (callers zero non-finite ones). A skipped tensor
    then sees a zero gradient with ``beta = 1`` and a zero step size, so its moments and parameter stay bit-for-bit:
    the update is ``0 * finite`` because the denominator is at least ``eps`` (raised to the dtype's ``tiny`` if 0,
    so no ``0/0``). Per-tensor coefficients are 0-d tensors, so nothing waits on the device; ``_foreach`` ops keep
    the Python overhead per list, not per tensor.
    """
    exp_avgs, exp_avg_sqs = [s["exp_avg"] for s in states], [s["exp_avg_sq"] for s in states]
    work = exp_avgs[0].dtype
    live = ok.to(work)
    step = torch.stack([s["step"] for s in states]) + ok.to(torch.float32)
    torch._foreach_copy_([s["step"] for s in states], list(step.unbind()))
    bc1, bc2_sqrt = bias_corrections(step, beta1, beta2, work)
    grads = [g.to(work) for g in grads]
    torch._foreach_lerp_(exp_avgs, grads, list(per_entry(ok, 1 - beta1, 0.0, live).unbind()))
    torch._foreach_mul_(exp_avg_sqs, list(per_entry(ok, beta2, 1.0, live).unbind()))
    torch._foreach_addcmul_(exp_avg_sqs, grads, grads, value=1 - beta2)
    denoms = torch._foreach_sqrt(exp_avg_sqs)
    torch._foreach_div_(denoms, list(bc2_sqrt.unbind()))
    torch._foreach_add_(denoms, max(eps, torch.finfo(work).tiny))
    updates = torch._foreach_div(exp_avgs, denoms)
    torch._foreach_mul_(updates, list((lr * live / bc1).unbind()))
    in_place = all(p.dtype == work for p in params)
    values = [p.detach() if in_place else p.detach().to(work) for p in params]  # half precision via fp32
    if weight_decay:
        torch._foreach_mul_(values, list((1 - lr * weight_decay * live).unbind()))
    torch._foreach_sub_(values, updates)
    if not in_place:
        torch._foreach_copy_(list(params), values)
