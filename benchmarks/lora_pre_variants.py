"""Research switches of LoRA-Pre Adam for the pre-training benchmark: its step in plain torch, one matrix at a time,
with the first and second moments switchable. Benchmark code, not a library option: it exists to measure where
LoRA-Pre Adam's loss against full-rank Adam goes (issue 26) before anything earns a place in ``lit_lowrank``.

The spec's variant (``m=factored, v=factored_abs``) is ``LoRAPreAdamW(residual_step=False)``'s step written out (its
default until 2026-12-07; ``m=factored_residual_rows`` is the residual step, the default since), for each ``p x q``
block matrix with gradient ``g`` at step ``t`` (``docs/lora-pre.md``):

    m_t = beta1 B A + (1 - beta1) g                                   (B, A from step t-1)
    v_t = beta2 (D_t V_B V_A)^2 + (1 - beta2) g^2                     D_t: the warm-up correction of the debiasing
    m_hat = m_t / (1 - beta1^t),  v_hat = max(v_t / (1 - beta2^t), m_hat^2)           (the "v_floor" bound)
    W <- W - lr * scale * m_hat / (sqrt(v_hat) + eps)
    B <- (1 - gamma1) B + gamma1 g A^T (A A^T + lam I)^-1,  then  A <- (1 - gamma1) A + gamma1 (B^T B + lam I)^-1 B^T g
    V_B, V_A: the same with gamma2 and the target |g|;  1 - gamma1 = sqrt(beta1),  1 - gamma2 = beta2^(1/4)

with ``lam = damping (tr(Gram) / r + 1e-60)`` and the factors starting at ``B = 0``, ``A ~ N(0, 0.02^2)``. Every
other tensor (embedding, norms) gets plain Adam at ``lr``. The switches (:class:`Variant`):

- first moment ``m``: ``factored`` (above); ``dense`` (Adam's EMA, ``p q`` numbers); ``factored_residual``: the
  part of ``g`` outside span(B), ``g - B (B^T B + lam I)^-1 B^T g``, is added to ``m_t`` with the coefficient
  ``(1 - beta1^t) - (1 - beta1)``, so that after the bias correction it enters at weight 1, without momentum (today
  it enters at ``1 - beta1``, a 10x-attenuated momentum-free step); ``factored_residual_rows``: the same with the
  part outside the row space of A, ``g - g A^T (A A^T + lam I)^-1 A``.
- ``mrank``: the first moment's factors at ``mrank x r`` (capped at ``min(p, q)``), e.g. 2 to give m the memory
  that a rank-r second moment would take.
- second moment ``v``: ``factored_abs`` (above); ``dense_sq`` (Adam's v); ``adafactor``: EMAs of the row and
  column sums of ``g^2`` (``p + q`` numbers), read as Adafactor's non-negative rank-1 estimate
  ``v_ij = R_i C_j / sum(R)`` and debiased like Adam's v (each EMA carries the same ``1 - beta2^t``).

State is float32, the ``r x r`` solves float64 (a Gram matrix squares the factor's condition number). Only what a
variant uses is allocated, so ``state`` holds exactly its memory (the benchmark counts every tensor in it; the step
counters are Python ints). The random right factors come from one generator seeded at construction, drawn in the
order of the first step (``A`` then ``V_A`` per matrix), so a run is reproducible from its seed.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from typing import NamedTuple

import torch
from torch import Tensor

M_MODES = ("factored", "dense", "factored_residual", "factored_residual_rows")
V_MODES = ("factored_abs", "dense_sq", "adafactor")
FACTOR_INIT_STD = 0.02  # the spec's (and the library's) N(0, 0.02^2) right factors
DAMPING_FLOOR = 1e-60  # as the library: an all-zero factor (B at step 1) gets a zero pseudo-inverse, not 0 / 0


class Variant(NamedTuple):
    """One combination of the switches; ``name`` is its canonical spelling (the benchmark's method names)."""

    m: str = "factored"
    v: str = "factored_abs"
    mrank: int = 1

    @property
    def name(self) -> str:
        """``m=...,v=...[,mrank=k]``: both moments always, the multiplier only when not 1."""
        return f"m={self.m},v={self.v}" + (f",mrank={self.mrank}" if self.mrank != 1 else "")

    def describe(self) -> str:
        m = self.m + (f" at {self.mrank}r" if self.mrank != 1 else "")
        return f"m {m}, v {self.v}"


def check_variant(variant: Variant) -> Variant:
    """``variant`` if its switches are known and consistent; a ValueError saying what is wrong otherwise."""
    if variant.m not in M_MODES:
        raise ValueError(f"unknown first moment m={variant.m!r}; one of {', '.join(M_MODES)}")
    if variant.v not in V_MODES:
        raise ValueError(f"unknown second moment v={variant.v!r}; one of {', '.join(V_MODES)}")
    if not isinstance(variant.mrank, int) or variant.mrank < 1:
        raise ValueError(f"mrank must be a positive integer, got {variant.mrank!r}")
    if variant.m == "dense" and variant.mrank != 1:
        # a dense first moment has no rank: two spellings of one run would give two run files
        raise ValueError("mrank applies to a factored first moment only (m=dense has no rank)")
    return variant


def damped_pinv(factor: Tensor, damping: float) -> Tensor:
    """``(F F^T + lam I)^-1 F`` for an ``r x n`` factor ``F``, ``lam = damping (tr(F F^T) / r + 1e-60)``: the Gram
    matrix and the solve in float64, the result in ``F``'s dtype (the ``p x q x r`` products that use it run in
    float32, as in the library)."""
    f = factor.double()
    gram = f @ f.T
    rank = gram.shape[0]
    lam = damping * (torch.trace(gram) / rank + DAMPING_FLOOR)
    return torch.linalg.solve(gram + lam * torch.eye(rank, dtype=torch.float64, device=f.device), f).to(factor.dtype)


def warmup_correction(step: int, beta2: float) -> float:
    """``D_t``: ``V_B V_A`` follows the EMA of ``|g|`` at rate ``sqrt(beta2)``, whose square warms up like
    ``(1 - beta2^((t-1)/2))^2``, far below Adam's ``1 - beta2^(t-1)``; D_t rescales it (1 at step 1, where the
    factors hold nothing yet). The library's ``debias_second_moment=True``."""
    if step == 1:
        return 1.0
    return math.sqrt(1.0 - beta2 ** (step - 1)) / (1.0 - beta2 ** ((step - 1) / 2))


class LoRAPreVariant(torch.optim.Optimizer):
    """LoRA-Pre Adam with switchable moments (see the module docstring), for the pre-training benchmark only.

    ``params``: param groups; a group with ``lowrank=True`` holds the block matrices (2-D, stepped by the variant at
    ``lr * scale``), any other group gets plain Adam at ``lr`` (no weight decay, as in the benchmark).
    """

    def __init__(self, params: Iterable, lr: float, rank: int, scale: float, variant: Variant = Variant(),
                 betas: tuple[float, float] = (0.9, 0.999), eps: float = 1e-8, damping: float = 1e-6,
                 seed: int | None = None) -> None:
        self.variant = check_variant(Variant(*variant))
        defaults = dict(lr=lr, rank=rank, scale=scale, betas=tuple(betas), eps=eps, damping=damping, lowrank=False)
        super().__init__(params, defaults)
        for group in self.param_groups:
            if group["lowrank"] and any(p.dim() != 2 for p in group["params"]):
                raise ValueError("LoRAPreVariant: a lowrank=True group must hold 2-D matrices only")
        # torch.initial_seed() is the run's seed (the benchmark seeds torch before building the model), so the
        # factors' draws differ between seeds as the library's do, and repeat for a seed.
        self.generator = torch.Generator().manual_seed(torch.initial_seed() if seed is None else seed)

    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            for param in group["params"]:
                if param.grad is None:
                    continue
                if group["lowrank"]:
                    self._matrix_step(param, group)
                else:
                    self._adam_step(param, group)
        return loss

    def _adam_step(self, param: Tensor, group: dict) -> None:
        """Plain Adam (torch.optim.Adam's formula, float32 state) for the embedding and norms."""
        beta1, beta2 = group["betas"]
        state = self.state[param]
        if not state:
            state.update(step=0, m=torch.zeros_like(param, dtype=torch.float32),
                         v=torch.zeros_like(param, dtype=torch.float32))
        state["step"] += 1
        t, g = state["step"], param.grad.float()
        state["m"].mul_(beta1).add_(g, alpha=1 - beta1)
        state["v"].mul_(beta2).addcmul_(g, g, value=1 - beta2)
        denominator = (state["v"] / (1 - beta2**t)).sqrt_().add_(group["eps"])
        param.add_((state["m"] / denominator).to(param.dtype), alpha=-group["lr"] / (1 - beta1**t))

    def _init_matrix_state(self, param: Tensor, group: dict) -> dict:
        p, q = param.shape
        rank = min(group["rank"], p, q)
        m_rank = min(rank * self.variant.mrank, p, q)
        state = self.state[param]
        state["step"] = 0

        def right(r: int) -> Tensor:
            return torch.randn(r, q, generator=self.generator).mul_(FACTOR_INIT_STD).to(param.device)

        zeros = dict(dtype=torch.float32, device=param.device)
        if self.variant.m == "dense":
            state["m"] = torch.zeros(p, q, **zeros)
        else:
            state["B"], state["A"] = torch.zeros(p, m_rank, **zeros), right(m_rank)
        if self.variant.v == "factored_abs":
            state["V_B"], state["V_A"] = torch.zeros(p, rank, **zeros), right(rank)
        elif self.variant.v == "dense_sq":
            state["v"] = torch.zeros(p, q, **zeros)
        else:  # adafactor
            state["v_rows"], state["v_cols"] = torch.zeros(p, **zeros), torch.zeros(q, **zeros)
        return state

    def _matrix_step(self, param: Tensor, group: dict) -> None:
        beta1, beta2 = group["betas"]
        damping, variant = group["damping"], self.variant
        state = self.state[param] or self._init_matrix_state(param, group)
        state["step"] += 1
        t, g = state["step"], param.grad.float()
        gamma1, gamma2 = 1 - math.sqrt(beta1), 1 - beta2**0.25

        # First moment m_t (formed transiently for the factored modes).
        right_pinv = None  # (A A^T + lam I)^-1 A of the old A: the rows residual and B's regression share it
        if variant.m == "dense":
            state["m"].mul_(beta1).add_(g, alpha=1 - beta1)
            m_t = state["m"]
        else:
            B, A = state["B"], state["A"]
            m_t = beta1 * (B @ A) + (1 - beta1) * g
            residual_weight = (1 - beta1**t) - (1 - beta1)  # 0 at step 1, where m_t = g already has weight 1
            if variant.m != "factored" and residual_weight != 0.0:
                if variant.m == "factored_residual":  # g - B (B^T B + lam I)^-1 B^T g, with the old B
                    inside = B @ (damped_pinv(B.T, damping) @ g)
                else:  # factored_residual_rows: g - g A^T (A A^T + lam I)^-1 A, with the old A
                    right_pinv = damped_pinv(A, damping)
                    inside = (g @ right_pinv.T) @ A
                m_t = m_t + residual_weight * (g - inside)

        # Second moment v_t.
        if variant.v == "factored_abs":
            v_t = beta2 * (warmup_correction(t, beta2) * (state["V_B"] @ state["V_A"])) ** 2 + (1 - beta2) * g * g
        elif variant.v == "dense_sq":
            state["v"].mul_(beta2).addcmul_(g, g, value=1 - beta2)
            v_t = state["v"]
        else:  # adafactor: row and column EMAs of g^2, their rank-1 non-negative product
            square = g * g
            rows, cols = state["v_rows"], state["v_cols"]
            rows.mul_(beta2).add_(square.sum(dim=1), alpha=1 - beta2)
            cols.mul_(beta2).add_(square.sum(dim=0), alpha=1 - beta2)
            # an all-zero gradient so far would make 0 / 0; v is then 0 and the floor below bounds the step
            v_t = torch.outer(rows, cols) / rows.sum().clamp_min(torch.finfo(torch.float32).tiny)

        # The update, bounded by the v_floor (|m_hat| / sqrt(v_hat) <= 1).
        m_hat = m_t / (1 - beta1**t)
        v_hat = torch.maximum(v_t / (1 - beta2**t), m_hat * m_hat)
        param.add_((m_hat / (v_hat.sqrt() + group["eps"])).to(param.dtype), alpha=-group["lr"] * group["scale"])

        # Factor regressions, alternating: B from the old A, then A from the new B (the same for V_B, V_A on |g|).
        if variant.m != "dense":
            self._regress(state["B"], state["A"], g, gamma1, damping, right_pinv)
        if variant.v == "factored_abs":
            self._regress(state["V_B"], state["V_A"], g.abs(), gamma2, damping)

    @staticmethod
    def _regress(left: Tensor, right: Tensor, target: Tensor, rate: float, damping: float,
                 right_pinv: Tensor | None = None) -> None:
        """One damped least-squares step of ``left @ right`` towards ``target``: ``left`` from the old ``right``,
        then ``right`` from the new ``left``, each blended in at ``rate``."""
        right_pinv = damped_pinv(right, damping) if right_pinv is None else right_pinv
        left.mul_(1 - rate).add_(target @ right_pinv.T, alpha=rate)
        right.mul_(1 - rate).add_(damped_pinv(left.T, damping) @ target, alpha=rate)
