"""What every optimizer of this package does the same way with its state: the dtype it computes and keeps state
in, its byte count, and a ``load_state_dict`` that keeps the saved dtypes."""
from __future__ import annotations

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
