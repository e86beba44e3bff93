"""The checks every optimizer of this package runs on its hyper-parameters and param groups, in the constructor and
in ``add_param_group``, with one wording: the optimizer, the key, the value, the accepted range and a HINT.

Why so strict: a value torch would accept (``lr=inf``, ``eps=nan``, ``betas=(1.0, 0.999)``) trains for a step or two
and then fills the model with NaN, far from its cause. A tensor listed twice would be stepped twice per step.

Example:
    >>> check_number("MyOptimizer", "lr", float("inf"), NON_NEGATIVE, example=1e-3)
    Traceback (most recent call last):
    ...
    ValueError: MyOptimizer: invalid lr inf; expected a finite number in [0, inf). HINT: pass e.g. lr=0.001.
"""
from __future__ import annotations

import math
import numbers
from collections.abc import Sequence
from typing import Any, NamedTuple

from torch import Tensor


class Interval(NamedTuple):
    """An interval of real numbers; ``str()`` writes it the usual way, ``[0, 1)``."""

    low: float
    high: float
    low_open: bool = False
    high_open: bool = True

    def __contains__(self, value: float) -> bool:
        above = value > self.low if self.low_open else value >= self.low
        below = value < self.high if self.high_open else value <= self.high
        return above and below

    def __str__(self) -> str:
        return f"{'(' if self.low_open else '['}{self.low:g}, {self.high:g}{')' if self.high_open else ']'}"


NON_NEGATIVE = Interval(0.0, math.inf)
POSITIVE = Interval(0.0, math.inf, low_open=True)
BETA = Interval(0.0, 1.0)
"""Where an exponential moving average's decay lies: 1 would never move, and above 1 it diverges."""


def check_number(owner: str, name: str, value: Any, interval: Interval, *, example: Any = None,
                 hint: str | None = None, tensor_ok: bool = False) -> None:
    """Raise a ValueError unless ``value`` is a finite real number in ``interval`` (a 0-d floating tensor too, with
    ``tensor_ok``). The message names ``owner``, ``name``, the value and the interval, then ``hint`` (default: an
    ``example`` value)."""
    number = value
    if isinstance(value, Tensor):
        if not tensor_ok:  # torch's wording ("lr as a Tensor is not supported for ...")
            raise ValueError(f"{owner}: {name} as a Tensor is not supported (got {value!r}). HINT: pass a Python "
                             f"float, {name}=float(...); LR schedulers work with float learning rates.")
        if value.ndim != 0 or not value.is_floating_point():
            raise ValueError(f"{owner}: Tensor {name} must be 1-element and 0-d, floating; got shape "
                             f"{tuple(value.shape)} and dtype {value.dtype}. HINT: pass e.g. "
                             f"{name}=torch.tensor(1e-3).")
        number = float(value)  # one read of a scalar, when the optimizer is built or a group added
    is_real = isinstance(number, numbers.Real) and not isinstance(number, bool)
    if is_real and math.isfinite(number) and number in interval:
        return
    kind = "a finite number" + (" (or a 0-d float tensor)" if tensor_ok else "")
    if hint is None:
        hint = f"pass e.g. {name}={example!r}." if example is not None else f"pass a value in {interval}."
    raise ValueError(f"{owner}: invalid {name} {value!r}; expected {kind} in {interval}. HINT: {hint}")


def check_integer(owner: str, name: str, value: Any, low: int, *, example: int, none_ok: bool = False) -> None:
    """Raise a ValueError unless ``value`` is an int ``>= low`` (or None, with ``none_ok``)."""
    if none_ok and value is None:
        return
    if isinstance(value, numbers.Integral) and not isinstance(value, bool) and value >= low:
        return
    accepted = f"an int >= {low}" + (" or None" if none_ok else "")
    raise ValueError(f"{owner}: invalid {name} {value!r}; expected {accepted}. HINT: pass e.g. {name}={example!r}.")


def check_betas(owner: str, name: str, betas: Any, example: tuple[float, float] = (0.9, 0.999)) -> None:
    """Raise a ValueError unless ``betas`` is a pair of finite numbers in [0, 1)."""
    pair = isinstance(betas, (tuple, list)) and len(betas) == 2
    bad = [] if pair else [betas]
    bad += [beta for beta in (betas if pair else ()) if isinstance(beta, bool) or not isinstance(beta, numbers.Real)
            or not math.isfinite(beta) or beta not in BETA]
    if bad:
        raise ValueError(f"{owner}: invalid {name} {betas!r}; expected two finite numbers in {BETA}. HINT: pass e.g. "
                         f"{name}={example!r} (1 would never update the moment, above 1 it diverges).")


