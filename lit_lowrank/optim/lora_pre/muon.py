"""LoRAPreMuon: Muon whose momentum buffer of each weight matrix is kept as low-rank factors."""

from __future__ import annotations

from typing import Any, Literal

import torch

from lit_lowrank.kernels.dispatch import validate_use_triton
from lit_lowrank.optim.lora_pre.base import LowRankOptimizerBase, split_by_matrix
from lit_lowrank.optim.lora_pre.hyperparameters import check_common_hyperparameters
from lit_lowrank.optim.lora_pre.muon_update import (
    SCALE_RULES,
    MuonHyper,
    dense_muon_update_,
    lora_pre_muon_step_,
    muon_update_scale,
)
from lit_lowrank.optim.sharding import RowShards
from lit_lowrank.optim.state import compute_dtype
from lit_lowrank.optim.validation import (
    BETA,
    as_tuple,
    check_adam_hyperparameters,
    check_choice,
    check_flag,
    check_integer,
    check_number,
)


class LoRAPreMuon(LowRankOptimizerBase):
    r"""Muon with each weight matrix's momentum buffer stored as low-rank factors (LoRA-Pre Muon).

    The buffer ``M_t = mu M_{t-1} + g`` of a ``p x q`` matrix is kept as ``B A`` (``(p + q) r`` float32 elements
    instead of ``p q``). Each step orthogonalises ``M = mu B A + g`` (or its Nesterov form ``g + mu M``), ``M``
    with the residual step's term by default (below)
    with five quintic Newton-Schulz iterations in float32, updates ``W <- W - lr (scale O + weight_decay W)``,
    then moves the factors by one damped least-squares step each towards ``g / (1 - mu)`` with
    ``1 - gamma = sqrt(mu)`` (see :mod:`lit_lowrank.optim.lora_pre.muon_update`). A matrix or tensor whose gradient
    holds NaN/inf, or an entry whose square would overflow its state (:func:`~lit_lowrank.optim.state.gradient_limit`),
    is skipped (parameter, factors and step count unchanged) and counted in :meth:`skipped_steps`; on an accelerator
    without any host read (``docs/lora-pre.md``, "Non-finite gradients"). Hyper-parameters must be finite and in
    range, in added groups too; a tensor given twice is refused (:mod:`lit_lowrank.optim.validation`).

    Muon is for matrices only, so non-matrix tensors run AdamW inside the same optimizer, with the ``adamw_*``
    hyper-parameters:

    - ``params`` as an ``nn.Module`` is grouped by :func:`~lit_lowrank.optim.lowrank_param_groups`.
    - A group with ``lowrank=True`` must hold 2-D tensors only; ``lowrank=False`` groups are AdamW, their
      ``lr``, ``betas``, ``eps`` and ``weight_decay`` defaulting to ``adamw_lr``, ``adamw_betas``, ... (so LR
      schedulers scale them like any group's ``lr``). This differs from torch's convention, where a group without
      ``lr`` gets the constructor's ``lr``, on purpose: Muon's ``lr`` (~0.02) would be ~60x too large for AdamW.
      It holds for groups added later too, and for copies (deep copies and pickles keep the ``adamw_*`` values).
    - A plain list of tensors, or a group without a ``lowrank`` key, is split in two groups: its 2-D tensors
      (Muon) and the rest (AdamW); keys set in such a group apply to both halves.

    Args:
        params: module, tensors, named tensors or param groups (see above).
        lr, momentum, nesterov, weight_decay, ns_steps: Muon's (``weight_decay`` decoupled).
        rank: rank ``r`` of the factors (per group ``rank``).
        adamw_lr, adamw_betas, adamw_eps, adamw_weight_decay: defaults of the AdamW groups.
        damping: ``delta`` of the damped inverses ``(M + delta (tr(M) / r + tiny) I)^-1``.
        factor_update: ``"alternating"`` (default) or ``"jacobi"``, as in
            :class:`~lit_lowrank.optim.LoRAPreAdamW` (Jacobi tracks the momentum worse, the more so at high rank).
        scale_rule: ``"muon"`` (default): ``sqrt(max(1, p / q))``, Keller Jordan's Muon, meant for ``lr ~ 0.02``;
            ``"adamw_rms"``: ``0.2 sqrt(max(p, q))`` (Moonlight), update RMS ~0.2 like AdamW's so AdamW's lr and
            weight decay carry over. ``p x q`` is the weight as stored: ``out x in`` for ``nn.Linear``, ``in x out``
            for transformers' ``Conv1D``, which ``"adamw_rms"`` treats alike.
        use_triton: accepted for symmetry; LoRA-Pre Muon has no kernel (:mod:`lit_lowrank.kernels.dispatch`).
        full_rank: ``"error"`` (default) | ``"dense"`` (plain Muon with a dense momentum buffer for that tensor,
            logged) | ``"factored"`` (keep factors, logged), for matrices with ``rank >= min(p, q)``.
        residual_step: the part of each gradient outside the rows of ``A``, which ``B A`` cannot hold, enters ``M``
            with the weight ``(1 - mu^t) / (1 - mu)`` that a steady direction has in an exact buffer, instead of 1
            (default; as :class:`~lit_lowrank.optim.LoRAPreAdamW`'s, ``docs/lora-pre.md``). No extra state or
            ``p x q x r`` product. ``False``: the paper's momentum; checkpoints written before the option resume
            with it.
        seed: base of the per-parameter seeds of the initial ``A ~ N(0, 0.02^2)`` (``torch.initial_seed()``
            when ``None``); seeds are kept in the state.
        maximize: step along ``+gradient`` (per group ``maximize``, AdamW groups too).

    Example:
        >>> import torch
        >>> model = torch.nn.Sequential(torch.nn.Linear(32, 64), torch.nn.ReLU(), torch.nn.Linear(64, 8))
        >>> optimizer = LoRAPreMuon(model.parameters(), lr=0.02, rank=4)
        >>> [group["lowrank"] for group in optimizer.param_groups]  # weights on Muon, biases on AdamW
        [True, False]
        >>> model(torch.randn(16, 32)).pow(2).mean().backward()
        >>> optimizer.step()
        >>> optimizer.state_bytes().factors == 4 * ((64 + 32) * 4 + (8 + 64) * 4)
        True
    """

    _factor_names = ("B", "A")
    _pickled_attributes = (*LowRankOptimizerBase._pickled_attributes, "_adamw_defaults")

    def __init__(
        self,
        params: Any,
        lr: float = 0.02,
        momentum: float = 0.95,
        nesterov: bool = True,
        rank: int = 16,
        ns_steps: int = 5,
        weight_decay: float = 0.0,
        adamw_lr: float = 3e-4,
        adamw_betas: tuple[float, float] = (0.9, 0.95),
        adamw_eps: float = 1e-8,
        adamw_weight_decay: float = 0.0,
        damping: float = 1e-6,
        factor_update: Literal["alternating", "jacobi"] = "alternating",
        scale_rule: Literal["muon", "adamw_rms"] = "muon",
        use_triton: bool | Literal["auto"] = "auto",
        full_rank: Literal["error", "dense", "factored"] = "error",
        seed: int | None = None,
        maximize: bool = False,
        residual_step: bool = True,
    ) -> None:
        validate_use_triton(use_triton, type(self).__name__, missing_kernel="lora_pre_muon")
        self.use_triton = use_triton
        self._adamw_defaults = {
            "lr": adamw_lr,
            "betas": as_tuple(adamw_betas),
            "eps": adamw_eps,
            "weight_decay": adamw_weight_decay,
        }
        # Checked here too: they reach a group only when one holds non-matrix tensors, maybe much later.
        check_adam_hyperparameters(type(self).__name__, self._adamw_defaults, prefix="adamw_",
                                   default_betas=(0.9, 0.95))
        defaults = {
            "lr": lr,
            "momentum": momentum,
            "nesterov": nesterov,
            "weight_decay": weight_decay,
            "rank": rank,
            "ns_steps": ns_steps,
            "damping": damping,
            "factor_update": factor_update,
            "scale_rule": scale_rule,
            "full_rank": full_rank,
            "betas": as_tuple(adamw_betas),
            "eps": adamw_eps,
            "maximize": maximize,
            "residual_step": residual_step,
        }
        super().__init__(params, defaults, seed=seed)

    def _prepare_group(self, group: dict[str, Any]) -> list[dict[str, Any]]:
        params = group["params"]
        items = [params] if isinstance(params, torch.Tensor) else list(params)
        if "param_names" in group:  # keep names attached to their tensors through the split
            items = list(zip(group.pop("param_names"), items))
        group["params"] = items
        if "lowrank" in group:
            groups = [group]
        else:
            matrices, others = split_by_matrix(items)
            groups = [{**group, "params": matrices, "lowrank": True}, {**group, "params": others, "lowrank": False}]
            groups = [g for g in groups if g["params"]] or [{**group, "lowrank": True}]
        for g in groups:
            if not g["lowrank"]:
                for key, value in self._adamw_defaults.items():
                    g.setdefault(key, value)
        return groups

    def _check_group(self, group: dict[str, Any]) -> None:
        owner = type(self).__name__
        check_common_hyperparameters(owner, group, default_betas=(0.9, 0.95))
        check_number(owner, "momentum", group["momentum"], BETA, example=0.95)
        check_flag(owner, "nesterov", group["nesterov"])
        check_integer(owner, "ns_steps", group["ns_steps"], 1, example=5)
        check_choice(owner, "scale_rule", group["scale_rule"], SCALE_RULES)
        check_flag(owner, "residual_step", group["residual_step"])
        if group["lowrank"]:
            names = group.get("param_names") or [None] * len(group["params"])
            for name, param in zip(names, group["params"]):
                if param.ndim != 2:
                    raise ValueError(
                        f"{owner}: parameter {name or ''} of shape {tuple(param.shape)} is in a lowrank=True group, "
                        "but Muon only updates matrices. HINT: put it in a group with lowrank=False (AdamW), or "
                        "pass the model / a plain parameter list, which are split automatically."
                    )

    def _step_group(self, group: dict[str, Any], params: list[torch.Tensor], ok: dict | None) -> None:
        if not group["lowrank"]:
            if params:
                self._adamw_step(group, params, ok)
            return
        factored, dense = self._split_factored(group, params)
        for batch in self._batches(group, factored, ok):
            scale = muon_update_scale(tuple(batch.shape), group["scale_rule"])
            lora_pre_muon_step_(batch, MuonHyper(group["lr"], group["momentum"], group["nesterov"],
                                                 group["weight_decay"], group["ns_steps"], scale, group["damping"],
                                                 group["factor_update"], group["residual_step"]), self._workspace)
            batch.write_back()
        for param in dense:
            self._dense_step(group, param, None if ok is None else ok[param])

    def _dense_step(self, group: dict[str, Any], param: torch.Tensor, flag: torch.Tensor | None) -> None:
        """Plain Muon with a dense momentum buffer: the ``full_rank="dense"`` fallback, one matrix at a time."""
        if RowShards.of(param) is not None:
            raise NotImplementedError(
                f"{type(self).__name__}: the dense Muon fallback (full_rank='dense') does not support "
                f"FSDP2-sharded parameters ({self._param_names[param]}). "
                "HINT: lower the rank or use full_rank='factored'."
            )
        state = self.state[param]
        if "momentum_buffer" not in state:
            state["step"] = 0
            state["momentum_buffer"] = torch.zeros_like(param, dtype=compute_dtype(param.dtype))
        self._count_step(state, param, flag)
        dense_muon_update_(param, self._grad_of(param), state["momentum_buffer"], lr=group["lr"],
                           momentum=group["momentum"], nesterov=group["nesterov"],
                           weight_decay=group["weight_decay"], ns_steps=group["ns_steps"],
                           scale=muon_update_scale(tuple(param.shape), group["scale_rule"]), ok=flag)
