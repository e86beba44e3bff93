"""LoRA-Pro for models with LoRA adapters: the :class:`LoRAPro` optimizer (and :func:`apply_lora_pro_`, its
efficient mode as a gradient rewrite, from :mod:`lit_lowrank.optim.lora_pro.rewrite`).

Adapters are found through :func:`lit_lowrank.adapters.lora_modules` and A is paired with B through
their module, never through parameter order. Layers that share (r, shapes, dtype, device, scaling) are
stacked and solved as one batch on their device, then the results are scattered back.
The closed form itself lives in :mod:`lit_lowrank.optim.lora_pro.closed_form`, the stacking in
:mod:`lit_lowrank.optim.lora_pro.pairs`, a step's plans and which layers it skips in
:mod:`lit_lowrank.optim.lora_pro.plans`.
"""
from __future__ import annotations

import weakref
from collections import defaultdict
from collections.abc import Callable

import torch
from torch import nn

from lit_lowrank.kernels.dispatch import validate_use_triton
from lit_lowrank.optim.adamw import adamw_masked_update_
from lit_lowrank.optim.lora_pro.closed_form import (
    closed_form,
    equivalent_factors,
    equivalent_gradient,
    gram_spectrum,
    lora_pro_gradients,
)
from lit_lowrank.optim.lora_pro.pairs import (
    AdapterPair,
    adapter_pairs,
    batches,
    pairs_in_group,
    read_factors,
    write_local,
    write_rows,
)
from lit_lowrank.optim.lora_pro.plans import (
    EfficientPlan,
    FullPlan,
    OtherPlan,
    equivalent_gradient_bound,
    steppable_grads,
    within_limit,
)
from lit_lowrank.optim.lora_pro.rewrite import apply_lora_pro_
from lit_lowrank.optim.lora_pro.update import full_mode_update
from lit_lowrank.optim.sharding import RowShards, all_reduce_, local, local_part, process_group
from lit_lowrank.optim.state import StateBytes, compute_dtype, gradient_limit, tensor_bytes
from lit_lowrank.optim.torch_contract import TorchContractOptimizer
from lit_lowrank.optim.validation import (
    POSITIVE,
    Interval,
    as_tuple,
    check_adam_hyperparameters,
    check_flag,
    check_number,
    group_tensors,
    refuse_duplicate_params,
)

__all__ = ["LoRAPro", "apply_lora_pro_", "equivalent_gradient", "lora_pro_gradients"]

MODES = ("efficient", "full")


def _local_states(states: list[dict]) -> list[dict]:
    """The AdamW states with their moments as local shards (``step`` stays the same shared tensor)."""
    return [{"step": s["step"], "exp_avg": local(s["exp_avg"]), "exp_avg_sq": local(s["exp_avg_sq"])} for s in states]


