"""Checkpoints without the frozen base: keep what training changes, rebuild the rest from the config.

A LoRA run's checkpoint needs the adapters, ``modules_to_save``, normalisation running statistics, the optimizer
and the RNG states; the frozen base weights are rebuilt when the task is built again (pretrained weights, or a
seeded fresh model). To make sure the rebuilt base is the one the adapters were trained on, the checkpoint keeps
a fingerprint of every tensor it leaves out (float64 sum and sum of squares), compared with a 1% tolerance so that
a base kept in bf16 (``precision: bf16-true``) still matches its fp32 source, while another pretrained model or
another random initialisation does not.
"""
from __future__ import annotations

import torch
from torch import nn
from torch.nn.modules.batchnorm import _NormBase

#: Checkpoint entry of a trainable-only checkpoint: ``{"fingerprints": {state key: [sum, sum of squares]}}``.
FROZEN_BASE_KEY = "lit_lowrank_frozen_base"
_PREFIX = "model."  # LowRankTask keeps its backbone in ``self.model``
_TOLERANCE = 1e-2


def frozen_keys(task: nn.Module, state: dict) -> list[str]:
    """Keys of ``state`` (the task's state dict) that belong to the frozen backbone and never change in training.

    Example:
        >>> from lit_lowrank import LoRAConfig, inject_lora
        >>> task = nn.Module()
        >>> task.model = inject_lora(nn.Sequential(nn.Linear(4, 4), nn.BatchNorm1d(4)),
        ...                          LoRAConfig(r=2, target_modules=["0"]))
        >>> frozen_keys(task, task.state_dict())
        ['model.0.base_layer.weight', 'model.0.base_layer.bias', 'model.1.weight', 'model.1.bias']
    """
    trainable = {_PREFIX + name for name, p in task.model.named_parameters(remove_duplicate=False) if p.requires_grad}
    # BatchNorm statistics move in training even in a frozen base.
    statistics = {f"{_PREFIX}{name}.{buffer}" for name, module in task.model.named_modules()
                  if isinstance(module, _NormBase) for buffer, _ in module.named_buffers(recurse=False)}
    return [key for key in state if key.startswith(_PREFIX) and key not in trainable and key not in statistics]


def drop_frozen_base(task: nn.Module, checkpoint: dict, cache: dict) -> None:
    """Remove the frozen base from ``checkpoint["state_dict"]`` and record its fingerprint.

    ``cache`` keeps fingerprints between checkpoints of a run (recomputed when a tensor changes in place)."""
    state = checkpoint["state_dict"]
    fingerprints = {}
    for key in frozen_keys(task, state):
        tensor = state.pop(key)
        if not isinstance(tensor, torch.Tensor):
            continue
        stamp = (tensor.data_ptr(), tensor.dtype, tensor._version)
        if key not in cache or cache[key][0] != stamp:
            cache[key] = (stamp, fingerprint(tensor))
        fingerprints[key] = cache[key][1]
    checkpoint[FROZEN_BASE_KEY] = {"fingerprints": fingerprints}


def check_frozen_base(task: nn.Module, checkpoint: dict, source: str = "the checkpoint") -> set | None:
    """For a trainable-only checkpoint: the state keys it leaves out, after checking that it holds everything the
    task trains and that the task's rebuilt base is the one it was trained on. None for a full checkpoint."""
    saved = checkpoint.get(FROZEN_BASE_KEY)
    if saved is None:
        return None
    fingerprints, state, own = saved["fingerprints"], checkpoint["state_dict"], task.state_dict()
    missing = [key for key in own if key not in state and key not in fingerprints]
    if missing:
        raise ValueError(
            f"{source} holds only trainable tensors and lacks {len(missing)} that this {type(task).__name__} "
            f"trains, e.g. {missing[0]!r}: it was saved from a model with other adapters or modules_to_save. "
            "HINT: build the task with the LoRA settings (r, target_modules, modules_to_save) of the run that "
            "saved it.")
    unknown = [key for key in fingerprints if key not in own]
    changed = [key for key in fingerprints if key in own and not _same(fingerprints[key], fingerprint(own[key]))]
    if unknown or changed:
        example = f"{unknown[0]!r} is not in this model" if unknown else f"{changed[0]!r} has other values"
        raise ValueError(
            f"{source} holds only trainable tensors, and the frozen base weights of this {type(task).__name__} are "
            f"not the ones it was trained on ({len(unknown) + len(changed)} differ; {example}). HINT: build the same "
            "backbone (same pretrained weights; a backbone built from a config needs the run's seed set before the "
            "task is built, e.g. seed_everything in the YAML), or train with checkpoint_trainable_only: false to "
            "save the base too.")
    return set(fingerprints)


@torch.no_grad()
def fingerprint(tensor: torch.Tensor) -> list[float]:
    """``[sum, sum of squares]`` of a tensor in float64, computed in chunks (no full-size float64 copy).

    Example:
        >>> fingerprint(torch.tensor([1.0, -2.0, 3.0]))
        [2.0, 14.0]
    """
    total = squares = 0.0
    for chunk in tensor.detach().reshape(-1).split(1 << 24):
        chunk = chunk.double()
        total += chunk.sum().item()
        squares += chunk.square().sum().item()
    return [total, squares]


def _same(saved: list, current: list) -> bool:
    (s1, q1), (s2, q2) = saved, current
    scale = max(abs(q1), abs(q2))
    return (abs(q1 - q2) <= _TOLERANCE * scale + 1e-12
            and abs(s1 - s2) <= _TOLERANCE * max(scale**0.5, abs(s1), abs(s2)) + 1e-12)
