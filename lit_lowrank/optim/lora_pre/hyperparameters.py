"""Validation of the hyperparameters LoRAPreAdamW and LoRAPreMuon share, with errors that name the optimizer,
the key and the accepted values."""

from __future__ import annotations

import math
from typing import Any

from torch import Tensor

FULL_RANK_POLICIES = ("error", "dense", "factored")
FACTOR_UPDATES = ("alternating", "jacobi")


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
