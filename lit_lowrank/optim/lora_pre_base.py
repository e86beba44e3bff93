"""What LoRAPreAdamW and LoRAPreMuon share: param-group handling, the full-rank policy, per-parameter seeds,
a plain AdamW path for non-matrix tensors, exact state accounting and a dtype-preserving ``load_state_dict``."""

from __future__ import annotations

import logging
import math
from collections import defaultdict
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor, nn
from torch.optim import Optimizer

from lit_lowrank.kernels.dispatch import fallback_warning
from lit_lowrank.optim.lowrank_factors import (
    Workspace,
    auto_chunk_rows,
    derive_seed,
    factor_dtype,
    init_factor_pairs,
)
from lit_lowrank.optim.sharding import RowShards, all_reduce_, local, process_group

log = logging.getLogger(__name__)

FULL_RANK_POLICIES = ("error", "dense", "factored")
FACTOR_UPDATES = ("alternating", "jacobi")


@dataclass(frozen=True)
class StateBytes:
    """Bytes held by an optimizer's state tensors (scratch buffers excluded).

    ``total`` = ``factors`` + ``dense`` = ``sum(per_group)``; ``factors`` counts the low-rank factors, ``dense``
    every other state tensor (AdamW moments, dense Muon momenta).

    Example:
        >>> from lit_lowrank.optim import LoRAPreMuon
        >>> layer = torch.nn.Linear(32, 16)
        >>> optimizer = LoRAPreMuon(layer.parameters(), rank=4)
        >>> layer(torch.randn(2, 32)).sum().backward()
        >>> optimizer.step()
        >>> optimizer.state_bytes()  # (16 + 32) * 4 float32 factor entries; AdamW moments of the 16 biases
        StateBytes(total=896, per_group=(768, 128), factors=768, dense=128)
    """

    total: int
    per_group: tuple[int, ...]
    factors: int
    dense: int


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


def check_common_hyperparameters(owner: str, group: dict[str, Any], lowrank_keys: bool) -> None:
    """Raise a ValueError naming ``owner`` for an invalid lr, weight decay, rank, damping or policy."""
    lr = group["lr"]
    if isinstance(lr, Tensor) or not isinstance(lr, (int, float)) or not 0.0 <= lr < math.inf:
        raise ValueError(f"{owner}: invalid lr {lr!r}; expected a finite float >= 0.")
    if not 0.0 <= group["weight_decay"] < math.inf:
        raise ValueError(f"{owner}: invalid weight_decay {group['weight_decay']!r}; expected a finite float >= 0.")
    if not lowrank_keys:
        return
    rank = group["rank"]
    if isinstance(rank, bool) or not isinstance(rank, int) or rank < 1:
        raise ValueError(f"{owner}: invalid rank {rank!r}; expected an int >= 1.")
    if not 0.0 < group["damping"] <= 1.0:
        raise ValueError(
            f"{owner}: invalid damping {group['damping']!r}; expected 0 < damping <= 1 (default 1e-6). "
            "HINT: damping keeps the factors' Gram matrices invertible; 0 would divide by zero at step 1."
        )
    if group["factor_update"] not in FACTOR_UPDATES:
        raise ValueError(
            f"{owner}: invalid factor_update {group['factor_update']!r}; expected one of {FACTOR_UPDATES}."
        )
    if group["full_rank"] not in FULL_RANK_POLICIES:
        raise ValueError(f"{owner}: invalid full_rank {group['full_rank']!r}; expected one of {FULL_RANK_POLICIES}.")
    chunk_rows = group.get("chunk_rows")
    if chunk_rows is not None and (isinstance(chunk_rows, bool) or not isinstance(chunk_rows, int) or chunk_rows < 1):
        raise ValueError(f"{owner}: invalid chunk_rows {chunk_rows!r}; expected None (automatic) or an int >= 1.")


def check_betas(owner: str, name: str, betas: Any) -> None:
    if not (isinstance(betas, (tuple, list)) and len(betas) == 2 and all(0.0 <= b < 1.0 for b in betas)):
        raise ValueError(f"{owner}: invalid {name} {betas!r}; expected two floats in [0, 1), e.g. (0.9, 0.999).")


