"""Adapters on disk in PEFT's format, and merging them into the base weights.

``save_adapter`` writes ``adapter_config.json`` + ``adapter_model.safetensors`` with PEFT's key names
(``base_model.model.<module>.lora_A.weight``), so ``peft.PeftModel.from_pretrained(base, directory)``
reproduces our outputs for Linear / Conv1D adapters. Adapters on ``nn.MultiheadAttention`` parts are saved
under their virtual names (``<attn>.q_proj.lora_A.weight`` ...): PEFT has no per-q/k/v form for them, so
such files load with :func:`~lit_lowrank.adapters.load.load_adapter` only (the safetensors metadata says
so, see :func:`~lit_lowrank.adapters.load.is_peft_loadable`). Names are relative to the module ``inject_lora``
was called on (the base model), which is what PEFT expects.
"""
from __future__ import annotations

import json
import logging
import re
from pathlib import Path

import torch
from safetensors.torch import save_file
from torch import nn

from lit_lowrank.adapters.config import PEFT_INITS
from lit_lowrank.adapters.inject import (
    INJECTION_RECORD,
    InjectionRecord,
    LoRAConfig,
    _replace,
    lora_modules,
)
from lit_lowrank.adapters.lora import LoRALinear, LoRAMultiheadAttention
from lit_lowrank.adapters.peft_meta import base_model_name, peft_task_type
from lit_lowrank.atomic import foreign_files, replacing_directory

log = logging.getLogger(__name__)

PEFT_PREFIX = "base_model.model."
#: DoRA's magnitude under PEFT's key ``<module>.lora_magnitude_vector`` (in a saved file; in memory PEFT adds
#: ``.default.weight``).
MAGNITUDE = "lora_magnitude_vector"
#: ``init_lora_weights`` written for our inits that PEFT names too.
PEFT_INIT_NAMES = {name: peft_value for peft_value, name in PEFT_INITS.items()}
CONFIG_NAME = "adapter_config.json"
WEIGHTS_NAME = "adapter_model.safetensors"
#: safetensors metadata key: "false" when the file holds adapters PEFT cannot place (nn.MultiheadAttention parts).
PEFT_LOADABLE_KEY = "peft_loadable"


def find_injection_root(model: nn.Module) -> tuple[nn.Module, str]:
    """The module ``inject_lora`` was called on (``model`` or a descendant) and its name inside ``model``."""
    for name, module in model.named_modules():
        if isinstance(module.__dict__.get(INJECTION_RECORD), InjectionRecord):
            return module, name
    if next(lora_modules(model), None) is None:
        raise ValueError(f"{type(model).__name__} has no LoRA adapters. "
                         "HINT: call inject_lora(model, LoRAConfig(...)) first.")
    return model, ""


def _record(root: nn.Module) -> InjectionRecord:
    record = root.__dict__.get(INJECTION_RECORD)
    if record is not None:
        return record
    # Adapters without a record (e.g. built by hand): derive the shared hyper-parameters from them.
    first = next(module for _, module in lora_modules(root))
    config = LoRAConfig(r=first.r, alpha=first.alpha, rslora=first.rslora, target_modules="all-linear",
                        dora=getattr(first, "use_dora", False))
    return InjectionRecord(config, adapted=[name for name, _ in lora_modules(root)])


def _dora_flag(root: nn.Module) -> bool:
    """Whether the adapters are DoRA adapters; adapter_config.json has one ``use_dora`` for all of them."""
    kinds = {name: bool(getattr(module, "use_dora", False)) for name, module in lora_modules(root)}
    if len(set(kinds.values())) > 1:
        dora = next(name for name, flag in kinds.items() if flag)
        plain = next(name for name, flag in kinds.items() if not flag)
        raise ValueError(f"the model mixes DoRA adapters (e.g. {dora!r}) with plain LoRA ones (e.g. {plain!r}); "
                         "PEFT's adapter_config.json has one use_dora for all. HINT: inject one kind only.")
    return any(kinds.values())


