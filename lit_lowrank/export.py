"""Deployment without lit_lowrank: the adapters folded into plain weights, saved the way the model's library loads.

:func:`export_merged` never changes the model it is given. It builds the merged state dict next to it: each adapted
weight gets ``scaling * B @ A`` added in fp32 and rounded once to the weight's dtype (what ``merge_lora`` does;
adapters already merged into their weight are taken as they are, not added twice), wrapper names disappear
(``q_proj.base_layer.weight`` -> ``q_proj.weight``) and bitsandbytes 4/8-bit weights are dequantized to the dtype of
the model's other weights, as PEFT's ``merge_and_unload`` does for a dequantized base.

- transformers models: ``save_pretrained`` (config without ``quantization_config``), so
  ``AutoModelFor....from_pretrained(directory)`` loads the merged model.
- any other ``nn.Module`` (timm, open_clip): ``<directory>/model.safetensors``, the plain model's state dict:
  ``model.load_state_dict(safetensors.torch.load_file(path))``, ``timm.create_model(name, pretrained=True,
  pretrained_cfg_overlay=dict(file=path, num_classes=N), **same_kwargs)`` or ``open_clip.load_checkpoint(model, path)``.

The folder is written all or nothing and replaced as a whole (see :func:`export_merged`).
"""
from __future__ import annotations

import copy
import json
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file
from torch import nn

from lit_lowrank.adapters.dora import DoRALinear, dora_merged_weight
from lit_lowrank.adapters.inject import lora_modules
from lit_lowrank.adapters.lora import MHA_PARTS, LoRAAdapter, LoRALinear, LoRAMultiheadAttention
from lit_lowrank.adapters.peft_io import CONFIG_NAME, find_injection_root
from lit_lowrank.atomic import foreign_files, replacing_directory

#: File written for models that are not transformers models (timm, open_clip, plain torch).
MODEL_FILE = "model.safetensors"
#: Written into every export folder, listing its files: what lets a later export replace the folder as a whole.
EXPORT_RECORD = "lit_lowrank_export.json"


def export_merged(model: nn.Module, directory: str | Path, tokenizer: Any | None = None,
                  max_shard_size: int | str | None = None) -> Path:
    """Write ``model`` with its adapters merged as a plain model of its own library; ``model`` stays as it was.

    ``model`` is the adapted model, or a lit_lowrank task (its ``model`` is exported). A model without adapters is
    exported as it is; adapters already merged (``merge_lora`` without ``unload``) are exported as the model computes
    them, not added a second time. ``tokenizer`` (anything with ``save_pretrained``) is written next to a
    transformers model; ``max_shard_size`` (e.g. ``"5GB"``) is passed to its ``save_pretrained``.
    Under FSDP2 call it on every rank (sharded tensors are gathered); only global rank 0 writes.

    ``directory`` is written all or nothing: into a hidden sibling first, swapped in only when complete, so an error
    or a kill midway leaves the previous export as it was. It is replaced as a whole, so no shard or index of an
    older export survives, but only when it is new, empty or an unchanged previous export (every file listed in its
    ``lit_lowrank_export.json``). A folder holding anything else is refused with a ValueError, never cleared: e.g. an
    ``adapter_config.json``, which transformers (with peft installed) would apply a second time on top of the merged
    weights, or files of yours.

    Example:
        >>> import tempfile, torch, torch.nn as nn
        >>> from safetensors.torch import load_file
        >>> from lit_lowrank import LoRAConfig, inject_lora
        >>> net = inject_lora(nn.Sequential(nn.Linear(4, 4)), LoRAConfig(r=2, target_modules=["0"]))
        >>> _ = nn.init.normal_(net[0].lora_B)
        >>> path = export_merged(net, tempfile.mkdtemp()) / MODEL_FILE
        >>> plain = nn.Sequential(nn.Linear(4, 4))
        >>> plain.load_state_dict(load_file(path))
        <All keys matched successfully>
        >>> x = torch.randn(2, 4)
        >>> torch.allclose(plain(x), net(x), atol=1e-6)
        True
    """
    root = _deployed_module(model)
    transformers_model = _is_transformers_model(root)
    if tokenizer is not None and not (transformers_model and hasattr(tokenizer, "save_pretrained")):
        raise ValueError(f"export_merged writes a tokenizer (one with save_pretrained) only next to a transformers "
                         f"model, not a {type(tokenizer).__name__} next to a {type(root).__name__}. "
                         "HINT: save the tokenizer yourself, or pass tokenizer=None.")
    if max_shard_size is not None and not transformers_model:
        raise ValueError(f"max_shard_size applies to transformers models; a {type(root).__name__} is written as one "
                         f"{MODEL_FILE}. HINT: pass max_shard_size=None.")
    check_export_folder(directory)  # on every rank before the gather, so that all ranks stop together
    state = merged_state_dict(root)
    directory = Path(directory)
    if torch.distributed.is_available() and torch.distributed.is_initialized() and torch.distributed.get_rank() != 0:
        return directory
    with replacing_directory(directory) as staging:
        if transformers_model:
            shards = {} if max_shard_size is None else {"max_shard_size": max_shard_size}
            _plain_transformers_model(root, state).save_pretrained(staging, **shards)
        else:
            save_file(_unshared(state), str(staging / MODEL_FILE), metadata={"format": "pt"})
        if tokenizer is not None:
            tokenizer.save_pretrained(staging)
        written = foreign_files(staging)
        record = {"written_by": "lit_lowrank.export_merged", "files": written}
        (staging / EXPORT_RECORD).write_text(json.dumps(record, indent=2) + "\n")
    return directory