def check_use_triton(owner: str, use_triton: Any, kernel: str, exists: bool = True) -> None:
    """Validate the kernel switch ``"auto"`` | ``True`` | ``False`` (semantics: :mod:`lit_lowrank.kernels.dispatch`).

    ``kernel`` names the optimizer's fused Triton kernel; ``exists=False`` for an optimizer without one
    (LoRAPreMuon): there ``True`` cannot be honoured, so it warns once per process
    (:class:`~lit_lowrank.kernels.dispatch.KernelFallbackWarning`, as for any kernel that cannot run) and the torch
    path runs, as under ``"auto"`` and ``False``.
    """
    if not (use_triton == "auto" or isinstance(use_triton, bool)):
        raise ValueError(f"{owner}: invalid use_triton {use_triton!r}; expected 'auto', True or False.")
    if not exists and use_triton is True:
        fallback_warning(
            kernel, "none", f"{owner} has no Triton kernel (its Newton-Schulz iterations are torch matmuls, "
            "i.e. cuBLAS on GPU). HINT: use_triton='auto' or False say the same without this warning."
        )


class LowRankOptimizerBase(Optimizer):
    """Shared machinery of the LoRA-Pre optimizers (not meant to be used directly).

    Subclasses define ``_factor_names`` (the state keys of one parameter's factors), ``_prepare_group`` (fill
    group-kind specific defaults) and ``_step_group`` (update the parameters of one group).
    """

    _factor_names: tuple[str, ...] = ()
    #: Tells :func:`lit_lowrank.optim.build_optimizer` to pass the model, which is grouped by lowrank_param_groups.
    accepts_module = True

    def __init__(self, params: Any, defaults: dict[str, Any], *, seed: int | None) -> None:
        if isinstance(params, nn.Module):
            from lit_lowrank.optim.groups import lowrank_param_groups

            params = lowrank_param_groups(params, rank=defaults["rank"])
        # Per-parameter factor seeds derive from this and the parameter's index, and are stored in the state.
        self._base_seed = int(torch.initial_seed() if seed is None else seed)
        self._param_index: dict[Tensor, int] = {}
        self._param_names: dict[Tensor, str] = {}
        self._workspace = Workspace()
        self._grad_absmax: dict[Tensor, float] = {}
        super().__init__(params, defaults)

    # ----------------------------------------------------------------------------------------------- groups
    def _prepare_group(self, group: dict[str, Any]) -> list[dict[str, Any]]:
        """Return the group(s) to register for a user-given group (defaults filled, maybe split)."""
        return [group]

    def _check_group(self, group: dict[str, Any]) -> None:
        raise NotImplementedError

    def add_param_group(self, param_group: dict[str, Any]) -> None:
        for group in self._prepare_group(dict(param_group)):
            super().add_param_group(group)
            group = self.param_groups[-1]
            self._check_group(group)
            names = group.get("param_names")
            group_index = len(self.param_groups) - 1
            for position, param in enumerate(group["params"]):
                name = names[position] if names else f"param_groups[{group_index}]['params'][{position}]"
                self._register_param(param, name, group)

    def _register_param(self, param: Tensor, name: str, group: dict[str, Any]) -> None:
        if param.is_complex():
            raise ValueError(f"{type(self).__name__}: complex parameter {name} is not supported.")
        index = len(self._param_index)
        self._param_index[param] = index
        self._param_names[param] = name
        if group["lowrank"] and param.ndim == 2 and group["rank"] >= min(param.shape):
            self._apply_full_rank_policy(param, name, group)
        if self._uses_factors(param, group):
            self.state[param]["seed"] = derive_seed(self._base_seed, index)

    def _apply_full_rank_policy(self, param: Tensor, name: str, group: dict[str, Any]) -> None:
        owner, rank, shape = type(self).__name__, group["rank"], tuple(param.shape)
        policy = group["full_rank"]
        if policy == "error":
            raise ValueError(
                f"{owner}: rank {rank} >= min{shape} for parameter {name} of shape {shape}, so low-rank "
                f"factors would not save memory (they need (p+q)r >= pq elements). HINT: lower `rank` below "
                f"{min(shape)}, leave this tensor out of the low-rank group (`exclude=` in lowrank_param_groups), or "
                "pass full_rank='dense' to give such tensors a dense state, or full_rank='factored' to keep factors."
            )
        if policy == "dense":
            log.warning(
                "%s: %s %s has rank %d >= min(p, q): dense state (full_rank='dense').", owner, name, shape, rank
            )
        else:
            log.warning(
                "%s: %s %s has rank %d >= min(p, q): factors kept (full_rank='factored').", owner, name, shape, rank
            )

    @staticmethod
    def _uses_factors(param: Tensor, group: dict[str, Any]) -> bool:
        """True when ``param`` keeps low-rank factors; every other tensor has a dense state."""
        if not group["lowrank"] or param.ndim != 2:
            return False
        return group["rank"] < min(param.shape) or group["full_rank"] == "factored"

    def _chunk_rows(self, param: Tensor, group: dict[str, Any]) -> int:
        """Rows per chunk of this rank's block of ``param`` (the whole of it when not sharded)."""
        chunk_rows = group["chunk_rows"]
        return auto_chunk_rows(tuple(local(param).shape), param.device) if chunk_rows is None else chunk_rows

    # -------------------------------------------------------------------------------------------------- step
    def _grad_of(self, param: Tensor) -> Tensor:
        grad = param.grad
        if grad.is_sparse:
            raise RuntimeError(
                f"{type(self).__name__} does not support sparse gradients (parameter {self._param_names.get(param, tuple(param.shape))}). "
                "HINT: use a dense embedding (nn.Embedding(sparse=False)) or leave it out of this optimizer."
            )
        return grad

    def _factors(self, param: Tensor, group: dict[str, Any]) -> dict[str, Any]:
        """The parameter's state with its factors created on first use (left zero, right from its seed)."""
        state = self.state[param]
        if self._factor_names[0] not in state:
            seed = state.setdefault("seed", derive_seed(self._base_seed, self._param_index[param]))
            pairs = init_factor_pairs(
                tuple(param.shape),
                group["rank"],
                seed,
                len(self._factor_names) // 2,
                factor_dtype(param.dtype),
                param.device,
            )
            shards = RowShards.of(param)
            if shards is not None:  # FSDP2: left factors split by rows like the parameter, right ones replicated
                pairs = [(shards.rows_of(left), right) for left, right in pairs]
            flat = [factor for pair in pairs for factor in pair]
            state.update(zip(self._factor_names, flat))
            state.setdefault("step", 0)
        return state

    @torch.no_grad()
    def step(self, closure: Any = None) -> Any:
        """Perform one optimization step. ``closure`` re-evaluates the model and returns the loss (optional).

        A parameter whose gradient holds a NaN or an infinity is skipped: it, its state and its step count stay
        as they were, and its ``skipped_steps`` count (see :meth:`skipped_steps`) goes up by one.
        """
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        stepped = [[param for param in group["params"] if param.grad is not None] for group in self.param_groups]
        finite = self._finite(sum(stepped, []))
        for group, params in zip(self.param_groups, stepped):
            for param in params:
                if not finite[param]:
                    state = self.state[param]
                    state["skipped_steps"] = state.get("skipped_steps", 0) + 1
            self._step_group(group, [param for param in params if finite[param]])
        return loss

    def _finite(self, params: list[Tensor]) -> dict[Tensor, bool]:
        """Whether each gradient is finite, read on the host once per step (nothing to wait for on a CPU).

        One ``aminmax`` per gradient (a read pass; NaN propagates into both, inf into one; ~0.1 ns per entry on
        CPU, 15x faster than an inf-norm) and one device-to-host copy of the flags (and of each gradient's local
        ``max |g|``, kept in ``self._grad_absmax`` for the step) for the whole step, like
        ``torch.amp.GradScaler``'s skip decision. Under FSDP2 a non-finite entry in any rank's shard skips the
        parameter on every rank.
        """
        self._grad_absmax = {}
        if not params:
            return {}
        if params[0].device.type == "meta":  # shape-only runs (memory estimates) have no values to check
            return dict.fromkeys(params, True)
        # max |g| per gradient: NaN if the gradient holds a NaN, inf if an infinity (amax propagates NaN)
        absmax = torch.stack([torch.stack(torch.aminmax(local(self._grad_of(param)))) for param in params])
        absmax = absmax.double().abs_().amax(dim=1)  # float64 holds any float dtype's values
        group = process_group(params)
        if group is not None:  # FSDP2: a non-finite entry in any rank's shard skips the parameter on every rank
            bad = torch.isfinite(absmax).logical_not_().to(torch.int32)
            all_reduce_(bad, group, op=dist.ReduceOp.MAX)
            absmax = absmax.masked_fill_(bad.bool(), math.inf)
        values = absmax.tolist()  # the step's one host read; the local max |g| serves LoRAPreAdamW's CPU path
        self._grad_absmax = dict(zip(params, values))
        return {param: math.isfinite(value) for param, value in zip(params, values)}

    def skipped_steps(self) -> int:
        """Parameter updates skipped so far because of a non-finite gradient (summed over parameters; kept in
        the state, so it survives a checkpoint). :class:`~lit_lowrank.callbacks.OptimizerStateMonitor` logs it."""
        return sum(int(state.get("skipped_steps", 0)) for state in self.state.values())

    def _step_group(self, group: dict[str, Any], params: list[Tensor]) -> None:
        """Update ``params``: the group's parameters that have a finite gradient."""
        raise NotImplementedError

    def _adamw_step(self, group: dict[str, Any], params: list[Tensor]) -> None:
        """Plain AdamW with the group's lr, betas, eps and weight_decay (torch.optim.AdamW's foreach arithmetic).

        The moments are float32 for 16-bit parameters (float64 for float64 ones), like the factors: the update
        is computed on a float32 copy of the parameter and rounded back once, so bf16 training keeps fp32 state.
        """
        by_device_dtype: dict[tuple[torch.device, torch.dtype], list[Tensor]] = defaultdict(list)
        for param in params:
            by_device_dtype[(param.device, param.dtype)].append(param)
        beta1, beta2 = group["betas"]
        for (_, param_dtype), same_kind in by_device_dtype.items():
            dtype = factor_dtype(param_dtype)
            states = [self.state[param] for param in same_kind]
            for param, state in zip(same_kind, states):
                if "exp_avg" not in state:
                    state["step"] = 0
                    state["exp_avg"] = torch.zeros_like(param, dtype=dtype, memory_format=torch.preserve_format)
                    state["exp_avg_sq"] = torch.zeros_like(param, dtype=dtype, memory_format=torch.preserve_format)
                state["step"] += 1
            grads = [self._grad_of(param) for param in same_kind]
            values = same_kind if dtype == param_dtype else [param.detach().to(dtype) for param in same_kind]
            adamw_foreach_update_(
                values,
                grads if dtype == param_dtype else [grad.to(dtype) for grad in grads],
                [state["exp_avg"] for state in states],
                [state["exp_avg_sq"] for state in states],
                [state["step"] for state in states],
                lr=group["lr"],
                beta1=beta1,
                beta2=beta2,
                eps=group["eps"],
                weight_decay=group["weight_decay"],
            )
            if values is not same_kind:
                torch._foreach_copy_([param.detach() for param in same_kind], values)

    # ------------------------------------------------------------------------------------------ state & I/O
    def __getstate__(self) -> dict[str, Any]:
        # torch.optim.Optimizer pickles (and deep-copies) only defaults, state and param_groups.
        return {
            **super().__getstate__(),
            "_base_seed": self._base_seed,
            "_param_index": self._param_index,
            "_param_names": self._param_names,
            "use_triton": getattr(self, "use_triton", "auto"),
        }

    def __setstate__(self, state: dict[str, Any]) -> None:
        super().__setstate__(state)
        self._workspace = Workspace()
        self._grad_absmax = {}

    def state_bytes(self) -> StateBytes:
        """Exact bytes of all state tensors, per group and split into low-rank factors vs dense state.

        Step counters and seeds are Python ints, so per ``p x q`` matrix the factored state is exactly the
        factors: ``2 (p + q) r`` elements (LoRA-Pre Adam) or ``(p + q) r`` (LoRA-Pre Muon), versus ``2 p q`` for
        AdamW. Scratch buffers are not state and are not counted. Under FSDP2 the bytes are this rank's:
        its rows of the left factors and of dense state, plus the replicated right factors.
        """
        per_group, factors, dense = [], 0, 0
        for group in self.param_groups:
            group_bytes = 0
            for param in group["params"]:
                for key, value in self.state.get(param, {}).items():
                    if isinstance(value, Tensor):
                        nbytes = local(value).nbytes
                        group_bytes += nbytes
                        if key in self._factor_names:
                            factors += nbytes
                        else:
                            dense += nbytes
            per_group.append(group_bytes)
        return StateBytes(total=factors + dense, per_group=tuple(per_group), factors=factors, dense=dense)

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Load a state saved by ``state_dict()``, keeping each state tensor's saved dtype.

        ``torch.optim.Optimizer.load_state_dict`` casts floating state to its parameter's dtype, which would
        turn the float32 factors of a bf16 model into bf16 ones; here every state tensor keeps the dtype it was
        saved with and only moves to its parameter's device.
        """
        saved_ids = [param_id for group in state_dict["param_groups"] for param_id in group["params"]]
        params = [param for group in self.param_groups for param in group["params"]]
        super().load_state_dict(state_dict)
        for param_id, param in zip(saved_ids, params):
            for key, value in state_dict["state"].get(param_id, {}).items():
                if isinstance(value, Tensor):
                    self.state[param][key] = value.to(device=param.device, copy=True)


def split_by_matrix(params: Iterable[Any]) -> tuple[list[Any], list[Any]]:
    """Split params (tensors or ``(name, tensor)`` pairs) into 2-D tensors and the rest, keeping order."""
    matrices, others = [], []
    for item in params:
        tensor = item[1] if isinstance(item, tuple) else item
        (matrices if tensor.ndim == 2 else others).append(item)
    return matrices, others
