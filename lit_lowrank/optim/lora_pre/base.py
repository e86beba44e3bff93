"""What LoRAPreAdamW and LoRAPreMuon share: param-group handling, the full-rank policy, per-parameter seeds,
a plain AdamW path for non-matrix tensors and exact state accounting (torch's contracts, loading state included:
:mod:`lit_lowrank.optim.torch_contract`)."""

from __future__ import annotations

import logging
from collections import defaultdict
from collections.abc import Iterable, Iterator
from typing import Any

import torch
from torch import Tensor, nn

from lit_lowrank.optim.adamw import adamw_foreach_update_, adamw_masked_update_
from lit_lowrank.optim.lora_pre.batch import MatrixBatch, batch_limit, split
from lit_lowrank.optim.lora_pre.factors import Workspace, derive_seed, init_factor_pairs
from lit_lowrank.optim.lora_pre.hyperparameters import check_seed
from lit_lowrank.optim.lora_pre.skips import SkipDecisions, device_count, host_count
from lit_lowrank.optim.sharding import RowShards, is_sharded, local
from lit_lowrank.optim.state import StateBytes, compute_dtype, tensor_bytes
from lit_lowrank.optim.torch_contract import TorchContractOptimizer
from lit_lowrank.optim.validation import group_tensors, refuse_duplicate_params

log = logging.getLogger(__name__)