def check_export_folder(directory: str | Path) -> None:
    """Raise ValueError unless ``export_merged`` may replace ``directory`` as a whole (see there).

    Example:
        >>> import tempfile
        >>> folder = Path(tempfile.mkdtemp())
        >>> check_export_folder(folder / "new")  # a new or empty folder is fine
        >>> _ = (folder / "notes.txt").write_text("mine")
        >>> check_export_folder(folder)
        Traceback (most recent call last):
        ...
        ValueError: ... holds files that are not part of a previous export_merged export: ['notes.txt'] ...
    """
    foreign = foreign_files(directory, _recorded_files(Path(directory)))
    if not foreign:
        return
    shown = foreign[:8] + ([f"... {len(foreign) - 8} more"] if len(foreign) > 8 else [])
    adapter = (f" Next to a merged model, its {CONFIG_NAME} would make transformers (with peft installed) apply the "
               "adapter a second time." if CONFIG_NAME in foreign else "")
    raise ValueError(f"{directory} holds files that are not part of a previous export_merged export: {shown} "
                     f"(no {EXPORT_RECORD} lists them). The export replaces the folder as a whole and would delete "
                     f"them.{adapter} HINT: export into a new or empty folder, or delete those files first.")


def _recorded_files(directory: Path) -> list[str]:
    """The files a previous export wrote into ``directory`` (its record among them); none without a valid record."""
    try:
        files = json.loads((directory / EXPORT_RECORD).read_text())["files"]
    except (OSError, ValueError, TypeError, KeyError):  # no record, or a damaged one: nothing counts as ours
        return []
    if not (isinstance(files, list) and all(isinstance(name, str) for name in files)):
        return []
    return [*files, EXPORT_RECORD]


def merged_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """The state dict of the plain model: adapters folded in (those already merged count once), wrapper names
    removed, quantized weights dequantized.

    Unchanged tensors are the model's own (detached, not copied); merged and dequantized ones are new.

    Example:
        >>> import torch.nn as nn
        >>> from lit_lowrank import LoRAConfig, inject_lora
        >>> net = inject_lora(nn.Sequential(nn.Linear(4, 4)), LoRAConfig(r=2, target_modules=["0"]))
        >>> sorted(merged_state_dict(net))
        ['0.bias', '0.weight']
    """
    root = _deployed_module(model)
    wrappers = _wrappers(root)
    adapter_keys = {f"{name}.{side}" for name, _ in lora_modules(root)
                    for side in ("lora_A", "lora_B", "lora_magnitude_vector")}
    dtype = _float_dtype(root)
    replaced: dict[str, torch.Tensor] = {}
    for name, module in root.named_modules():
        dense = _dequantized(name, module, dtype)
        if dense is not None:
            replaced[_join(name, "weight")] = dense
    quantized = set(replaced)
    for name, wrapper in wrappers.items():
        for key, weight, deltas in _weight_deltas(name, wrapper):
            base = replaced[key] if key in replaced else _full(weight)
            total = base.to(torch.float32, copy=True)
            for rows, delta in deltas:
                if callable(delta):  # DoRA: the merged weight is a function of the base, not base + delta
                    total[rows] = delta(total[rows])
                else:
                    total[rows] += delta.to(total.device)
            replaced[key] = total.to(base.dtype)
    state = {}
    for key, tensor in root.state_dict().items():
        if key in adapter_keys or _is_quantization_state(key, quantized):
            continue
        state[_plain_key(key, wrappers)] = replaced[key] if key in replaced else _full(tensor)
    return state


