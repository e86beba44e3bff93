"""Which parameters a LoRA-Pre step skips (a NaN, an infinity or an entry beyond the gradient limit), decided on
the host or on the device, and the step and skip counters in either form (see ``LowRankOptimizerBase``)."""

from __future__ import annotations

import math
from collections import defaultdict
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor

from lit_lowrank.optim.sharding import all_reduce_, local, process_group
from lit_lowrank.optim.state import compute_dtype, gradient_limit


def device_count(state: dict[str, Any], key: str, param: Tensor) -> Tensor:
    """The counter ``state[key]`` as a 0-d float32 tensor on ``param``'s device (the device-side skip's form, like
    ``torch.optim.Adam(capturable=True)``'s step). A missing one starts at 0; a Python int (the host path's form,
    e.g. from a CPU checkpoint) becomes a tensor by a fill on the device, not a copy from the host."""
    value = state.get(key, 0)
    if not isinstance(value, Tensor):
        value = state[key] = torch.full((), float(value), dtype=torch.float32, device=param.device)
    return value


def host_count(state: dict[str, Any], key: str) -> int:
    """The counter ``state[key]`` as a Python int (0 if missing); a device-side count (0-d tensor, e.g. from a GPU
    checkpoint) is read once and kept as an int from then on."""
    value = state.get(key, 0)
    if isinstance(value, Tensor):
        value = state[key] = int(value)
    return value


class SkipDecisions:
    """The skip decision of :class:`~lit_lowrank.optim.lora_pre.base.LowRankOptimizerBase` (a mixin: it uses the
    optimizer's ``state``, ``_grad_of``, ``_device_side_skip`` and ``_grad_absmax``)."""

    def _skips_on_device(self, params: list[Tensor]) -> bool:
        """Whether this step decides its skips on the device (see the class docstring)."""
        if not params or params[0].device.type == "meta":
            return False
        if self._device_side_skip is not None:
            return self._device_side_skip
        return any(param.device.type != "cpu" for param in params)

    def _finite(self, params: list[Tensor]) -> dict[Tensor, bool]:
        """Whether each gradient can be stepped (finite, within the gradient limit: :meth:`_grad_absmaxes`), read on
        the host once per step (nothing to wait for on a CPU).

        One ``aminmax`` per gradient (cost: docs/design.md) and one device-to-host copy of the flags (and of each
        gradient's local ``max |g|``, kept in ``self._grad_absmax`` for the step) for the whole step, like
        ``torch.amp.GradScaler``'s skip decision. Under FSDP2 a refused entry in any rank's shard skips the
        parameter on every rank.
        """
        self._grad_absmax = {}
        if not params:
            return {}
        if params[0].device.type == "meta":  # shape-only runs (memory estimates) have no values to check
            return dict.fromkeys(params, True)
        values = self._grad_absmaxes(params).tolist()  # the step's one host read (also for LoRAPreAdamW's CPU path)
        self._grad_absmax = dict(zip(params, values))
        return {param: math.isfinite(value) for param, value in zip(params, values)}

    def _finite_on_device(self, params: list[Tensor]) -> dict[Tensor, Tensor]:
        """Whether each gradient can be stepped, as 0-d bool tensors on the device, with the skips counted there
        (``skipped_steps`` += not ok): nothing is read on the host. Same check as :meth:`_finite`."""
        self._grad_absmax = {}
        finite = torch.isfinite(self._grad_absmaxes(params))
        counts = [device_count(self.state[param], "skipped_steps", param) for param in params]
        torch._foreach_add_(counts, list(finite.logical_not().unbind()))
        return dict(zip(params, finite.unbind()))

    def _grad_absmaxes(self, params: list[Tensor]) -> Tensor:
        """Each gradient's local ``max |g|`` (float64, which holds any float dtype's values), or inf where the
        gradient cannot be stepped: it holds a NaN or an infinity, or an entry beyond the state dtype's
        :func:`~lit_lowrank.optim.state.gradient_limit` (its square would overflow the moments). Under FSDP2 inf on
        every rank where that holds on any rank's shard."""
        # aminmax: amax propagates NaN, and |max| or |min| is max |g|. One per gradient, the only per-tensor operation
        # of a step: faster than one _foreach_norm(inf) or _foreach_max for all (docs/design.md, "Finite checks").
        extremes = [value for param in params for value in torch.aminmax(local(self._grad_of(param)))]
        absmax = torch.stack([value.double() for value in extremes] if len({v.dtype for v in extremes}) > 1
                             else extremes).view(-1, 2).double().abs_().amax(dim=1)
        by_dtype = {dtype: gradient_limit(compute_dtype(dtype)) for dtype in {param.dtype for param in params}}
        limits = [by_dtype[param.dtype] for param in params]
        bound: float | Tensor = limits[0]
        if len(set(limits)) > 1:  # float64 tensors beside others: filled on the device, not copied from the host
            bound = torch.full_like(absmax, limits[0])
            for index, limit in enumerate(limits):
                bound[index] = limit
        refused = (absmax <= bound).logical_not_()  # NaN too
        group = process_group(params)
        if group is not None:  # FSDP2: a refused shard on any rank skips the parameter on every rank
            refused = all_reduce_(refused.to(torch.int32), group, op=dist.ReduceOp.MAX).bool()
        return absmax.masked_fill_(refused, math.inf)

    def skipped_steps(self) -> int:
        """Parameter updates skipped so far because of a non-finite or too large gradient (summed over parameters;
        kept in the state, so it survives a checkpoint). :class:`~lit_lowrank.callbacks.OptimizerStateMonitor` logs it.
        Device-side counts are read here (one read per device): a query, not part of the step."""
        counts = [state["skipped_steps"] for state in self.state.values()
                  if isinstance(state, dict) and "skipped_steps" in state]  # torch allows other entries
        by_device: dict[torch.device, list[Tensor]] = defaultdict(list)
        for count in counts:
            if isinstance(count, Tensor):
                by_device[count.device].append(count)
        on_devices = sum(int(torch.stack(same).sum().item()) for same in by_device.values())
        return on_devices + sum(int(count) for count in counts if not isinstance(count, Tensor))