class LowRankOptimizerBase(SkipDecisions, TorchContractOptimizer):
    """Shared machinery of the LoRA-Pre optimizers (not meant to be used directly).

    Subclasses define ``_factor_names`` (the state keys of one parameter's factors), ``_prepare_group`` (fill
    group-kind specific defaults) and ``_step_group`` (update the parameters of one group).

    Non-finite gradients skip their parameter (see :meth:`step`) in one of two ways, chosen per step:

    - on the host (CPU parameters): one read of every gradient's finite flag per step, Python int step counts,
      the step's scalars from the host; a skipped parameter is simply not updated. On a CPU there is nothing to
      wait for, and this is the fastest path.
    - on the device (parameters on an accelerator): per-parameter 0-d bool flags that never leave the device,
      step counts (and ``skipped_steps``) as 0-d float32 device tensors counting up by the flag, and updates whose
      writes are masked by it, so nothing is read on the host. Every stepped parameter then holds both counters.

    ``_device_side_skip`` (private; ``None`` by default, set it on an instance or a subclass) forces the choice:
    ``True`` runs the device path on CPU tensors too (the tests do), ``False`` the host path on accelerators.
    Shape-only (meta) tensors always take the host path. Either path loads the other's checkpoints: counters
    are converted on their first step (an int to a tensor by a fill on the device, a tensor to an int by one read).
    """

    _factor_names: tuple[str, ...] = ()
    _device_side_skip: bool | None = None
    _pickled_attributes = ("_base_seed", "_param_index", "_param_names", "use_triton", "_device_side_skip")
    #: Tells :func:`lit_lowrank.optim.build_optimizer` to pass the model, which is grouped by lowrank_param_groups.
    accepts_module = True

    def __init__(self, params: Any, defaults: dict[str, Any], *, seed: int | None) -> None:
        if params is None:  # torch's error type and wording (it would fail on list(None))
            raise TypeError(f"{type(self).__name__}: params argument given to the optimizer should be an iterable of "
                            "Tensors or dicts (or the nn.Module), but got None. HINT: pass model.parameters(), "
                            "param groups or the model.")
        if isinstance(params, nn.Module):
            from lit_lowrank.optim.lora_pre.groups import lowrank_param_groups

            params = lowrank_param_groups(params, rank=defaults["rank"])
        # Per-parameter factor seeds derive from this and the parameter's index, and are stored in the state.
        check_seed(type(self).__name__, seed)
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
        """Add a param group (the constructor adds its groups this way too).

        Every check runs before anything is added, so a refused group leaves the optimizer as it was: the group's
        hyper-parameters (:mod:`lit_lowrank.optim.validation`), a tensor listed twice or already in a group (torch
        would only warn about the first, and such a tensor would be stepped twice), complex tensors and
        ``full_rank="error"``.
        """
        owner = type(self).__name__
        group = dict(param_group)
        refuse_duplicate_params(owner, self.param_groups, group)
        groups = self._prepare_group(group)
        named_groups = []
        for offset, group in enumerate(groups):
            params, names = group_tensors(group)
            names = names or [f"param_groups[{len(self.param_groups) + offset}]['params'][{position}]"
                              for position in range(len(params))]
            candidate = {**self.defaults, **group, "params": params, "param_names": names}
            self._check_group(candidate)
            for param, name in zip(params, names):
                self._check_param(param, name, candidate)
            named_groups.append((group, names))
        for group, names in named_groups:
            super().add_param_group(group)
            for param, name in zip(self.param_groups[-1]["params"], names):
                self._register_param(param, name, self.param_groups[-1])

    def _check_param(self, param: Tensor, name: str, group: dict[str, Any]) -> None:
        """Refuse complex tensors and, with ``full_rank="error"``, matrices whose rank would save no memory."""
        owner, rank, shape = type(self).__name__, group["rank"], tuple(param.shape)
        if param.is_complex():
            raise ValueError(f"{owner}: complex parameter {name} is not supported. HINT: optimize its real and "
                             "imaginary parts as two real tensors (torch.view_as_real), or use torch.optim.AdamW.")
        if group["lowrank"] and param.ndim == 2 and rank >= min(shape) and group["full_rank"] == "error":
            raise ValueError(
                f"{owner}: rank {rank} >= min{shape} for parameter {name} of shape {shape}, so low-rank "
                f"factors would not save memory (they need (p+q)r >= pq elements). HINT: lower `rank` below "
                f"{min(shape)}, leave this tensor out of the low-rank group (`exclude=` in lowrank_param_groups), or "
                "pass full_rank='dense' to give such tensors a dense state, or full_rank='factored' to keep factors."
            )

    def _register_param(self, param: Tensor, name: str, group: dict[str, Any]) -> None:
        index = len(self._param_index)
        self._param_index[param] = index
        self._param_names[param] = name
        owner, rank, shape = type(self).__name__, group["rank"], tuple(param.shape)
        if group["lowrank"] and param.ndim == 2 and rank >= min(shape):  # "error" was refused by _check_param
            state = "dense state" if group["full_rank"] == "dense" else "factors kept"
            log.warning("%s: %s %s has rank %d >= min(p, q): %s (full_rank=%r).", owner, name, shape, rank, state,
                        group["full_rank"])
        if self._uses_factors(param, group):
            self.state[param]["seed"] = derive_seed(self._base_seed, index)

    @staticmethod
    def _uses_factors(param: Tensor, group: dict[str, Any]) -> bool:
        """True when ``param`` keeps low-rank factors; every other tensor has a dense state."""
        if not group["lowrank"] or param.ndim != 2:
            return False
        return group["rank"] < min(param.shape) or group["full_rank"] == "factored"

    def _split_factored(self, group: dict[str, Any], params: list[Tensor]) -> tuple[list[Tensor], list[Tensor]]:
        """``params`` split into those that keep factors and those with a dense state, in order (one pass)."""
        factored, dense = [], []
        for param in params:
            (factored if self._uses_factors(param, group) else dense).append(param)
        return factored, dense

    def _batches(self, group: dict[str, Any], params: list[Tensor],
                 ok: dict[Tensor, Tensor] | None) -> Iterator[MatrixBatch]:
        """The group's factored ``params`` as batches of same-shape matrices (:mod:`.batch`), factors created on
        first use and this step counted. Matrices are batched when they share their (local) shape, strides and
        dtypes, their gradients' too, their device, their FSDP2 layout and, on the host path, their step count
        (the step's scalars are then Python floats shared by the batch). The caller steps each batch and copies its
        factors back (:meth:`MatrixBatch.write_back`) before asking for the next: they share the stacks."""
        keyed: dict[tuple, list[tuple[Tensor, Tensor, Tensor]]] = defaultdict(list)
        for param in params:
            state = self._factors(param, group)
            W, grad = local(param), local(self._grad_of(param))
            count = host_count(state, "step") if ok is None else None
            keyed[(tuple(W.shape), W.stride(), W.dtype, W.device, grad.dtype, grad.stride(), count,
                   tuple(param.shape) if is_sharded(param) else None)].append((param, W, grad))
        for same in keyed.values():
            first, W = same[0][:2]
            limit = batch_limit(tuple(W.shape), W.device, group.get("chunk_rows"), self._batch_budget(group, first))
            for members in split(same, limit):
                yield self._gather(members, ok)

    def _batch_budget(self, group: dict[str, Any], param: Tensor) -> int | None:
        """Elements of ``L x p x q`` one batch of ``param``'s shape may span (None: the device's default)."""
        return None

    def _gather(self, members: list[tuple[Tensor, Tensor, Tensor]], ok: dict[Tensor, Tensor] | None) -> MatrixBatch:
        """One batch of ``(param, local param, local grad)`` triples, its step counted: +1 on the host path, +ok on
        the device (one ``_foreach_add_``)."""
        params = [member[0] for member in members]
        states = [self.state[param] for param in params]
        flags = None
        if ok is None:
            for state in states:
                state["step"] = host_count(state, "step") + 1
            step = states[0]["step"]
        else:
            counts = [device_count(state, "step", param) for state, param in zip(states, params)]
            flag_list = [ok[param] for param in params]
            torch._foreach_add_(counts, flag_list)
            step, flags = torch.stack(counts), torch.stack(flag_list)
        absmax = [self._grad_absmax.get(param) for param in params]
        return MatrixBatch.gather(
            [member[1] for member in members], [member[2] for member in members],
            [[local(state[name]) for name in self._factor_names] for state in states], step=step,
            workspace=self._workspace, ok=flags, shards=RowShards.of(params[0]),
            grad_absmax=None if None in absmax else max(absmax))

    # -------------------------------------------------------------------------------------------------- step
    def _grad_of(self, param: Tensor) -> Tensor:
        grad = param.grad
        if grad.is_sparse:
            raise RuntimeError(
                f"{type(self).__name__} does not support sparse gradients "
                f"(parameter {self._param_names.get(param, tuple(param.shape))}). "
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
                compute_dtype(param.dtype),
                param.device,
            )
            shards = RowShards.of(param)
            if shards is not None:  # FSDP2: left factors split by rows like the parameter, right ones replicated
                pairs = [(shards.rows_of(left), right) for left, right in pairs]
            flat = [factor for pair in pairs for factor in pair]
            state.update(zip(self._factor_names, flat))
        return state

    @staticmethod
    def _count_step(state: dict[str, Any], param: Tensor, ok: Tensor | None) -> int | Tensor:
        """Count this step in ``state["step"]`` and return the count: +1 on the host path (``ok`` None; the
        parameter is known to be finite), +ok on the device (its 0-d count tensor)."""
        if ok is None:
            state["step"] = host_count(state, "step") + 1
            return state["step"]
        return device_count(state, "step", param).add_(ok)

    @torch.no_grad()
    def step(self, closure: Any = None) -> Any:
        """Perform one optimization step. ``closure`` re-evaluates the model and returns the loss (optional).

        A parameter whose gradient holds a NaN, an infinity or an entry whose square would overflow its state
        (beyond :func:`~lit_lowrank.optim.state.gradient_limit`, about 9.2e18 for float32 state) is skipped: it,
        its state and its step count stay as they were, and its ``skipped_steps`` count (see :meth:`skipped_steps`)
        goes up by one. On CPU tensors the decision is read on the host (once per step); on an accelerator it stays
        on the device, and no part of the step reads anything on the host (see the class docstring).
        """
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        with self._maximizing():
            self._step_all()
        return loss

    def _step_all(self) -> None:
        stepped = [[param for param in group["params"] if param.grad is not None] for group in self.param_groups]
        params = sum(stepped, [])
        if self._skips_on_device(params):
            ok = self._finite_on_device(params)
            for group, group_params in zip(self.param_groups, stepped):
                self._step_group(group, group_params, ok)
            return
        finite = self._finite(params)
        for group, group_params in zip(self.param_groups, stepped):
            for param in group_params:
                if not finite[param]:
                    state = self.state[param]
                    state["skipped_steps"] = host_count(state, "skipped_steps") + 1
            self._step_group(group, [param for param in group_params if finite[param]], None)

    def _step_group(self, group: dict[str, Any], params: list[Tensor], ok: dict[Tensor, Tensor] | None) -> None:
        """Update ``params``: on the host path (``ok`` None) the group's parameters that have a finite gradient;
        on the device path all that have a gradient, each with its 0-d bool flag ``ok[param]``."""
        raise NotImplementedError

    def _adamw_step(self, group: dict[str, Any], params: list[Tensor], ok: dict[Tensor, Tensor] | None = None) -> None:
        """Plain AdamW with the group's lr, betas, eps and weight_decay (torch.optim.AdamW's foreach arithmetic).

        The moments are float32 for 16-bit parameters (float64 for float64 ones), like the factors: the update
        is computed on a float32 copy of the parameter and rounded back once, so bf16 training keeps fp32 state.
        With ``ok`` (the device-side skip): :func:`adamw_masked_update_` on the local shards.
        """
        by_device_dtype: dict[tuple[torch.device, torch.dtype], list[Tensor]] = defaultdict(list)
        for param in params:
            by_device_dtype[(param.device, param.dtype)].append(param)
        beta1, beta2 = group["betas"]
        hyper = dict(lr=group["lr"], beta1=beta1, beta2=beta2, eps=group["eps"], weight_decay=group["weight_decay"])
        for (_, param_dtype), same_kind in by_device_dtype.items():
            dtype = compute_dtype(param_dtype)
            states = [self.state[param] for param in same_kind]
            for param, state in zip(same_kind, states):
                if "exp_avg" not in state:
                    state["step"] = 0
                    state["exp_avg"] = torch.zeros_like(param, dtype=dtype, memory_format=torch.preserve_format)
                    state["exp_avg_sq"] = torch.zeros_like(param, dtype=dtype, memory_format=torch.preserve_format)
            if ok is not None:
                self._adamw_on_device(same_kind, states, [ok[param] for param in same_kind], dtype, hyper)
                continue
            for state in states:
                state["step"] = host_count(state, "step") + 1
            grads = [self._grad_of(param) for param in same_kind]
            values = same_kind if dtype == param_dtype else [param.detach().to(dtype) for param in same_kind]
            adamw_foreach_update_(
                values,
                grads if dtype == param_dtype else [grad.to(dtype) for grad in grads],
                [state["exp_avg"] for state in states],
                [state["exp_avg_sq"] for state in states],
                [state["step"] for state in states],
                **hyper,
            )
            if values is not same_kind:
                torch._foreach_copy_([param.detach() for param in same_kind], values)

    def _adamw_on_device(self, params: list[Tensor], states: list[dict[str, Any]], oks: list[Tensor],
                         dtype: torch.dtype, hyper: dict[str, float]) -> None:
        """The AdamW tensors of a device-side step, on their local shards (element-wise: nothing crosses ranks)."""
        ok = torch.stack(oks)
        grads = [torch.where(finite, local(self._grad_of(param)).to(dtype), 0) for param, finite in zip(params, oks)]
        local_states = [{"step": device_count(state, "step", param), "exp_avg": local(state["exp_avg"]),
                         "exp_avg_sq": local(state["exp_avg_sq"])} for param, state in zip(params, states)]
        adamw_masked_update_([local(param).detach() for param in params], grads, local_states, ok, **hyper)

    # ------------------------------------------------------------------------------------------ state & I/O
    def __setstate__(self, state: dict[str, Any]) -> None:
        super().__setstate__(state)
        self._workspace = Workspace()  # scratch buffers, not state
        self._grad_absmax = {}
        self._default_missing_residual_step()

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """``torch.optim.Optimizer.load_state_dict``; a checkpoint written before ``residual_step`` existed resumes
        with ``residual_step=False``, the first moment it was trained with (its next step is the one it would have
        taken)."""
        super().load_state_dict(state_dict)
        self._default_missing_residual_step()

    def _default_missing_residual_step(self) -> None:
        for group in self.param_groups:
            group.setdefault("residual_step", False)

    def state_bytes(self) -> StateBytes:
        """Exact bytes of all state tensors, per group and split into low-rank factors vs dense state.

        Step counters and seeds are Python ints, so per ``p x q`` matrix the factored state is exactly the
        factors: ``2 (p + q) r`` elements (LoRA-Pre Adam) or ``(p + q) r`` (LoRA-Pre Muon), versus ``2 p q`` for
        AdamW. With the device-side skip (accelerators) the two counters of each parameter, ``step`` and
        ``skipped_steps``, are 0-d float32 tensors: 8 more bytes per parameter, counted in ``dense``. Scratch
        buffers are not state and are not counted. Under FSDP2 the bytes are this rank's:
        its rows of the left factors and of dense state, plus the replicated right factors.
        """
        per_group, factors, dense = [], 0, 0
        for group in self.param_groups:
            group_bytes = 0
            for param in group["params"]:
                for key, value in self.state.get(param, {}).items():
                    if isinstance(value, Tensor):
                        nbytes = tensor_bytes(value)
                        group_bytes += nbytes
                        if key in self._factor_names:
                            factors += nbytes
                        else:
                            dense += nbytes
            per_group.append(group_bytes)
        return StateBytes(total=factors + dense, per_group=tuple(per_group), factors=factors, dense=dense)


def split_by_matrix(params: Iterable[Any]) -> tuple[list[Any], list[Any]]:
    """Split params (tensors or ``(name, tensor)`` pairs) into 2-D tensors and the rest, keeping order."""
    matrices, others = [], []
    for item in params:
        tensor = item[1] if isinstance(item, tuple) else item
        (matrices if tensor.ndim == 2 else others).append(item)
    return matrices, others
