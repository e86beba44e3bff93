"""Adapters on disk in PEFT's format, and merging them into the base weights.

``save_adapter`` writes ``adapter_config.json`` + ``adapter_model.safetensors`` with PEFT's key names
(``base_model.model.<module>.lora_A.weight``), so ``peft.PeftModel.from_pretrained(base, directory)``
reproduces our outputs for Linear / Conv1D adapters. Adapters on ``nn.MultiheadAttention`` parts are saved
under their virtual names (``<attn>.q_proj.lora_A.weight`` ...): PEFT has no per-q/k/v form for them, so
such files load with :func:`load_adapter` only. Names are relative to the module ``inject_lora`` was
called on (the base model), which is what PEFT expects.
"""
from __future__ import annotations

import json
import logging
import re
from pathlib import Path
from typing import Optional, Union

import torch
from safetensors.torch import load_file, save_file
from torch import nn

from lit_lowrank.adapters.inject import (
    INJECTION_RECORD,
    InjectionRecord,
    LoRAConfig,
    _replace,
    inject_lora,
    lora_modules,
)
from lit_lowrank.adapters.lora import LoRALinear, LoRAMultiheadAttention

log = logging.getLogger(__name__)

PEFT_PREFIX = "base_model.model."
CONFIG_NAME = "adapter_config.json"
WEIGHTS_NAME = "adapter_model.safetensors"
_PAIR_KEY = re.compile(r"(?P<module>.+)\.lora_(?P<side>[AB])(?:\.default)?\.weight")
_UNSUPPORTED_PEFT = ("use_dora", "lora_bias", "use_qalora", "use_bdlora")


def find_injection_root(model: nn.Module) -> tuple[nn.Module, str]:
    """The module ``inject_lora`` was called on (``model`` or a descendant) and its name inside ``model``."""
    for name, module in model.named_modules():
        if isinstance(module.__dict__.get(INJECTION_RECORD), InjectionRecord):
            return module, name
    if next(lora_modules(model), None) is None:
        raise ValueError(f"{type(model).__name__} has no LoRA adapters. HINT: call inject_lora(model, LoRAConfig(...)) first.")
    return model, ""


def _record(root: nn.Module) -> InjectionRecord:
    record = root.__dict__.get(INJECTION_RECORD)
    if record is not None:
        return record
    # Adapters without a record (e.g. built by hand): derive the shared hyper-parameters from them.
    first = next(module for _, module in lora_modules(root))
    config = LoRAConfig(r=first.r, alpha=first.alpha, rslora=first.rslora, target_modules="all-linear")
    return InjectionRecord(config, adapted=[name for name, _ in lora_modules(root)])


def _full_cpu(tensor: torch.Tensor) -> torch.Tensor:
    if hasattr(tensor, "full_tensor"):  # a DTensor shard under FSDP2: gather every rank's piece
        tensor = tensor.full_tensor()
    return tensor.detach().to("cpu").contiguous().clone()


def adapter_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """Adapter and ``modules_to_save`` tensors under PEFT's key names, gathered to full CPU tensors.

    Under a sharded strategy (FSDP2 DTensor parameters) this is a collective: call it on every rank.
    """
    root, _ = find_injection_root(model)
    record = _record(root)
    state = {}
    for name, adapter in lora_modules(root):
        state[f"{PEFT_PREFIX}{name}.lora_A.weight"] = _full_cpu(adapter.lora_A)
        state[f"{PEFT_PREFIX}{name}.lora_B.weight"] = _full_cpu(adapter.lora_B)
    for module_name in record.modules_to_save:
        for param_name, param in root.get_submodule(module_name).named_parameters():
            state[f"{PEFT_PREFIX}{module_name}.{param_name}"] = _full_cpu(param)
    return state


def peft_config_dict(model: nn.Module, base_model_name_or_path: Optional[str] = None) -> dict:
    """The ``adapter_config.json`` content PEFT's ``LoraConfig`` reads for this model's adapters."""
    root, _ = find_injection_root(model)
    record = _record(root)
    config = record.config
    transposed = any(getattr(m, "fan_in_fan_out", False) for _, m in lora_modules(root))
    return {
        "peft_type": "LORA",
        "task_type": None,
        "base_model_name_or_path": base_model_name_or_path,
        "r": config.r,
        "lora_alpha": config.alpha,
        "lora_dropout": config.dropout,
        "target_modules": sorted(name for name, _ in lora_modules(root)),
        "exclude_modules": None,
        "use_rslora": config.rslora,
        # PEFT knows only its own init names; the weights are loaded over any init anyway.
        "init_lora_weights": "gaussian" if config.init == "gaussian" else True,
        "fan_in_fan_out": transposed,
        "bias": "none",
        "modules_to_save": list(record.modules_to_save) or None,
        "rank_pattern": {},
        "alpha_pattern": {},
        "inference_mode": True,
    }


