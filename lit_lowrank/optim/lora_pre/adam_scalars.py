"""The scalars of one LoRA-Pre Adam step, after the rewrites described in
:func:`~lit_lowrank.optim.lora_pre.adam_update.lora_pre_adam_update_`: from Python numbers on the host
(:func:`adam_step_constants`), or from a step count held in a device tensor (:func:`adam_step_tensors`, which the
fused kernel computes line by line in-kernel). ``C_t``, Adam's own worst case: :func:`adam_worst_case`."""
from __future__ import annotations

import math
from typing import NamedTuple

import torch
from torch import Tensor


class AdamStepConstants(NamedTuple):
    """Host scalars of one LoRA-Pre Adam step, shared by the torch path and the fused kernel."""

    kappa: float  # m_t / (1 - beta1) = g + kappa * B A
    rho: float  # sqrt(v_t) / sqrt(1 - beta2) = hypot(|g|, rho * V_B V_A)
    step_size: float  # W -= step_size * (g + kappa B A) / (max(hypot(...), floor * |g + kappa B A|) + eps_hat)
    eps_hat: float
    gamma1: float  # factor update rates: 1 - gamma1 = sqrt(beta1), 1 - gamma2 = beta2^(1/4)
    gamma2: float
    floor: float  # 0: no floor; else sqrt(v_hat) >= |m_hat| / sqrt(C) reads hypot(...) >= floor * |g + kappa B A|


def adam_worst_case(step: int, beta1: float, beta2: float) -> float:
    """``C_t = sum_i w_i^2 / u_i``: Adam's bound ``m_hat^2 <= C_t v_hat`` (Cauchy-Schwarz over the EMA weights).

    ``w_i = (1 - beta1) beta1^(t-i) / (1 - beta1^t)`` and ``u_i`` likewise with ``beta2``; 1 at step 1, tending to
    ``(1 - beta1)^2 / ((1 - beta2)(1 - beta1^2 / beta2))`` (about 53 for (0.9, 0.999)).

    Example:
        >>> round(adam_worst_case(1, 0.9, 0.999), 6), round(adam_worst_case(10**6, 0.9, 0.999), 1)
        (1.0, 52.9)
    """
    ratio = beta1 * beta1 / beta2
    geometric = float(step) if ratio == 1.0 else (1.0 - ratio**step) / (1.0 - ratio)
    return (1.0 - beta1) ** 2 * (1.0 - beta2**step) / ((1.0 - beta1**step) ** 2 * (1.0 - beta2)) * geometric


def adam_rates(beta1: float, beta2: float) -> tuple[float, float, float]:
    """The step-independent constants ``(kappa, gamma1, gamma2)``: ``m_t / (1 - beta1) = g + kappa B A``, and the
    factor update rates ``1 - gamma1 = sqrt(beta1)``, ``1 - gamma2 = beta2^(1/4)``."""
    return beta1 / (1.0 - beta1), 1.0 - math.sqrt(beta1), 1.0 - beta2**0.25


def adam_step_constants(*, step: int, lr: float, beta1: float, beta2: float, eps: float, scale: float,
                        debias_second_moment: bool = True, update_bound: str = "v_floor") -> AdamStepConstants:
    """The constants of step ``step`` (>= 1) after the rewrites described in :func:`lora_pre_adam_update_`."""
    kappa, gamma1, gamma2 = adam_rates(beta1, beta2)
    rho = math.sqrt(beta2 / (1.0 - beta2))
    if debias_second_moment and step > 1:
        # V_B V_A follows the EMA of |g| at rate sqrt(beta2), whose square warms up like (1 - beta2^((t-1)/2))^2,
        # far below Adam's v_{t-1} ~ (1 - beta2^(t-1)); rescale it to Adam's scale (exact for a steady gradient).
        rho *= math.sqrt(1.0 - beta2 ** (step - 1)) / (1.0 - beta2 ** ((step - 1) / 2))
    c = math.sqrt(1.0 - beta2) / math.sqrt(1.0 - beta2**step)  # sqrt(v_t / (1 - beta2^t)) = c * hypot(...)
    m_hat_per_m = (1.0 - beta1) / ((1.0 - beta1**step) * c)  # m_hat / (c (g + kappa B A))
    floor = 0.0
    if update_bound == "v_floor":
        floor = m_hat_per_m
    elif update_bound == "adam_floor":
        floor = m_hat_per_m / math.sqrt(adam_worst_case(step, beta1, beta2))
    return AdamStepConstants(kappa, rho, lr * scale * m_hat_per_m, eps / c, gamma1, gamma2, floor)


def residual_weight(step: int | Tensor, beta1: float) -> float | Tensor:
    """``a_t = (1 - beta1^t) / (1 - beta1)``: with the residual step, ``m_t / (1 - beta1) = a_t g + (kappa B - (a_t -
    1) g A_pinv^T) A``, so that the part of ``g`` outside the rows of ``A`` has weight 1 in ``m_hat``. 1 at step 1
    (and for ``beta1 = 0``), tending to ``1 / (1 - beta1)``. A host float for a Python step, else a float64 tensor
    of the counts' shape (clamped at 1, like :func:`adam_step_tensors`).

    Example:
        >>> residual_weight(1, 0.9), round(residual_weight(2, 0.9), 9), round(float(residual_weight(torch.tensor(2.0),
        ...                                                                                         0.9)), 9)
        (1.0, 1.9, 1.9)
    """
    if not isinstance(step, Tensor):
        return 1.0 if beta1 == 0.0 else (1.0 - beta1**step) / (1.0 - beta1)
    if beta1 == 0.0:
        return torch.ones_like(step, dtype=torch.float64)
    t = step.to(torch.float64).clamp_min(1.0)
    return (1.0 - torch.exp(t * math.log(beta1))) / (1.0 - beta1)


