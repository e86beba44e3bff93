"""LoRAPreAdamW: AdamW whose moments of each weight matrix are kept as low-rank factors (LoRA-Pre Adam)."""

from __future__ import annotations

import logging
import math
from typing import Any, Literal

from lit_lowrank.optim.lora_pre_adam_update import KERNEL, UPDATE_BOUNDS, lora_pre_adam_update_
from lit_lowrank.optim.lora_pre_base import (
    LowRankOptimizerBase,
    check_betas,
    check_common_hyperparameters,
    check_use_triton,
)
from lit_lowrank.optim.sharding import RowShards, local

log = logging.getLogger(__name__)


class LoRAPreAdamW(LowRankOptimizerBase):
    r"""AdamW with each weight matrix's two moments stored as low-rank factors (LoRA-Pre Adam).

    For a ``p x q`` matrix the first moment is ``m ~= B A`` and the second ``v ~= (V_B V_A)^2`` (element-wise
    square, so ``v >= 0``), with ``B, V_B`` of shape ``p x r`` and ``A, V_A`` of shape ``r x q``: the state is
    ``2 (p + q) r`` float32 elements instead of AdamW's ``2 p q``. Each step forms ``m_t`` and ``v_t`` transiently,
    applies the AdamW update (decoupled weight decay, bias correction from step 1), then moves each factor by
    one damped least-squares step towards ``g`` (first moment, ``1 - gamma1 = sqrt(beta1)``) or ``|g|`` (second
    moment, ``1 - gamma2 = beta2 ** 0.25``) so that the products follow Adam's EMAs. The math, our defaults and
    the measurements behind them: ``docs/lora-pre.md``.

    Bounded, finite steps (the defaults): the two moments are independent low-rank fits, so nothing keeps
    ``v_hat`` near ``m_hat^2`` element-wise, and the factored ``|g|`` fills more slowly than Adam's ``v``. So by
    default the second moment is bias-corrected as it fills (``debias_second_moment=True``) and ``v_hat`` is floored
    at ``m_hat^2`` (``update_bound="v_floor"``): no entry moves by more than ``lr * scale`` (plus weight decay),
    whatever the gradient; for a steady gradient the factors represent exactly, the step equals Adam's. A matrix or
    tensor whose gradient holds NaN/inf is skipped (parameter, state and step count unchanged) and counted in
    :meth:`skipped_steps`; on an accelerator without any host read (the counts are then device tensors: see
    ``docs/lora-pre.md``, "Non-finite gradients"). ``debias_second_moment=False, update_bound="none"`` is the
    paper's formula: unbounded (one zero gradient can move a weight by thousands of ``lr``), kept for reproducing
    the paper only.

    Which tensors are factored:

    - ``params`` may be an ``nn.Module`` (grouped by :func:`~lit_lowrank.optim.lowrank_param_groups`:
      attention/MLP matrices of the transformer blocks low-rank, everything else AdamW), an iterable of
      tensors or ``(name, tensor)`` pairs, or of param-group dicts.
    - A group's ``lowrank`` key (default ``True``) switches factoring on; in such a group every 2-D tensor is
      factored with the group's ``rank``, and any other tensor (bias, norm, embedding table if you put one
      there) gets plain AdamW. So a plain parameter list means: matrices factored, the rest AdamW.
    - ``lowrank=False`` groups are plain AdamW, matching ``torch.optim.AdamW`` bitwise (its foreach path).
    - Groups may also set ``rank``, ``scale``, ``damping``, ``factor_update``, ``full_rank`` and ``chunk_rows``.

    Args:
        params: module, tensors, named tensors or param groups (see above).
        lr, betas, eps, weight_decay: as in ``torch.optim.AdamW`` (``weight_decay`` is decoupled).
        rank: rank ``r`` of the factors.
        scale: GaLore-style multiplier of the factored tensors' Adam update (the paper's alpha: 0.25 for
            pre-training, 1.0 for fine-tuning); AdamW tensors are not scaled.
        damping: ``delta`` of the damped inverses ``(M + delta (tr(M) / r + tiny) I)^-1`` in the factor updates.
        factor_update: ``"alternating"`` (default): ``B`` from the old ``A``, then ``A`` from the *new* ``B``, as in
            alternating least squares. ``"jacobi"``: both from the old pair. Caveat: Jacobi tracks the moments
            worse and gets *worse as the rank grows* (relative error 0.90 / 0.81 / 1.04 / 1.28 at r = 1 / 2 / 4 / 8
            in the spec's simulation, against 0.84 / 0.70 / 0.45 / 0.25 for alternating); it exists for comparison.
        debias_second_moment: bias-correct the factored second moment as it fills (``sqrt(beta2)`` per step for
            ``V_B V_A``, so ``v_t`` warms up like Adam's); ``False`` is the paper's correction (see above).
        update_bound: ``"v_floor"`` (default): ``v_hat >= m_hat^2``, so ``|update| <= 1``; ``"adam_floor"``:
            ``v_hat >= m_hat^2 / C_t``, Adam's own worst case (``|update| <= sqrt(C_t)``, up to ~7.3 for the default
            betas); ``"rms_clip"``: the update's RMS over the matrix clipped at 1 (Adafactor; torch path only, one
            host read per matrix on CPU, none on accelerators); ``"none"``: unbounded. The floors are fused into
            the kernel's first pass.
        use_triton: the fused Triton kernel of the factored matrices' step (``lit_lowrank.kernels.lora_pre_adam``):
            ``"auto"`` uses it for CUDA tensors and the torch path on CPU, ``True`` wherever it can run (CPU only
            under ``TRITON_INTERPRET=1``), ``False`` never. A missing or broken Triton, or a tensor the kernel does not
            take (float64, rank > 128), falls back to the torch path, with one warning under ``True``. Results
            agree with the torch path to float32 rounding; FSDP2 shards run it on their local rows.
        full_rank: what to do with a matrix whose ``rank >= min(p, q)`` (factors would not save memory):
            ``"error"`` (default) raises at construction naming the tensor, since the rank is a memory budget and
            such a tensor means it was chosen for another model; ``"dense"`` gives it plain AdamW state, with a
            logged warning per tensor; ``"factored"`` keeps factors anyway (warning too; exact up to the damping).
        chunk_rows: rows of the transient ``m_t, v_t`` formed at a time; ``None`` picks ~2^19 elements on CPU
            (the whole matrix up to 2^20 elements) and the whole matrix on accelerators. The scratch buffers
            (three ``chunk_rows x q``, a fourth for non-float32 gradients, and ``O((p + q) r)`` more) are shared
            by all parameters, reused across steps, and are not optimizer state.
        seed: base of the per-parameter seeds of the random initial factors ``A, V_A ~ N(0, 0.02^2)``;
            ``None`` uses ``torch.initial_seed()`` at construction. Each parameter's seed is kept in its state
            (a Python int; the step counter is one too on CPU, a 0-d device tensor on accelerators), so a resumed
            run continues exactly.

    Example:
        >>> import torch
        >>> model = torch.nn.Sequential(torch.nn.Linear(32, 64), torch.nn.ReLU(), torch.nn.Linear(64, 8))
        >>> optimizer = LoRAPreAdamW(model.parameters(), lr=1e-3, rank=4)
        >>> model(torch.randn(16, 32)).pow(2).mean().backward()
        >>> optimizer.step()
        >>> optimizer.state_bytes().factors == 4 * 2 * ((64 + 32) * 4 + (8 + 64) * 4)  # float32 factors
        True
    """

    _factor_names = ("B", "A", "V_B", "V_A")

    def __init__(
        self,
        params: Any,
        lr: float = 1e-3,
        betas: tuple[float, float] = (0.9, 0.999),
        eps: float = 1e-8,
        weight_decay: float = 0.0,
        rank: int = 16,
        scale: float = 1.0,
        damping: float = 1e-6,
        factor_update: Literal["alternating", "jacobi"] = "alternating",
        use_triton: bool | Literal["auto"] = "auto",
        full_rank: Literal["error", "dense", "factored"] = "error",
        chunk_rows: int | None = None,
        seed: int | None = None,
        debias_second_moment: bool = True,
        update_bound: Literal["v_floor", "adam_floor", "rms_clip", "none"] = "v_floor",
    ) -> None:
        check_use_triton(type(self).__name__, use_triton, kernel=KERNEL)
        self.use_triton = use_triton
        defaults = {
            "lr": lr,
            "betas": tuple(betas),
            "eps": eps,
            "weight_decay": weight_decay,
            "rank": rank,
            "scale": scale,
            "damping": damping,
            "factor_update": factor_update,
            "full_rank": full_rank,
            "chunk_rows": chunk_rows,
            "lowrank": True,
            "debias_second_moment": debias_second_moment,
            "update_bound": update_bound,
        }
        super().__init__(params, defaults, seed=seed)

    def _check_group(self, group: dict[str, Any]) -> None:
        owner = type(self).__name__
        check_common_hyperparameters(owner, group, lowrank_keys=True)
        check_betas(owner, "betas", group["betas"])
        if not 0.0 <= group["eps"] < math.inf:
            raise ValueError(f"{owner}: invalid eps {group['eps']!r}; expected a finite float >= 0.")
        if not 0.0 < group["scale"] < math.inf:
            raise ValueError(f"{owner}: invalid scale {group['scale']!r}; expected a finite float > 0.")
        if not isinstance(group["lowrank"], bool):
            raise TypeError(f"{owner}: invalid lowrank {group['lowrank']!r}; expected True or False.")
        if group["update_bound"] not in UPDATE_BOUNDS:
            raise ValueError(f"{owner}: invalid update_bound {group['update_bound']!r}; expected one of {UPDATE_BOUNDS}.")
        if not isinstance(group["debias_second_moment"], bool):
            raise TypeError(f"{owner}: invalid debias_second_moment {group['debias_second_moment']!r}; expected a bool.")
        if group["update_bound"] == "none" and not group["debias_second_moment"]:
            log.warning(
                "%s: debias_second_moment=False with update_bound='none' is the paper's literal formula, whose steps "
                "are not bounded: one zero or tiny gradient can move a weight by orders of magnitude more than lr "
                "(docs/lora-pre.md). HINT: keep the defaults unless you are reproducing the paper.", owner)

    def _step_group(self, group: dict[str, Any], params: list, ok: dict | None) -> None:
        beta1, beta2 = group["betas"]
        dense = []
        for param in params:
            grad = self._grad_of(param)
            if not self._uses_factors(param, group):
                dense.append(param)
                continue
            state = self._factors(param, group)
            flag = None if ok is None else ok[param]
            step = self._count_step(state, param, flag)
            lora_pre_adam_update_(
                local(param),
                local(grad),
                local(state["B"]),
                state["A"],
                local(state["V_B"]),
                state["V_A"],
                step=step,
                lr=group["lr"],
                beta1=beta1,
                beta2=beta2,
                eps=group["eps"],
                weight_decay=group["weight_decay"],
                scale=group["scale"],
                damping=group["damping"],
                factor_update=group["factor_update"],
                chunk_rows=self._chunk_rows(param, group),
                workspace=self._workspace,
                shards=RowShards.of(param),
                debias_second_moment=group["debias_second_moment"],
                update_bound=group["update_bound"],
                use_triton=self.use_triton,
                grad_absmax=self._grad_absmax.get(param),
                ok=flag,
            )
        if dense:
            self._adamw_step(group, dense, ok)
