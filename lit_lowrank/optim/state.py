"""What every optimizer of this package does the same way with its state: the dtype it computes and keeps state
in (also when a checkpoint is loaded), its byte count, and the gradient limit beyond which a step is skipped."""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from lit_lowrank.optim.sharding import local


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


def compute_dtype(*items: Tensor | torch.dtype) -> torch.dtype:
    """The dtype of solves and state for these tensors (or dtypes): float64 when any is float64, else float32
    (16-bit parameters keep fp32 state)."""
    dtype = torch.float32
    for item in items:
        dtype = torch.promote_types(dtype, item if isinstance(item, torch.dtype) else item.dtype)
    return dtype


def tensor_bytes(value: Tensor) -> int:
    """Bytes of ``value`` on this process (a DTensor counts its local shard)."""
    return local(value).nbytes


COUNTERS = ("step", "skipped_steps")
"""State keys that count steps: loaded as float32 on the parameter's device, whatever the parameter's dtype."""


def loaded_state_value(param: Tensor, key: Any, value: Tensor) -> Tensor:
    """A state tensor of a loaded ``state_dict``, as this package keeps it for ``param``: an own copy on ``param``'s
    device, floating values in the state dtype :func:`compute_dtype` of ``param`` (float32 for a bf16 or float32
    model, float64 for a float64 one), counters (:data:`COUNTERS`) as float32.

    That is torch's policy (``Optimizer._process_value_according_to_param_policy``: state follows its parameter;
    ``step`` stays float32 as for ``capturable`` optimizers), except that 16-bit parameters keep float32 state, as
    in every step of these optimizers. A float32 checkpoint thus resumes a model cast to float64, and the float32
    state of a bf16 model is not rounded to bf16.

    Example:
        >>> param = torch.zeros(2, dtype=torch.bfloat16)
        >>> loaded_state_value(param, "exp_avg", torch.zeros(2, dtype=torch.float64)).dtype
        torch.float32
        >>> loaded_state_value(param.double(), "exp_avg", torch.zeros(2)).dtype
        torch.float64
        >>> loaded_state_value(param.double(), "step", torch.tensor(3.0)).dtype
        torch.float32
    """
    if key in COUNTERS:
        return value.to(device=param.device, dtype=torch.float32, copy=True)
    if value.is_floating_point() and param.is_floating_point():
        return value.to(device=param.device, dtype=compute_dtype(param.dtype), copy=True)
    return value.to(device=param.device, copy=True)


def gradient_limit(state_dtype: torch.dtype) -> float:
    """The largest ``|gradient entry|`` the optimizers of this package step with, for state kept in ``state_dtype``;
    a gradient with a larger entry is skipped and counted, like a NaN one.

    Half the square root of the dtype's largest value (about 9.2e18 for float32 state): then ``g^2`` and every
    moving average of it stay below a quarter of that largest value, so Adam's second moment can never overflow to
    inf (which would freeze the tensor for good: ``m / sqrt(inf) = 0``). Exact overflow checks would cost a pass
    over the state; a gradient this large is garbage anyway (an fp16 overflow, a loss spike).

    Example:
        >>> f"{gradient_limit(torch.float32):.2e}", gradient_limit(torch.float32) ** 2 < torch.finfo(torch.float32).max
        ('9.22e+18', True)
    """
    return math.sqrt(torch.finfo(state_dtype).max) / 2