def as_tuple(value: Any) -> Any:
    """``tuple(value)`` for a list or tuple (betas as YAML gives them), else ``value`` as is, for the check to refuse
    with its message rather than ``tuple()`` with a TypeError."""
    return tuple(value) if isinstance(value, (tuple, list)) else value


def check_choice(owner: str, name: str, value: Any, choices: Sequence[Any]) -> None:
    """Raise a ValueError unless ``value`` is one of ``choices``."""
    if value not in choices:
        raise ValueError(f"{owner}: invalid {name} {value!r}; expected one of {tuple(choices)}.")


def check_flag(owner: str, name: str, value: Any) -> None:
    """Raise a TypeError unless ``value`` is True or False (a string such as ``"false"`` is truthy)."""
    if not isinstance(value, bool):
        raise TypeError(f"{owner}: invalid {name} {value!r}; expected True or False.")


def check_adam_hyperparameters(owner: str, group: dict[str, Any], prefix: str = "", tensor_lr: bool = False,
                               default_betas: tuple[float, float] = (0.9, 0.999)) -> None:
    """Check a group's (or constructor's) ``lr``, ``betas``, ``eps`` and ``weight_decay``; ``prefix`` names them
    as the constructor does (``adamw_`` for LoRAPreMuon's AdamW defaults)."""
    check_number(owner, f"{prefix}lr", group["lr"], NON_NEGATIVE, example=1e-3, tensor_ok=tensor_lr,
                 hint=f"pass a finite learning rate such as {prefix}lr=1e-3 (0 leaves the group's tensors as they "
                 "are).")
    check_betas(owner, f"{prefix}betas", group["betas"], example=default_betas)
    check_number(owner, f"{prefix}eps", group["eps"], NON_NEGATIVE, example=1e-8)
    check_number(owner, f"{prefix}weight_decay", group["weight_decay"], NON_NEGATIVE, example=0.01)


def group_tensors(group: dict[str, Any]) -> tuple[list[Tensor], list[str] | None]:
    """The tensors of a param group as the user gave it (tensors or ``(name, tensor)`` pairs, any iterable) and
    their names (``param_names``, or the pairs' names), as lists. Materialises ``group["params"]`` in place, so a
    generator is read once."""
    params = group["params"]
    if isinstance(params, set):
        raise TypeError("optimizer parameters need to be organized in ordered collections, but the ordering of "
                        "tensors in sets will change between runs. HINT: pass a list instead of a set.")
    items = group["params"] = [params] if isinstance(params, Tensor) else list(params)
    tensors = [item[1] if isinstance(item, tuple) else item for item in items]
    names = [item[0] for item in items if isinstance(item, tuple)] or group.get("param_names")
    if names and len(names) != len(tensors):  # torch's wording (Optimizer.add_param_group)
        raise ValueError("all optimizer params should be with/without names. Some param names are missing. HINT: pass "
                         "model.named_parameters() or (name, tensor) pairs for every tensor, or no names at all.")
    return tensors, (list(names) if names else None)


def refuse_duplicate_params(owner: str, existing: Sequence[dict[str, Any]], new: dict[str, Any]) -> None:
    """Raise a ValueError if a tensor of the group ``new`` (as the user gives it to ``add_param_group``) appears twice
    in it or is already in one of the ``existing`` groups (the optimizer's ``param_groups``), naming both places.

    torch only warns about a tensor listed twice in one group; such a tensor would be stepped twice per step.

    Example:
        >>> import torch
        >>> weight = torch.nn.Parameter(torch.zeros(2, 3))
        >>> refuse_duplicate_params("MyOptimizer", [{"params": [weight]}], {"params": [("w", weight)]})
        Traceback (most recent call last):
        ...
        ValueError: MyOptimizer: the tensor of shape (2, 3) at params[0] ('w') of the group being added is also at ...
    """
    seen: dict[Tensor, str] = {}
    for index, group in enumerate(existing):
        names = group.get("param_names")
        for position, tensor in enumerate(group["params"]):
            seen.setdefault(tensor, f"param_groups[{index}]['params'][{position}]" + _named(names, position))
    tensors, names = group_tensors(new)
    for position, tensor in enumerate(tensors):
        where = f"params[{position}]" + _named(names, position)
        if tensor in seen:
            raise ValueError(
                f"{owner}: the tensor of shape {tuple(tensor.shape)} at {where} of the group being added is also at "
                f"{seen[tensor]}; a tensor listed twice would be stepped twice per step. HINT: pass each tensor once "
                "(model.parameters() lists tied weights once); to move it to another group, leave it out of the first.")
        seen[tensor] = where + " of that group"


def _named(names: Sequence[str] | None, position: int) -> str:
    return f" ({names[position]!r})" if names else ""
