"""The ``torch.optim.Optimizer`` contracts every optimizer of this package keeps, written once in
:class:`TorchContractOptimizer`: deep copies and pickles keep the optimizer's own settings, ``load_state_dict``
honours its hooks and casts the state like torch does, and ``maximize`` works in every param group.

The contract is tested for all optimizers from ``OptimizerInfo`` entries (``tests/optim/optimizer_infos.py``).
"""
from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import torch
from torch import Tensor

from lit_lowrank.optim.state import loaded_state_value


class TorchContractOptimizer(torch.optim.Optimizer):
    """A ``torch.optim.Optimizer`` whose subclasses keep torch's contracts (not meant to be used directly).

    - **Deep copy and pickle.** torch keeps ``defaults``, ``state`` and ``param_groups`` only; the attributes named
      in ``_pickled_attributes`` are kept too, so a copy steps exactly like the original (and copying the model
      together with the optimizer, ``copy.deepcopy((model, optimizer))``, gives a copy that steps the copied model).
    - **Loading state.** ``load_state_dict`` runs torch's, so load pre-hooks may edit or replace the state dict and
      post-hooks see (and may edit) the loaded state; state tensors are cast by
      :func:`~lit_lowrank.optim.state.loaded_state_value` (torch's policy, but 16-bit models keep float32 state).
      Subclasses refuse an incompatible state dict in ``_check_loaded_state_dict``, which sees it after the hooks.
    - **maximize.** A group with ``maximize=True`` steps along ``+gradient``: the step negates those gradients in
      place and restores them, bit for bit, when it ends (negation is exact), so the update math is written once.

    Example:
        >>> import copy
        >>> from lit_lowrank.optim import LoRAPreAdamW
        >>> model = torch.nn.Linear(8, 6)
        >>> optimizer = LoRAPreAdamW(model.parameters(), rank=2, maximize=True)
        >>> model(torch.randn(4, 8)).sum().backward()
        >>> grad = model.weight.grad.clone()
        >>> optimizer.step()
        >>> torch.equal(model.weight.grad, grad)  # negated for the step only
        True
        >>> copied_model, copied = copy.deepcopy((model, optimizer))
        >>> copied.param_groups[0]["params"][0] is copied_model.weight, copied.state[copied_model.weight]["step"]
        (True, 1)
    """

    #: Instance attributes besides torch's (``defaults``, ``state``, ``param_groups``) that a copy must keep.
    _pickled_attributes: tuple[str, ...] = ()

    def __getstate__(self) -> dict[str, Any]:
        return {**super().__getstate__(), **{name: getattr(self, name) for name in self._pickled_attributes}}

    def __setstate__(self, state: dict[str, Any]) -> None:
        super().__setstate__(state)
        self.defaults.setdefault("maximize", False)  # optimizers and groups saved before maximize existed
        for group in self.param_groups:
            group.setdefault("maximize", False)

    # ------------------------------------------------------------------------------------------------ loading
    def _check_loaded_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Raise if ``state_dict`` (after the load pre-hooks) cannot be loaded into this optimizer."""

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Load a state saved by ``state_dict()``: torch's ``load_state_dict`` (hooks included), with state tensors cast
        by :func:`~lit_lowrank.optim.state.loaded_state_value` (float32 state of a bf16 model stays float32; a float32
        checkpoint loaded into a float64 model gets float64 state)."""
        saved_entries: dict[Any, dict[Any, Any]] = {}
        saved_groups: list[dict[str, Any]] = []

        def hold_back_tensors(optimizer: torch.optim.Optimizer, final: dict[str, Any]) -> dict[str, Any]:
            # Registered last, so it sees the state dict every user pre-hook made. torch would cast floating state
            # to the parameter's dtype (bf16 for a bf16 model: lossy), so the tensors skip its cast and come back
            # in put_back_tensors: each state tensor is copied once.
            self._check_loaded_state_dict(final)
            saved_groups.extend(final["param_groups"])
            state = {}
            for param_id, entry in final["state"].items():
                if isinstance(entry, dict):
                    saved_entries[param_id] = entry
                    entry = {key: value for key, value in entry.items() if not isinstance(value, Tensor)}
                state[param_id] = entry
            return {**final, "state": state}

        def put_back_tensors(optimizer: torch.optim.Optimizer) -> None:
            # Registered first, so user post-hooks see (and may edit) the state as it will be used.
            saved_ids = [param_id for group in saved_groups for param_id in group["params"]]
            params = [param for group in self.param_groups for param in group["params"]]
            param_of = dict(zip(saved_ids, params))
            for param_id, entry in saved_entries.items():
                param = param_of.get(param_id)
                if param is None:  # state of no parameter: torch keeps it as it is
                    self.state[param_id] = entry
                    continue
                loaded = self.state[param]  # the non-tensor values, as torch copied them
                self.state[param] = {key: loaded_state_value(param, key, value) if isinstance(value, Tensor)
                                     else loaded[key] for key, value in entry.items()}

        pre_hook = self.register_load_state_dict_pre_hook(hold_back_tensors)
        post_hook = self.register_load_state_dict_post_hook(put_back_tensors, prepend=True)
        try:
            super().load_state_dict(state_dict)
        finally:
            pre_hook.remove()
            post_hook.remove()

    # -------------------------------------------------------------------------------------------------- step
    @contextmanager
    def _maximizing(self) -> Iterator[None]:
        """Within this context the gradients of groups with ``maximize=True`` are negated (in place, restored after)."""
        grads = {id(param.grad): param.grad for group in self.param_groups if group.get("maximize")
                 for param in group["params"] if param.grad is not None and not param.grad.is_sparse}
        negated = list(grads.values())
        if negated:
            torch._foreach_neg_(negated)
        try:
            yield
        finally:
            if negated:
                torch._foreach_neg_(negated)