def _export_patterns(root: nn.Module, config: LoRAConfig) -> tuple[dict, dict]:
    """``rank_pattern`` / ``alpha_pattern`` that give every adapter its own rank and alpha under PEFT's rule: the
    config's patterns, after an exact entry for each adapter they do not describe (made by hand, or changed)."""
    ranks, alphas = {}, {}
    for name, adapter in lora_modules(root):
        exact = re.escape(name)
        if config.rank_for(name) != adapter.r:
            ranks[exact] = adapter.r
        if config.alpha_for(name) != adapter.alpha:
            alphas[exact] = adapter.alpha
    return {**ranks, **(config.rank_pattern or {})}, {**alphas, **(config.alpha_pattern or {})}


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
        if getattr(adapter, "use_dora", False):  # PEFT's key: no ".weight"
            state[f"{PEFT_PREFIX}{name}.{MAGNITUDE}"] = _full_cpu(adapter.lora_magnitude_vector)
    for module_name in record.modules_to_save:
        for param_name, param in root.get_submodule(module_name).named_parameters():
            state[f"{PEFT_PREFIX}{module_name}.{param_name}"] = _full_cpu(param)
    return state


def peft_config_dict(model: nn.Module, base_model_name_or_path: str | None = None) -> dict:
    """The ``adapter_config.json`` content PEFT's ``LoraConfig`` reads for this model's adapters.

    ``base_model_name_or_path`` and ``task_type`` describe the model that was adapted (see
    :func:`~lit_lowrank.adapters.peft_meta.base_model_name`), so ``peft.AutoPeftModelFor...`` can rebuild it.
    """
    root, _ = find_injection_root(model)
    record = _record(root)
    config = record.config
    transposed = any(getattr(m, "fan_in_fan_out", False) for _, m in lora_modules(root))
    rank_pattern, alpha_pattern = _export_patterns(root, config)
    return {
        "peft_type": "LORA",
        "task_type": peft_task_type(root),
        "base_model_name_or_path": base_model_name(root, base_model_name_or_path),
        "r": config.r,
        "lora_alpha": config.alpha,
        "lora_dropout": config.dropout,
        "target_modules": sorted(name for name, _ in lora_modules(root)),
        "exclude_modules": None,
        "use_rslora": config.rslora,
        # PEFT knows only its own init names; the weights are loaded over any init anyway.
        "init_lora_weights": PEFT_INIT_NAMES.get(config.init, True),
        "fan_in_fan_out": transposed,
        "bias": "none",
        "modules_to_save": list(record.modules_to_save) or None,
        "rank_pattern": rank_pattern,
        "alpha_pattern": alpha_pattern,
        # target_modules holds full names, which PEFT never filters by layer: these only say what was asked for
        "layers_to_transform": config.layers_to_transform,
        "layers_pattern": config.layers_pattern,
        "use_dora": _dora_flag(root),
        "inference_mode": True,
    }