def save_adapter(model: nn.Module, directory: Union[str, Path], base_model_name_or_path: Optional[str] = None) -> Path:
    """Write the adapters of ``model`` to ``directory`` in PEFT's format (safetensors, never pickles).

    Under FSDP2 call it on every rank (the shards are gathered); only global rank 0 writes.

    Example:
        >>> import tempfile, torch.nn as nn
        >>> from lit_lowrank import LoRAConfig, inject_lora
        >>> net = inject_lora(nn.Sequential(nn.Linear(8, 8)), LoRAConfig(r=2, target_modules=["0"]))
        >>> out = save_adapter(net, tempfile.mkdtemp())
        >>> sorted(p.name for p in out.iterdir())
        ['adapter_config.json', 'adapter_model.safetensors']
    """
    state = adapter_state_dict(model)
    config = peft_config_dict(model, base_model_name_or_path)
    directory = Path(directory)
    if torch.distributed.is_available() and torch.distributed.is_initialized() and torch.distributed.get_rank() != 0:
        return directory
    directory.mkdir(parents=True, exist_ok=True)
    root, _ = find_injection_root(model)
    metadata = {"format": "pt", "lora_init": _record(root).config.init}
    save_file(state, str(directory / WEIGHTS_NAME), metadata=metadata)
    (directory / CONFIG_NAME).write_text(json.dumps(config, indent=2) + "\n")
    return directory


def _read_adapter(directory: Path) -> tuple[dict, dict[str, dict[str, torch.Tensor]], dict[str, torch.Tensor]]:
    config_path, weights_path = directory / CONFIG_NAME, directory / WEIGHTS_NAME
    for path in (config_path, weights_path):
        if not path.is_file():
            raise FileNotFoundError(f"{path} not found: an adapter directory holds {CONFIG_NAME} and {WEIGHTS_NAME}")
    config = json.loads(config_path.read_text())
    if config.get("peft_type", "LORA") != "LORA":
        raise ValueError(f"{config_path} is a {config['peft_type']} adapter; only LORA adapters can be loaded")
    used = [key for key in _UNSUPPORTED_PEFT if config.get(key)] + [
        key for key in ("rank_pattern", "alpha_pattern") if config.get(key)
    ]
    if used:
        raise ValueError(f"{config_path} uses PEFT features lit_lowrank does not implement: {used}")
    pairs: dict[str, dict[str, torch.Tensor]] = {}
    others = {}
    for key, tensor in load_file(str(weights_path)).items():
        key = key[len(PEFT_PREFIX):] if key.startswith(PEFT_PREFIX) else key
        match = _PAIR_KEY.fullmatch(key)
        if match:
            pairs.setdefault(match["module"], {})[match["side"]] = tensor
        elif ".lora_" in key:
            raise ValueError(f"{weights_path} holds {key!r}, an adapter kind lit_lowrank does not implement")
        else:
            others[key] = tensor
    return config, pairs, others