class LoRAPro(TorchContractOptimizer):
    """LoRA-Pro (Wang et al., ICLR 2025): adapter updates whose weight change best matches full fine-tuning.

    Give it the model after :func:`lit_lowrank.inject_lora` (or a PEFT LoRA model); it pairs each ``lora_A`` with its
    ``lora_B`` by module.
    The adapters form the first param group, every other trainable parameter (heads, ``modules_to_save``) a second
    one stepped by plain AdamW. The math, the two modes and where we differ from the paper: ``docs/lora-pro.md``.

    Args:
        model: the module holding the adapters.
        lr, betas, eps, weight_decay: Adam(W) hyper-parameters (decoupled weight decay).
        mode: ``"efficient"`` (LoRA's memory: AdamW on the rewritten adapter gradients) or ``"full"`` (Adam moments
            of each adapted layer's m x n equivalent gradient: full fine-tuning's optimizer memory).
        damping: relative eigenvalue cut-off of the Gram pseudo-inverses.
        max_grad_norm: clip the global norm of the rewritten directions (``None``: no clipping). Clip here, not
            before ``step``: clipping must see what the optimizer uses.
        use_triton: full mode's fused kernel, ``"auto"`` / ``True`` / ``False`` as in
            :mod:`lit_lowrank.kernels.dispatch`; efficient mode has none.
        maximize: step along ``+gradient`` (per group ``maximize``), as in ``torch.optim.AdamW``.

    The optimizer is tied to its model (it pairs adapters through it; it holds only a weak reference): copy or
    pickle them together, ``copy.deepcopy((model, optimizer))``, and the copy steps the copied model exactly as the
    original steps its own. A copy of the optimizer alone steps copies of the adapters and carries a copy of the
    model only as long as something else holds it (:meth:`add_param_group` then says the model is gone).

    Every hyper-parameter must be finite and in range (:mod:`lit_lowrank.optim.validation`; ``lr`` may be a 0-d
    tensor), also in groups added later; :meth:`add_param_group` gives adapter pairs the LoRA-Pro update (gradual
    unfreezing). An adapter or tensor whose gradient is not finite, or so large that its square would overflow the
    Adam moments, is skipped and counted (:meth:`skipped_steps`; :mod:`lit_lowrank.optim.lora_pro.plans`).

    Example:
        >>> import torch, torch.nn as nn
        >>> from lit_lowrank import LoRAConfig, inject_lora
        >>> net = inject_lora(nn.Sequential(nn.Linear(8, 8), nn.ReLU(), nn.Linear(8, 2)), LoRAConfig(r=2))
        >>> opt = LoRAPro(net, lr=1e-2, mode="full")
        >>> net(torch.randn(4, 8)).square().sum().backward()
        >>> opt.step(); opt.zero_grad()
        >>> len(opt.param_groups[0]["params"])  # two adapters, A and B each
        4
    """

    #: Tells :func:`lit_lowrank.optim.build_optimizer` to pass the model, not its parameters.
    accepts_module = True
    _pickled_attributes = ("mode", "use_triton", "max_grad_norm", "pairs")

    def __init__(
        self,
        model: nn.Module,
        lr: float | torch.Tensor = 1e-3,
        betas: tuple[float, float] = (0.9, 0.999),
        eps: float = 1e-8,
        weight_decay: float = 0.0,
        mode: str = "efficient",
        damping: float = 1e-8,
        use_triton: str | bool = "auto",
        max_grad_norm: float | None = None,
        maximize: bool = False,
    ) -> None:
        if not isinstance(model, nn.Module):
            raise TypeError(
                f"LoRAPro takes the model (an nn.Module), got {type(model).__name__}. It needs the adapter modules "
                "to pair lora_A with lora_B. HINT: LoRAPro(model, lr=...), not LoRAPro(model.parameters(), ...)."
            )
        if mode not in MODES:
            raise ValueError(f"unknown LoRAPro mode={mode!r}; choose 'efficient' (LoRA's memory) or 'full' "
                             "(Adam in weight space)")
        validate_use_triton(use_triton, type(self).__name__)
        if max_grad_norm is not None:
            check_number(type(self).__name__, "max_grad_norm", max_grad_norm, POSITIVE, example=1.0,
                         hint="pass a finite norm such as max_grad_norm=1.0, or None for no clipping.")
        self.mode = mode
        self.use_triton = use_triton
        self.max_grad_norm = max_grad_norm
        defaults = dict(lr=lr, betas=betas, eps=eps, weight_decay=weight_decay, damping=damping, maximize=maximize)
        self._check_group(defaults)
        defaults["betas"] = as_tuple(betas)
        trainable = adapter_pairs(model)  # refuses adapters with one trainable factor
        if not trainable:
            raise ValueError(
                f"{type(model).__name__} has no trainable LoRA adapters. "
                "HINT: call lit_lowrank.inject_lora(model, LoRAConfig(...)) before creating LoRAPro, or give it a "
                "peft.get_peft_model(model, LoraConfig(...)) model whose adapters are trainable (not inference_mode)."
            )
        # add_param_group finds the adapter pairs of each group through the model (the constructor's groups too).
        self._model = weakref.ref(model)
        self.pairs: list[AdapterPair] = []
        adapter_ids = {id(p) for pair in trainable for p in (pair.A, pair.B)}
        others = [p for p in model.parameters() if p.requires_grad and id(p) not in adapter_ids]
        groups = [{"params": [p for pair in trainable for p in (pair.A, pair.B)]}]
        if others:
            groups.append({"params": others})
        super().__init__(groups, defaults)

    def add_param_group(self, param_group: dict) -> None:
        """Add a param group; the adapter pairs in it get LoRA-Pro's update from their first step on, exactly as if
        they had been trainable when the optimizer was built (gradual unfreezing). Other tensors get AdamW.

        Refused, leaving the optimizer as it was: an invalid hyper-parameter, a tensor listed twice or already in a
        group, a ``lora_A`` without its ``lora_B`` (or the reverse), an adapter with one trainable factor. The
        group's ``"lora_pro"`` key is set to the mode if it holds adapters (saved with the groups, checked on load).

        Example:
            >>> import torch.nn as nn
            >>> from lit_lowrank import LoRAConfig, inject_lora
            >>> net = inject_lora(nn.Sequential(nn.Linear(8, 8), nn.ReLU(), nn.Linear(8, 2)), LoRAConfig(r=2))
            >>> late = net.get_submodule("2").requires_grad_(False)  # frozen for now
            >>> opt = LoRAPro(net, lr=1e-2)
            >>> _ = late.lora_A.requires_grad_(), late.lora_B.requires_grad_()
            >>> opt.add_param_group({"params": [late.lora_A, late.lora_B], "lr": 5e-3})
            >>> [pair.name for pair in opt.pairs], opt.param_groups[1]["lora_pro"]
            (['0', '2'], 'efficient')
        """
        owner = type(self).__name__
        group = dict(param_group)
        refuse_duplicate_params(owner, self.param_groups, group)
        tensors, _ = group_tensors(group)
        self._check_group({**self.defaults, **group})
        model = self._model()
        if model is None:
            raise RuntimeError(f"{owner}.add_param_group needs the model the optimizer was built for, to pair each "
                               "lora_A with its lora_B, but it no longer exists (a copy or pickle of the optimizer "
                               "alone keeps none). HINT: copy or pickle the model with it, copy.deepcopy((model, "
                               "optimizer)), or build a new LoRAPro(model).")
        pairs = pairs_in_group(model, tensors)
        group["lora_pro"] = self.mode if pairs else None
        if "lr" not in group and isinstance(self.defaults["lr"], torch.Tensor):
            # An own lr tensor per group: schedulers fill each group's in place, and ReduceLROnPlateau would scale a
            # shared one once per group (torch.optim.AdamW shares it: with two groups its lr drops by factor^2).
            group["lr"] = self.defaults["lr"].clone()
        super().add_param_group(group)
        self.pairs.extend(pairs)

    def _check_group(self, group: dict) -> None:
        """Refuse invalid hyper-parameters (:mod:`lit_lowrank.optim.validation`) with a ValueError that names them."""
        owner = type(self).__name__
        check_adam_hyperparameters(owner, group, tensor_lr=True)
        check_flag(owner, "maximize", group["maximize"])
        check_number(owner, "damping", group["damping"], Interval(0.0, 1.0), example=1e-8,
                     hint="pass a small relative cut-off such as damping=1e-8 (at 1 every eigenvalue is cut).")
        decay = float(group["lr"]) * group["weight_decay"]
        if self.mode == "full" and decay > 1.0:
            raise ValueError(
                f"{owner}: lr * weight_decay = {decay:g} > 1 in full mode, which scales A and B by "
                "sqrt(1 - lr * weight_decay) each step. HINT: lower weight_decay below 1 / lr "
                f"({1.0 / float(group['lr']):g}).")

    @torch.no_grad()
    def step(self, closure: Callable[[], torch.Tensor] | None = None) -> torch.Tensor | None:
        """One optimizer step; ``closure`` re-evaluates the loss (run with gradients enabled)."""
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        with self._maximizing():
            self._step_all()
        return loss

    def _step_all(self) -> None:
        group_of = {p: index for index, group in enumerate(self.param_groups) for p in group["params"]}
        for pair in self.pairs:
            if group_of.get(pair.A) != group_of.get(pair.B):
                raise ValueError(f"lora_A and lora_B of adapter {pair.name!r} must be in the same param group")
        stepped = [pair for pair in self.pairs
                   if pair.A in group_of and (pair.A.grad is not None or pair.B.grad is not None)]
        # First every direction (adapters: LoRA-Pro's rewrite; other parameters: their gradients), so that
        # clipping can see the rewritten quantities; then the updates.
        plans = []
        for batch in batches(stepped, extra_key=lambda pair: group_of[pair.A]):
            group = self.param_groups[group_of[batch[0].A]]
            plans.append(self._full_plan(batch, group) if self.mode == "full" else self._efficient_plan(batch, group))
        adapter_params = {p for pair in self.pairs for p in (pair.A, pair.B)}
        others = []
        for group in self.param_groups:
            by_kind: dict[tuple, list[torch.Tensor]] = defaultdict(list)
            for p in group["params"]:
                if p.grad is not None and p not in adapter_params:
                    by_kind[(p.device, compute_dtype(p))].append(p)
            others.extend(OtherPlan(params, group, *steppable_grads(params)) for params in by_kind.values())
        if self.max_grad_norm is not None and (plans or others):
            self._clip_(plans, others)
        for plan in plans:
            self._apply_full(plan) if self.mode == "full" else self._apply_efficient(plan)
        for plan in others:
            states = [self._state(p, "exp_avg", "exp_avg_sq") for p in plan.params]
            adamw_masked_update_([local(p) for p in plan.params], plan.grads, _local_states(states), plan.ok,
                                 **self._hyper(plan.group))
        self._count_skips(plans, others)  # after the updates, which create the states

    def _clip_(self, plans: list, others: list) -> None:
        """Scale every direction by ``min(1, max_grad_norm / total_norm)``, on the device (no host sync).

        The norm is that of what the optimizer feeds its moments: ``(dA, dB)`` in efficient mode, the
        equivalent gradient ``g~`` in full mode (``||U^T V||^2 = sum((U U^T) * (V V^T))``, from the factors),
        and the gradients of the other parameters (summed over ranks when they are sharded)."""
        device = (plans[0].A if plans else others[0].params[0]).device
        adapter_sq = sum((plan.squared_norm() for plan in plans), torch.zeros((), device=device))
        other_sq = sum((torch.stack(torch._foreach_norm(plan.grads)).square().sum() for plan in others if plan.grads),
                       torch.zeros((), device=device))
        all_reduce_(other_sq, process_group(p for plan in others for p in plan.params))
        total = (adapter_sq.float() + other_sq.float()).sqrt()
        coefficient = (self.max_grad_norm / (total + 1e-6)).clamp(max=1.0)
        for plan in plans:
            plan.scale_(coefficient)
        for plan in others:
            torch._foreach_mul_(plan.grads, coefficient.to(plan.grads[0].dtype))

    def _count_skips(self, plans: list, others: list) -> None:
        """Add 1 to ``skipped_steps`` of each adapter (kept in its ``lora_A``'s state) and other parameter that was
        skipped (:mod:`lit_lowrank.optim.lora_pro.plans`), on the device."""
        for params, ok in [([pair.A for pair in plan.batch], plan.ok) for plan in plans] + [
                (plan.params, plan.ok) for plan in others]:
            states = [self._state(p) for p in params]
            torch._foreach_add_([s["skipped_steps"] for s in states], list((~ok).to(torch.float32).unbind()))

    def skipped_steps(self) -> int:
        """Updates skipped so far because of non-finite or too large gradients (one per adapter or other parameter
        and step; :mod:`lit_lowrank.optim.lora_pro.plans`). Kept in the state, so it survives a checkpoint. Reading it
        waits for the device."""
        counters = [s["skipped_steps"] for s in self.state.values()
                    if isinstance(s, dict) and "skipped_steps" in s]  # torch allows other entries
        return int(torch.stack(counters).sum().item()) if counters else 0

    def state_bytes(self) -> StateBytes:
        """Exact bytes of this process's state tensors, per param group (a sharded tensor counts its local rows).

        That is the Adam moments of the adapters (efficient mode) or full mode's m x n moments (kept in each
        ``lora_A``'s state), the other parameters' AdamW moments, and the 0-d step and skip counters. LoRA-Pro
        keeps no low-rank factors: ``factors`` is 0 and everything is ``dense``.

        Example:
            >>> import torch.nn as nn
            >>> from lit_lowrank import LoRAConfig, inject_lora
            >>> net = inject_lora(nn.Sequential(nn.Linear(8, 6)), LoRAConfig(r=2, target_modules=["0"]))
            >>> opt = LoRAPro(net, mode="full")
            >>> net(torch.randn(4, 8)).sum().backward()
            >>> opt.step()
            >>> opt.state_bytes()  # two 6 x 8 fp32 moments and two 4-byte counters, in lora_A's state
            StateBytes(total=392, per_group=(392,), factors=0, dense=392)
        """
        per_group = tuple(
            sum(tensor_bytes(value) for param in group["params"] for value in self.state.get(param, {}).values()
                if torch.is_tensor(value))
            for group in self.param_groups
        )
        return StateBytes(total=sum(per_group), per_group=per_group, factors=0, dense=sum(per_group))

    def _state(self, param: torch.Tensor, *moments: str) -> dict:
        """The parameter's state; its ``moments`` are shaped like it and follow its sharding (DTensor)."""
        state = self.state[param]
        if not state:
            dtype = compute_dtype(param)
            state["step"] = torch.zeros((), dtype=torch.float32, device=param.device)
            # Updates skipped for non-finite or too large gradients, counted on the device (read by skipped_steps()).
            state["skipped_steps"] = torch.zeros((), dtype=torch.float32, device=param.device)
            for key in moments:
                state[key] = torch.zeros_like(param, dtype=dtype, memory_format=torch.contiguous_format)
        return state

    def _weight_state(self, pair: AdapterPair, shards: RowShards | None) -> dict:
        """``lora_A``'s state with full mode's m x n moments of the adapted weight. Under FSDP2 they are a DTensor
        split by rows like ``lora_B`` (and the weight), so a rank allocates and updates only its rows; a
        distributed checkpoint then saves and reshards them like any sharded state."""
        state = self._state(pair.A)
        if "weight_exp_avg" not in state:
            m, n, dtype = pair.B.shape[0], pair.A.shape[1], compute_dtype(pair.A)
            for key in ("weight_exp_avg", "weight_exp_avg_sq"):
                state[key] = (shards.zeros(n, dtype) if shards
                              else torch.zeros((m, n), dtype=dtype, device=pair.A.device))
            # lora_B's state stays empty but present: torch's distributed checkpoint (strict by default, as under
            # Lightning's ModelParallelStrategy) refuses to load a state without an entry for every trainable parameter.
            self.state.setdefault(pair.B, {})
        return state

    def _hyper(self, group: dict) -> dict:
        beta1, beta2 = group["betas"]
        return dict(lr=group["lr"], beta1=beta1, beta2=beta2, eps=group["eps"], weight_decay=group["weight_decay"])

    def _efficient_plan(self, batch: list[AdapterPair], group: dict) -> EfficientPlan:
        stack = read_factors(batch)
        A, B_t, grad_A, grad_B_t = stack.in_compute_dtype()
        # (dA, dB) stay in the compute dtype: rounding them to bf16 before Adam would waste the fp32 solve.
        dA, dB_t = closed_form(gram_spectrum(A, B_t, group["damping"]), A, B_t, grad_A, grad_B_t, batch[0].scaling)
        limit = gradient_limit(A.dtype)  # what enters the moments must square without overflow
        ok = stack.ok & within_limit(dA, limit) & within_limit(dB_t, limit)
        skipped = ~ok.view(-1, 1, 1)
        return EfficientPlan(batch, group, ok, dA.masked_fill_(skipped, 0), dB_t.masked_fill_(skipped, 0), A)

    def _apply_efficient(self, plan: EfficientPlan) -> None:
        params = [pair.A for pair in plan.batch] + [pair.B for pair in plan.batch]
        states = [self._state(p, "exp_avg", "exp_avg_sq") for p in params]
        directions = list(plan.dA.unbind()) + [d.mT for d in plan.dB_t.unbind()]
        directions = [local_part(d, like=p) for d, p in zip(directions, params)]
        adamw_masked_update_([local(p) for p in params], directions, _local_states(states),
                             torch.cat([plan.ok, plan.ok]), **self._hyper(plan.group))

    def _full_plan(self, batch: list[AdapterPair], group: dict) -> FullPlan:
        stack = read_factors(batch)
        A, B_t, grad_A, grad_B_t = stack.in_compute_dtype()
        spectrum = gram_spectrum(A, B_t, group["damping"])
        U_t, V = equivalent_factors(spectrum, A, B_t, grad_A, grad_B_t, batch[0].scaling)
        ok = stack.ok & (equivalent_gradient_bound(U_t, V) <= gradient_limit(A.dtype))  # g~ must square in the moments
        skipped = ~ok.view(-1, 1, 1)
        return FullPlan(batch, group, ok, A, B_t, spectrum, U_t.masked_fill_(skipped, 0), V.masked_fill_(skipped, 0))

    def _apply_full(self, plan: FullPlan) -> None:
        batch, A, B_t = plan.batch, plan.A, plan.B_t
        # Layers of a batch share shapes and mesh, so one split describes all their rows.
        shards = RowShards.of(batch[0].B)
        states = [self._weight_state(pair, shards) for pair in batch]
        new_A, new_B_t, step = full_mode_update(
            A, B_t, plan.U_t, plan.V, [local(s["weight_exp_avg"]) for s in states],
            [local(s["weight_exp_avg_sq"]) for s in states], torch.stack([s["step"] for s in states]), plan.ok,
            scaling=batch[0].scaling, damping=plan.group["damping"], spectrum=plan.spectrum, **self._hyper(plan.group),
            use_triton=self.use_triton, shards=shards,
        )
        write_rows([p.A for p in batch], new_A)
        write_local([p.B for p in batch], new_B_t.mT)
        write_rows([s["step"] for s in states], step)

    def _check_loaded_state_dict(self, state_dict: dict) -> None:
        saved_modes = {group.get("lora_pro") for group in state_dict["param_groups"]} - {None}
        if saved_modes - {self.mode}:
            raise ValueError(
                f"this state was saved by LoRAPro(mode={saved_modes.pop()!r}) but the optimizer runs "
                f"mode={self.mode!r}; their states differ. HINT: create the optimizer with the same mode to resume."
            )

    def __getstate__(self) -> dict:
        # The model itself, not a weak reference (which cannot be pickled): copied or pickled together with the
        # optimizer, the copy pairs the copied adapters (copy and pickle share objects through their memo).
        return {**super().__getstate__(), "_model": self._model()}

    def __setstate__(self, state: dict) -> None:
        model = state.pop("_model", _KEEP)
        super().__setstate__(state)
        if model is not _KEEP:  # unpickled or copied, not load_state_dict (which passes state and groups only)
            self._model = _no_model if model is None else weakref.ref(model)


_KEEP = object()


def _no_model() -> None:
    """The weak reference of a copy whose model was gone when it was copied."""
    return None