def _wrappers(root: nn.Module) -> dict[str, nn.Module]:
    return {name: module for name, module in root.named_modules()
            if isinstance(module, (LoRALinear, LoRAMultiheadAttention))}


def _deployed_module(model: nn.Module) -> nn.Module:
    try:
        return find_injection_root(model)[0]
    except ValueError:  # no adapters: a full fine-tune is exported as it is
        inner = getattr(model, "model", None)
        import lightning as L

        return inner if isinstance(model, L.LightningModule) and isinstance(inner, nn.Module) else model


def _weight_deltas(name: str, wrapper: nn.Module):
    """``(state key of a base weight, that weight, [(row slice, fp32 delta), ...])`` for one wrapper; for DoRA the
    delta is a function from the fp32 base weight to the merged one."""
    if wrapper.merged:  # merge_lora already added the deltas to the base weights the model computes with
        return
    if isinstance(wrapper, DoRALinear):
        parts = [_full(t) for t in (wrapper.lora_A, wrapper.lora_B, wrapper.lora_magnitude_vector)]

        def fold(weight: torch.Tensor) -> torch.Tensor:
            return dora_merged_weight(weight, *parts, wrapper.scaling, wrapper.fan_in_fan_out)[0]

        yield _join(name, "base_layer.weight"), wrapper.base_layer.weight, [(slice(None), fold)]
        return
    if isinstance(wrapper, LoRALinear):
        delta = _delta(wrapper)
        yield _join(name, "base_layer.weight"), wrapper.base_layer.weight, [
            (slice(None), delta.T if wrapper.fan_in_fan_out else delta)]
        return
    width, adapters = wrapper.base_layer.embed_dim, wrapper.adapters()
    packed = [(slice(i * width, (i + 1) * width), _delta(adapters[part]))
              for i, part in enumerate(MHA_PARTS[:3]) if part in adapters]
    if packed:
        yield _join(name, "base_layer.in_proj_weight"), wrapper.base_layer.in_proj_weight, packed
    if "out_proj" in adapters:
        yield (_join(name, "base_layer.out_proj.weight"), wrapper.base_layer.out_proj.weight,
               [(slice(None), _delta(adapters["out_proj"]))])


def _delta(adapter: LoRAAdapter) -> torch.Tensor:
    """``adapter.delta_weight()`` from gathered factors (FSDP2 shards them as DTensors)."""
    return (_full(adapter.lora_B).float() @ _full(adapter.lora_A).float()) * adapter.scaling


def _dequantized(name: str, module: nn.Module, dtype: torch.dtype) -> torch.Tensor | None:
    """The dense weight of a bitsandbytes 4/8-bit layer in ``dtype``; None for layers that are not quantized."""
    weight = module._parameters.get("weight")
    if weight is None or weight.is_floating_point():
        return None
    import bitsandbytes.functional as bnb_functional  # only quantized models get here

    if getattr(weight, "quant_state", None) is not None:  # 4-bit (Params4bit)
        return bnb_functional.dequantize_4bit(weight.data, weight.quant_state).to(dtype)
    scales = getattr(weight, "SCB", None)
    if scales is None:
        scales = getattr(getattr(module, "state", None), "SCB", None)
    if weight.dtype == torch.int8 and scales is not None:  # 8-bit (Int8Params): rows scaled by SCB / 127
        return bnb_functional.int8_vectorwise_dequant(weight.data, scales).to(dtype)
    raise ValueError(f"cannot dequantize the {weight.dtype} weight of {name or 'the model'} "
                     f"({type(module).__name__}): only bitsandbytes 4-bit and 8-bit layers are supported. "
                     "HINT: load the base unquantized (without quantization_config), load_adapter the trained "
                     "adapter into it and export that.")


