"""LoRAPreAdamW: AdamW whose moments of each weight matrix are kept as low-rank factors (LoRA-Pre Adam)."""

from __future__ import annotations

import logging
from typing import Any, Literal

import torch

from lit_lowrank.kernels.dispatch import triton_available, validate_use_triton
from lit_lowrank.optim.lora_pre.adam_kernel import KERNEL_MAX_RANK, KERNEL_UPDATE_BOUNDS
from lit_lowrank.optim.lora_pre.adam_passes import AdamHyper
from lit_lowrank.optim.lora_pre.adam_update import UPDATE_BOUNDS, lora_pre_adam_step_
from lit_lowrank.optim.lora_pre.base import LowRankOptimizerBase
from lit_lowrank.optim.lora_pre.batch import KERNEL_BATCH_ELEMENTS
from lit_lowrank.optim.lora_pre.hyperparameters import check_common_hyperparameters
from lit_lowrank.optim.state import compute_dtype
from lit_lowrank.optim.validation import POSITIVE, as_tuple, check_choice, check_flag, check_number

log = logging.getLogger(__name__)


class LoRAPreAdamW(LowRankOptimizerBase):
    r"""AdamW with each weight matrix's two moments stored as low-rank factors (LoRA-Pre Adam).

    For a ``p x q`` matrix the first moment is kept as ``m ~= B A`` and the second as ``v ~= (V_B V_A)^2``: the state
    is ``2 (p + q) r`` float32 elements instead of AdamW's ``2 p q``. Each step forms ``m_t`` and ``v_t`` transiently,
    applies the AdamW update and moves each factor one damped least-squares step towards ``g`` or ``|g|``. By default
    no entry moves by more than ``lr * scale`` (plus weight decay). A tensor whose gradient holds NaN/inf, or an
    entry whose square would overflow its state (:func:`~lit_lowrank.optim.state.gradient_limit`), is skipped and
    counted in :meth:`skipped_steps`. Hyper-parameters must be finite and in range, in added groups too; a tensor
    given twice is refused (:mod:`lit_lowrank.optim.validation`). The math, our deviations from the paper, the
    defaults and the measurements behind them: ``docs/lora-pre.md``.

    ``params`` may be an ``nn.Module`` (grouped by :func:`~lit_lowrank.optim.lowrank_param_groups`), tensors,
    ``(name, tensor)`` pairs or param-group dicts. In a group with ``lowrank=True`` (the default) every 2-D tensor is
    factored and any other tensor gets plain AdamW; ``lowrank=False`` groups are plain AdamW, bitwise
    ``torch.optim.AdamW``'s (``docs/lora-pre.md``, "Which parameters are factored").

    Args:
        params: module, tensors, named tensors or param groups (see above).
        lr, betas, eps, weight_decay: as in ``torch.optim.AdamW`` (``weight_decay`` is decoupled).
        rank: rank ``r`` of the factors.
        scale: multiplier of the factored tensors' Adam update (the paper's alpha: 0.25 for pre-training, 1.0 for
            fine-tuning); AdamW tensors are not scaled.
        damping: ``delta`` of the damped inverses ``(M + delta (tr(M) / r + tiny) I)^-1`` in the factor updates.
        factor_update: ``"alternating"`` (default): ``B`` from the old ``A``, then ``A`` from the new ``B``;
            ``"jacobi"``: both from the old pair, kept for comparison only (docs/design.md).
        residual_step: the part of each gradient outside the first moment's row space (the rows of ``A``) steps
            at full weight (default), where the paper's ``m_t = beta1 B A + (1 - beta1) g`` gives it ``1 - beta1``
            and no momentum: a rank-r momentum otherwise all but ignores most directions (``docs/lora-pre.md``).
            No extra state and no extra ``p x q x r`` product. ``False``: the paper's first moment. Checkpoints
            written before this option resume with ``False``, as they were trained.
        debias_second_moment: bias-correct the factored second moment as it fills (default); ``False`` with
            ``update_bound="none"`` is the paper's unbounded formula (``docs/lora-pre.md``).
        update_bound: ``"v_floor"`` (default, ``|update| <= 1``), ``"adam_floor"``, ``"rms_clip"`` (torch path
            only) or ``"none"`` (``docs/lora-pre.md``).
        use_triton: the fused kernel ``lit_lowrank.kernels.lora_pre_adam``, as in
            :mod:`lit_lowrank.kernels.dispatch`; it does not take float64 or rank > 128 (the torch path runs).
        full_rank: a matrix with ``rank >= min(p, q)``: ``"error"`` (default) raises naming it, ``"dense"`` gives it
            plain AdamW state, ``"factored"`` keeps factors (both log a warning).
        chunk_rows: rows of the transient ``m_t, v_t`` formed at a time; None: automatic (docs/design.md).
        seed: base of the per-parameter seeds of the random initial factors (``None``: ``torch.initial_seed()``);
            each parameter's seed is kept in its state, so a resumed run continues exactly.
        maximize: step along ``+gradient`` (per group ``maximize``), as in ``torch.optim.AdamW``.

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
        maximize: bool = False,
        residual_step: bool = True,
    ) -> None:
        validate_use_triton(use_triton, type(self).__name__)
        self.use_triton = use_triton
        defaults = {
            "lr": lr,
            "betas": as_tuple(betas),
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
            "maximize": maximize,
            "residual_step": residual_step,
        }
        super().__init__(params, defaults, seed=seed)

    def _check_group(self, group: dict[str, Any]) -> None:
        owner = type(self).__name__
        check_common_hyperparameters(owner, group, default_betas=(0.9, 0.999))
        check_number(owner, "scale", group["scale"], POSITIVE, example=1.0)
        check_choice(owner, "update_bound", group["update_bound"], UPDATE_BOUNDS)
        check_flag(owner, "debias_second_moment", group["debias_second_moment"])
        check_flag(owner, "residual_step", group["residual_step"])
        if group["update_bound"] == "none" and not group["debias_second_moment"]:
            log.warning(
                "%s: debias_second_moment=False with update_bound='none' is the paper's literal formula, whose steps "
                "are not bounded: one zero or tiny gradient can move a weight by orders of magnitude more than lr "
                "(docs/lora-pre.md). HINT: keep the defaults unless you are reproducing the paper.", owner)

    def _batch_budget(self, group: dict[str, Any], param) -> int | None:
        """Larger batches where the Triton kernels will take them (CUDA, float32 factors, rank and bound they fuse)."""
        kernel = (param.is_cuda and self.use_triton is not False and not group["residual_step"]
                  and group["rank"] <= KERNEL_MAX_RANK
                  and compute_dtype(param.dtype) == torch.float32 and group["update_bound"] in KERNEL_UPDATE_BOUNDS
                  and triton_available())
        return KERNEL_BATCH_ELEMENTS if kernel else None

    def _step_group(self, group: dict[str, Any], params: list, ok: dict | None) -> None:
        factored, dense = self._split_factored(group, params)
        hyper = AdamHyper.of(group)
        for batch in self._batches(group, factored, ok):
            lora_pre_adam_step_(batch, hyper, self._workspace, self.use_triton)
            batch.write_back()
        if dense:
            self._adamw_step(group, dense, ok)