NO_FLOOR, V_FLOOR, ADAM_FLOOR, ADAM_FLOOR_RATIO_ONE = 0, 1, 2, 3
"""Codes of the floor in :class:`DeviceStepInputs` (and the kernel's ``BOUND``); ``ADAM_FLOOR_RATIO_ONE`` is
``"adam_floor"`` with ``beta1^2 == beta2``, where the geometric sum in ``C_t`` is ``t`` itself."""


class DeviceStepInputs(NamedTuple):
    """What the step-dependent scalars need from the host when the step count is a device tensor: float64
    functions of the hyper-parameters only, so nothing about the step is read on the host. Shared by
    :func:`adam_step_tensors` (torch) and the fused kernel, which computes the same formulas in-kernel."""

    log_beta1: float  # log(beta1), -inf for beta1 = 0: beta1^t = exp(t log(beta1))
    log_beta2: float
    one_minus_beta1: float
    root_one_minus_beta2: float  # sqrt(1 - beta2)
    rho: float  # sqrt(beta2 / (1 - beta2)), before the warm-up correction
    lr_scale: float  # lr * scale
    eps: float
    log_ratio: float  # "adam_floor" only (else 0): log(beta1^2 / beta2)
    one_minus_ratio: float  # "adam_floor" only (else 1): 1 - beta1^2 / beta2
    worst_case_scale: float  # "adam_floor" only (else 0): (1 - beta1)^2 / (1 - beta2)
    debias: bool
    bound: int  # NO_FLOOR ("none", "rms_clip"), V_FLOOR, ADAM_FLOOR or ADAM_FLOOR_RATIO_ONE


def device_step_inputs(*, lr: float, beta1: float, beta2: float, eps: float, scale: float,
                       debias_second_moment: bool = True, update_bound: str = "v_floor") -> DeviceStepInputs:
    """The :class:`DeviceStepInputs` of these hyper-parameters."""

    def log(beta: float) -> float:
        return math.log(beta) if beta > 0.0 else -math.inf

    log_ratio, one_minus_ratio, worst_case_scale, bound = 0.0, 1.0, 0.0, NO_FLOOR
    if update_bound == "v_floor":
        bound = V_FLOOR
    elif update_bound == "adam_floor":
        ratio = beta1 * beta1 / beta2
        log_ratio, one_minus_ratio = 2.0 * log(beta1) - log(beta2), 1.0 - ratio
        worst_case_scale = (1.0 - beta1) ** 2 / (1.0 - beta2)
        bound = ADAM_FLOOR_RATIO_ONE if ratio == 1.0 else ADAM_FLOOR
    rho = math.sqrt(beta2 / (1.0 - beta2))
    return DeviceStepInputs(log(beta1), log(beta2), 1.0 - beta1, math.sqrt(1.0 - beta2), rho, lr * scale, eps,
                            log_ratio, one_minus_ratio, worst_case_scale, debias_second_moment, bound)


def adam_step_tensors(step: Tensor, inputs: DeviceStepInputs) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """``(rho, step_size, eps_hat, floor)`` of :func:`adam_step_constants` for a step count held in a tensor: float64
    0-d tensors on its device, so nothing is read on the host. ``floor`` is 0 without a floor.

    The count is clamped at 1: a matrix whose first step is skipped still counts 0, and its update is discarded
    anyway. The fused kernel's ``_step_scalars`` (``lit_lowrank.kernels.lora_pre_adam_jit``) is this, line by line.

    Example:
        >>> inputs = device_step_inputs(lr=0.1, beta1=0.9, beta2=0.999, eps=1e-8, scale=1.0)
        >>> rho, step_size, eps_hat, floor = adam_step_tensors(torch.tensor(3.0), inputs)
        >>> host = adam_step_constants(step=3, lr=0.1, beta1=0.9, beta2=0.999, eps=1e-8, scale=1.0)
        >>> [round(float(x) / y, 9) for x, y in zip((rho, step_size, eps_hat, floor), (host.rho, host.step_size,
        ...                                                                              host.eps_hat, host.floor))]
        [1.0, 1.0, 1.0, 1.0]
    """
    k = inputs
    t = step.to(torch.float64).clamp_min(1.0)
    c = k.root_one_minus_beta2 / torch.sqrt(1.0 - torch.exp(t * k.log_beta2))
    m_hat_per_m = k.one_minus_beta1 / ((1.0 - torch.exp(t * k.log_beta1)) * c)
    rho = torch.full_like(t, k.rho)
    if k.debias:  # t - 1 >= 1 inside the correction, so that step 1 (no correction) does not divide 0 by 0
        earlier = torch.clamp_min(t - 1.0, 1.0)
        warm_up = torch.sqrt(1.0 - torch.exp(earlier * k.log_beta2)) / (1.0 - torch.exp(earlier * 0.5 * k.log_beta2))
        rho = torch.where(t > 1.0, rho * warm_up, rho)
    floor = torch.zeros_like(t)
    if k.bound == V_FLOOR:
        floor = m_hat_per_m
    elif k.bound in (ADAM_FLOOR, ADAM_FLOOR_RATIO_ONE):
        geometric = t if k.bound == ADAM_FLOOR_RATIO_ONE else (1.0 - torch.exp(t * k.log_ratio)) / k.one_minus_ratio
        bias1 = 1.0 - torch.exp(t * k.log_beta1)
        worst_case = k.worst_case_scale * (1.0 - torch.exp(t * k.log_beta2)) / (bias1 * bias1) * geometric
        floor = m_hat_per_m / torch.sqrt(worst_case)
    return rho, k.lr_scale * m_hat_per_m, k.eps / c, floor
