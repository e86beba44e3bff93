"""Start a task's model from the weights of an earlier run's Lightning checkpoint (say, a pre-training run)."""
from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

#: Prefix of the model's weights in a task checkpoint's ``state_dict`` (the tasks keep the backbone as ``self.model``).
MODEL_PREFIX = "model."


def load_initial_weights(model: nn.Module, path: str) -> None:
    """Load the ``model.*`` weights of a lit_lowrank task checkpoint into ``model`` (before adapters are added).

    Every weight must match by name and shape, so that nothing is left at its random initialisation unnoticed.

    Example:
        >>> import tempfile, os
        >>> path = os.path.join(tempfile.mkdtemp(), "run.ckpt")
        >>> torch.save({"state_dict": {"model.weight": torch.ones(2, 2), "model.bias": torch.zeros(2)}}, path)
        >>> layer = nn.Linear(2, 2)
        >>> load_initial_weights(layer, path)
        >>> layer.weight.sum().item()
        4.0
        >>> load_initial_weights(nn.Linear(3, 2), path)
        Traceback (most recent call last):
        ...
        ValueError: init_weights ...run.ckpt does not fit the model: ...
    """
    file = Path(path)
    if not file.is_file():
        raise FileNotFoundError(f"init_weights {path!r} does not exist (working directory: {Path.cwd()}). HINT: run "
                                "the pre-training step first (it writes that checkpoint), or fix the path")
    checkpoint = torch.load(file, map_location="cpu", weights_only=True)
    state = checkpoint.get("state_dict") if isinstance(checkpoint, dict) else None
    weights = {k[len(MODEL_PREFIX):]: v for k, v in (state or {}).items() if k.startswith(MODEL_PREFIX)}
    if not weights:
        raise ValueError(f"init_weights {path!r} is not a lit_lowrank task checkpoint (no 'state_dict' with "
                         f"'{MODEL_PREFIX}*' weights). HINT: give a .ckpt written by `cli.py fit`")
    expected = model.state_dict()
    missing = sorted(set(expected) - set(weights))
    unexpected = sorted(set(weights) - set(expected))
    resized = sorted(k for k in set(weights) & set(expected) if weights[k].shape != expected[k].shape)
    if missing or unexpected or resized:
        details = "; ".join(f"{what}: {names[:3]}{' ...' if len(names) > 3 else ''}" for what, names in
                            (("missing", missing), ("unexpected", unexpected),
                             ("other shape", [f"{k} {tuple(weights[k].shape)} vs {tuple(expected[k].shape)}"
                                              for k in resized])) if names)
        raise ValueError(f"init_weights {path} does not fit the model: {details}. HINT: build the same architecture "
                         "as the run that wrote it (same backbone config, vocab_size included), from a run without "
                         "adapters (pre-training or full fine-tuning)")
    model.load_state_dict(weights)