def _is_quantization_state(key: str, quantized: set[str]) -> bool:
    # bitsandbytes stores its scales next to the weight: <layer>.weight.absmax / .quant_map / .quant_state.*
    # (4-bit) and <layer>.SCB / .weight_format (8-bit); the dense weight replaces them all.
    layer, _, leaf = key.rpartition(".")
    if leaf in ("SCB", "weight_format") and _join(layer, "weight") in quantized:
        return True
    parts = key.split(".")
    return any(".".join(parts[:end]) in quantized for end in range(1, len(parts)))


def _plain_key(key: str, wrappers: dict[str, nn.Module]) -> str:
    parts = key.split(".")
    kept = [part for i, part in enumerate(parts) if not (part == "base_layer" and ".".join(parts[:i]) in wrappers)]
    return ".".join(kept)


def _join(prefix: str, name: str) -> str:
    return f"{prefix}.{name}" if prefix else name


def _full(tensor: torch.Tensor) -> torch.Tensor:
    if hasattr(tensor, "full_tensor"):  # a DTensor shard under FSDP2 (a collective: every rank gets here)
        tensor = tensor.full_tensor()
    return tensor.detach()


def _float_dtype(model: nn.Module) -> torch.dtype:
    """The dtype the model computes in: that of its first floating-point weight outside the adapters."""
    adapters = {id(p) for _, m in lora_modules(model) for p in m.parameters(recurse=False)}
    return next((p.dtype for p in model.parameters() if p.is_floating_point() and id(p) not in adapters),
                torch.float32)


def _unshared(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    # safetensors refuses tensors that share memory (tied weights): later aliases get their own copy.
    seen, out = set(), {}
    for key, tensor in state.items():
        tensor = tensor.to("cpu").contiguous()
        pointer = (tensor.untyped_storage().data_ptr(), tensor.storage_offset())
        out[key] = tensor.clone() if pointer in seen else tensor
        seen.add(pointer)
    return out


def _is_transformers_model(model: nn.Module) -> bool:
    try:
        from transformers import PreTrainedModel
    except ImportError:
        return False
    return isinstance(model, PreTrainedModel)


def _model_class(model: nn.Module) -> type:
    """The model's own class; FSDP2's ``fully_shard`` swaps in a subclass that only works on sharded modules."""
    try:
        from torch.distributed.fsdp import FSDPModule
    except ImportError:
        return type(model)
    return next(cls for cls in type(model).__mro__ if not issubclass(cls, FSDPModule))


def _plain_transformers_model(root: nn.Module, state: dict[str, torch.Tensor]) -> nn.Module:
    """A model of ``root``'s class and config (quantization removed) holding ``state``, built without allocating."""
    config = copy.deepcopy(root.config)
    for attribute in ("quantization_config", "_pre_quantization_dtype"):
        if hasattr(config, attribute):
            delattr(config, attribute)
    if getattr(config, "_is_quantized", False):
        config._is_quantized = False
    config.dtype = _float_dtype(root)
    with torch.device("meta"):
        plain = _model_class(root)(config)
    plain.load_state_dict(state, strict=True, assign=True)
    # Buffers outside the state dict (rotary inv_freq, ...) are computed in __init__: take the model's own.
    wrappers = _wrappers(root)
    own = {_plain_key(name, wrappers): buffer for name, buffer in root.named_buffers()}
    for name, buffer in list(plain.named_buffers()):
        if buffer.is_meta:
            owner, _, leaf = name.rpartition(".")
            plain.get_submodule(owner)._buffers[leaf] = own[name]
    plain.tie_weights()
    if getattr(root, "generation_config", None) is not None:
        plain.generation_config = copy.deepcopy(root.generation_config)
    return plain