def save_adapter(model: nn.Module, directory: str | Path, base_model_name_or_path: str | None = None) -> Path:
    """Write the adapters of ``model`` to ``directory`` in PEFT's format (safetensors, never pickles).

    ``base_model_name_or_path`` is written for models that do not record their source (built from a config,
    timm, open_clip); a transformers model loaded with ``from_pretrained`` writes where it was loaded from.
    Under FSDP2 call it on every rank (the shards are gathered); only global rank 0 writes.

    ``directory`` is written all or nothing: into a hidden sibling first, swapped in only when complete, so an error
    or a kill midway leaves the previous adapter loadable. It is replaced as a whole, but only when it is new, empty
    or holds nothing but ``adapter_config.json`` / ``adapter_model.safetensors`` (an older adapter); a folder with
    any other file (a merged model, a README, files of yours) is refused with a ValueError, never cleared.

    Example:
        >>> import tempfile, torch.nn as nn
        >>> from lit_lowrank import LoRAConfig, inject_lora
        >>> net = inject_lora(nn.Sequential(nn.Linear(8, 8)), LoRAConfig(r=2, target_modules=["0"]))
        >>> out = save_adapter(net, tempfile.mkdtemp())
        >>> sorted(p.name for p in out.iterdir())
        ['adapter_config.json', 'adapter_model.safetensors']
    """
    check_adapter_folder(directory)  # on every rank before the gather, so that all ranks stop together
    state = adapter_state_dict(model)
    config = peft_config_dict(model, base_model_name_or_path)
    directory = Path(directory)
    if torch.distributed.is_available() and torch.distributed.is_initialized() and torch.distributed.get_rank() != 0:
        return directory
    root, _ = find_injection_root(model)
    attention = any(isinstance(module, LoRAMultiheadAttention) for module in root.modules())
    metadata = {"format": "pt", "lora_init": _record(root).config.init, PEFT_LOADABLE_KEY: str(not attention).lower()}
    with replacing_directory(directory) as staging:
        save_file(state, str(staging / WEIGHTS_NAME), metadata=metadata)
        (staging / CONFIG_NAME).write_text(json.dumps(config, indent=2) + "\n")
    return directory


def check_adapter_folder(directory: str | Path) -> None:
    """Raise ValueError unless ``save_adapter`` may replace ``directory`` as a whole: it must be new, empty or hold
    only an adapter's two files.

    Example:
        >>> import tempfile
        >>> folder = Path(tempfile.mkdtemp())
        >>> _ = (folder / "config.json").write_text("{}")
        >>> check_adapter_folder(folder)
        Traceback (most recent call last):
        ...
        ValueError: ... holds files other than an adapter's: ['config.json']. save_adapter replaces ...
    """
    foreign = foreign_files(directory, ours=[CONFIG_NAME, WEIGHTS_NAME])
    if foreign:
        shown = foreign[:8] + ([f"... {len(foreign) - 8} more"] if len(foreign) > 8 else [])
        raise ValueError(f"{directory} holds files other than an adapter's: {shown}. save_adapter replaces the "
                         f"folder as a whole and would delete them. HINT: save into a new or empty folder (or one "
                         "holding only an older adapter), or delete those files first.")


def _wrappers(model: nn.Module) -> list[tuple[str, LoRALinear | LoRAMultiheadAttention]]:
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
    quantized = [name for name, module in wrappers if _is_quantized(getattr(module, "base_layer", None))]
    if quantized:  # a 4/8-bit weight cannot take an fp32 delta in place
        raise ValueError(f"merge_lora: the base layer of adapter {quantized[0]!r} is quantized (bitsandbytes), so "
                         "the adapter cannot be added to its weight in place. HINT: lit_lowrank.export_merged(model, "
                         "directory) dequantizes, merges and saves a plain model (the model itself is left as it is).")
    for _, module in wrappers:
        module.merge()
    if unload:
        for name, module in wrappers:
            if name:
                _replace(model, name, module.base_layer)
        for module in model.modules():
            module.__dict__.pop(INJECTION_RECORD, None)
    return model


def _is_quantized(layer: nn.Module | None) -> bool:
    """A bitsandbytes 4-bit or 8-bit layer (its weight is packed or int8, with its own quantization state)."""
    weight = getattr(layer, "weight", None)
    return weight is not None and (getattr(weight, "quant_state", None) is not None or weight.dtype == torch.int8
                                   or type(layer).__module__.startswith("bitsandbytes"))


def unmerge_lora(model: nn.Module) -> nn.Module:
    """Undo :func:`merge_lora` (without ``unload``) so the adapters train again."""
    wrappers = _wrappers(model)
    unmerged = [name for name, module in wrappers if not module.merged]
    if unmerged:
        raise ValueError(f"adapter {unmerged[0]!r} is not merged; nothing to unmerge")
    for _, module in wrappers:
        module.unmerge()
    return model
