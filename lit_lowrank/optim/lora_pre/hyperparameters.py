"""Validation of the hyperparameters LoRAPreAdamW and LoRAPreMuon share, with the package's checks
(:mod:`lit_lowrank.optim.validation`): errors name the optimizer, the key, the value and the accepted values."""

from __future__ import annotations

from typing import Any

from lit_lowrank.optim.validation import (
    Interval,
    check_adam_hyperparameters,
    check_choice,
    check_flag,
    check_integer,
    check_number,
)

FULL_RANK_POLICIES = ("error", "dense", "factored")
FACTOR_UPDATES = ("alternating", "jacobi")
DAMPING = Interval(0.0, 1.0, low_open=True, high_open=False)


def check_common_hyperparameters(owner: str, group: dict[str, Any], default_betas: tuple[float, float]) -> None:
    """Raise a ValueError (TypeError for a non-bool ``lowrank`` or ``maximize``) naming ``owner`` for an invalid lr,
    betas, eps, weight decay, rank, damping, factor update, full-rank policy or chunk size of a param group."""
    check_adam_hyperparameters(owner, group, default_betas=default_betas)
    check_flag(owner, "lowrank", group["lowrank"])
    check_flag(owner, "maximize", group["maximize"])
    check_integer(owner, "rank", group["rank"], 1, example=16)
    check_number(owner, "damping", group["damping"], DAMPING, hint="pass e.g. damping=1e-6 (the default): it keeps "
                 "the factors' Gram matrices invertible; 0 would divide by zero at step 1.")
    check_choice(owner, "factor_update", group["factor_update"], FACTOR_UPDATES)
    check_choice(owner, "full_rank", group["full_rank"], FULL_RANK_POLICIES)
    check_integer(owner, "chunk_rows", group.get("chunk_rows"), 1, example=256, none_ok=True)


def check_seed(owner: str, seed: Any) -> None:
    """The base seed of the factors: an int, or None for ``torch.initial_seed()``."""
    check_integer(owner, "seed", seed, -(2**63), example=0, none_ok=True)
