"""The random-number states a resumed run needs to draw the same dropout masks (and main-process augmentations)
as the uninterrupted one: torch CPU, the current CUDA device, numpy and Python's ``random``.

They are kept as plain Python values and tensors so that checkpoints still load with ``weights_only=True``.
"""
from __future__ import annotations

import random
from typing import Any

import numpy as np
import torch


def collect_rng_states() -> dict[str, Any]:
    """Every global generator's state now."""
    kind, keys, pos, has_gauss, gauss = np.random.get_state()
    states = {"torch": torch.get_rng_state(), "numpy": (kind, keys.tolist(), pos, has_gauss, gauss),
              "python": random.getstate()}
    # Only an initialized CUDA can have drawn anything; asking otherwise would start it needlessly.
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        states["cuda"] = torch.cuda.get_rng_state()
    return states


def restore_rng_states(states: dict[str, Any]) -> None:
    """Set the global generators to ``states`` from :func:`collect_rng_states` (a CUDA state only if CUDA is here)."""
    torch.set_rng_state(states["torch"])
    kind, keys, pos, has_gauss, gauss = states["numpy"]
    np.random.set_state((kind, np.asarray(keys, dtype=np.uint32), pos, has_gauss, gauss))
    version, internal, gauss_next = states["python"]
    random.setstate((version, tuple(internal), gauss_next))
    if "cuda" in states and torch.cuda.is_available():
        torch.cuda.set_rng_state(states["cuda"])