def load_adapter(model: nn.Module, directory: Union[str, Path]) -> nn.Module:
    """Load an adapter saved by :func:`save_adapter` or by PEFT into ``model`` (the base model).

    A model without adapters gets them injected first, exactly at the layers named in the file; a model
    that has adapters must match them (names, shapes, scaling), or the first mismatch is reported.

    Example:
        >>> import tempfile, torch, torch.nn as nn
        >>> from lit_lowrank import LoRAConfig, inject_lora
        >>> net = inject_lora(nn.Sequential(nn.Linear(8, 8)), LoRAConfig(r=2, target_modules=["0"]))
        >>> _ = torch.nn.init.normal_(net[0].lora_B)
        >>> fresh = load_adapter(nn.Sequential(nn.Linear(8, 8)), save_adapter(net, tempfile.mkdtemp()))
        >>> torch.equal(fresh[0].lora_B, net[0].lora_B)
        True
    """
    directory = Path(directory)
    config, pairs, others = _read_adapter(directory)
    if next(lora_modules(model), None) is None:
        exact = "|".join(re.escape(name) for name in sorted(pairs))
        inject_lora(model, LoRAConfig(
            r=int(config["r"]), alpha=float(config["lora_alpha"]), dropout=float(config.get("lora_dropout", 0.0)),
            target_modules=f"(?:{exact})", rslora=bool(config.get("use_rslora", False)),
            modules_to_save=config.get("modules_to_save") or None,
        ))
    adapters = dict(lora_modules(model))
    missing, unexpected = sorted(set(adapters) - set(pairs)), sorted(set(pairs) - set(adapters))
    if missing or unexpected:
        first = f"model adapter {missing[0]!r} has no weights in the file" if missing else (
            f"file adapter {unexpected[0]!r} has no matching adapter in {type(model).__name__}")
        raise ValueError(
            f"adapter in {directory} does not match the model: {first} ({len(missing)} missing, "
            f"{len(unexpected)} unexpected). HINT: load into the same base model the adapter was saved from."
        )
    rank, alpha = int(config["r"]), float(config["lora_alpha"])
    scaling = alpha / rank**0.5 if config.get("use_rslora", False) else alpha / rank
    for name, adapter in adapters.items():
        for side, param in (("A", adapter.lora_A), ("B", adapter.lora_B)):
            tensor = pairs[name].get(side)
            if tensor is None or tensor.shape != param.shape:
                got = None if tensor is None else tuple(tensor.shape)
                raise ValueError(f"adapter {name!r}: lora_{side} has shape {got} in the file, {tuple(param.shape)} in the model")
        if abs(scaling - adapter.scaling) > 1e-12 * max(1.0, scaling):
            raise ValueError(f"adapter {name!r}: file scaling {scaling:g} (r={rank}, alpha={alpha:g}) != model scaling "
                             f"{adapter.scaling:g}. HINT: inject with the adapter's r, alpha and rslora, or load into a fresh model.")
    targets = [(adapter.lora_A, pairs[name]["A"]) for name, adapter in adapters.items()]
    targets += [(adapter.lora_B, pairs[name]["B"]) for name, adapter in adapters.items()]
    for key, tensor in others.items():  # modules_to_save
        try:
            param = model.get_parameter(key)
        except AttributeError:
            raise ValueError(f"file tensor {key!r} (modules_to_save) has no parameter in {type(model).__name__}") from None
        if param.shape != tensor.shape:
            raise ValueError(f"{key!r}: shape {tuple(tensor.shape)} in the file, {tuple(param.shape)} in the model")
        targets.append((param, tensor))
    with torch.no_grad():  # only after every check passed, so a failed load changes nothing
        for param, tensor in targets:
            param.copy_(tensor.to(param.dtype))
    return model


def _wrappers(model: nn.Module) -> list[tuple[str, Union[LoRALinear, LoRAMultiheadAttention]]]:
    found = [(n, m) for n, m in model.named_modules() if isinstance(m, (LoRALinear, LoRAMultiheadAttention))]
    if not found:
        raise ValueError(f"{type(model).__name__} has no LoRA adapters. HINT: call inject_lora first.")
    return found


def merge_lora(model: nn.Module, unload: bool = False) -> nn.Module:
    """Fold every adapter into its base weight (fp32 delta). With ``unload=True`` the wrappers are
    removed too, leaving a plain model for deployment.

    Example:
        >>> import torch, torch.nn as nn
        >>> from lit_lowrank import LoRAConfig, inject_lora
        >>> net = inject_lora(nn.Sequential(nn.Linear(8, 8)), LoRAConfig(r=2, target_modules=["0"]))
        >>> type(merge_lora(net, unload=True)[0]).__name__
        'Linear'
    """
    wrappers = _wrappers(model)
    merged = [name for name, module in wrappers if module.merged]
    if merged:
        raise ValueError(f"adapter {merged[0]!r} is already merged; call unmerge_lora(model) first")
    for _, module in wrappers:
        module.merge()
    if unload:
        for name, module in wrappers:
            if name:
                _replace(model, name, module.base_layer)
        for module in model.modules():
            module.__dict__.pop(INJECTION_RECORD, None)
    return model


def unmerge_lora(model: nn.Module) -> nn.Module:
    """Undo :func:`merge_lora` (without ``unload``) so the adapters train again."""
    wrappers = _wrappers(model)
    unmerged = [name for name, module in wrappers if not module.merged]
    if unmerged:
        raise ValueError(f"adapter {unmerged[0]!r} is not merged; nothing to unmerge")
    for _, module in wrappers:
        module.unmerge()
    return model
