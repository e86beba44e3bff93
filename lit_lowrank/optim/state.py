"""What every optimizer of this package does the same way with its state: the dtype it computes and keeps state
in, its byte count, and a ``load_state_dict`` that keeps the saved dtypes."""
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


def restore_saved_dtypes(optimizer: torch.optim.Optimizer, state_dict: dict[str, Any]) -> None:
    """After ``torch.optim.Optimizer.load_state_dict(state_dict)``: give every state tensor its saved dtype back.

    torch casts floating state to its parameter's dtype, which would turn the float32 state of a bf16 model (the
    LoRA-Pre factors, LoRAPro's moments) into bf16; here each state tensor is an own copy of the saved one, moved to
    its parameter's device only, so a resumed run continues bit for bit.
    """
    params = [param for group in optimizer.param_groups for param in group["params"]]
    saved_ids = [param_id for group in state_dict["param_groups"] for param_id in group["params"]]
    for param, saved_id in zip(params, saved_ids):
        for key, value in state_dict["state"].get(saved_id, {}).items():
            if isinstance(value, Tensor):
                optimizer.state[param][key] = value.to(device=param.device, copy=True)


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
