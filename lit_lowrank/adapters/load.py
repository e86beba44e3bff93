"""Loading an adapter directory (ours or PEFT's) into a model, all or nothing.

The files are read and validated first, then checked against the model (layer names, shapes, scaling, the
tensors of ``modules_to_save``); only when everything fits is the model touched (adapters injected, tensors
copied). A failed load leaves the model exactly as it was, and every error names the file it is about.
"""
from __future__ import annotations

import json
import re
from contextlib import nullcontext
from dataclasses import dataclass, field
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import load_file
from torch import nn

from lit_lowrank.adapters.inject import LoRAConfig, adaptable_layers, inject_lora, lora_modules
from lit_lowrank.adapters.lora import LoRAAdapter, LoRAMultiheadAttention, Mergeable
from lit_lowrank.adapters.patterns import name_matches
from lit_lowrank.adapters.peft_io import CONFIG_NAME, PEFT_LOADABLE_KEY, PEFT_PREFIX, WEIGHTS_NAME

_PAIR_KEY = re.compile(r"(?P<module>.+)\.lora_(?P<side>[AB])(?:\.default)?\.weight")
#: DoRA's magnitude: PEFT saves ``<module>.lora_magnitude_vector`` (side "M" of the pair).
_MAGNITUDE_KEY = re.compile(r"(?P<module>.+)\.lora_magnitude_vector(?:\.default)?(?:\.weight)?")
_UNSUPPORTED_PEFT = ("lora_bias", "use_qalora", "use_bdlora", "target_parameters", "trainable_token_indices",
                     "layer_replication")
_ATTRIBUTES = {"A": "lora_A", "B": "lora_B", "M": "lora_magnitude_vector"}
#: Heads PEFT's task types train fully without listing them in modules_to_save.
_IMPLIED_TO_SAVE = {"SEQ_CLS": ["classifier", "score"], "TOKEN_CLS": ["classifier", "score"],
                    "QUESTION_ANS": ["qa_outputs"]}


@dataclass
class AdapterFiles:
    """A validated adapter directory: its config, adapter pairs by module name and other tensors by key.

    Example:
        >>> files = AdapterFiles(Path("adapter"), {"r": 4, "lora_alpha": 8, "task_type": "SEQ_CLS"})
        >>> files.scaling, files.save_entries(), files.weights_path.name
        (2.0, ['classifier', 'score'], 'adapter_model.safetensors')
    """

    directory: Path
    config: dict
    pairs: dict[str, dict[str, torch.Tensor]] = field(default_factory=dict)  # sides "A", "B" (and DoRA's "M")
    others: dict[str, torch.Tensor] = field(default_factory=dict)

    @property
    def config_path(self) -> Path:
        return self.directory / CONFIG_NAME

    @property
    def weights_path(self) -> Path:
        return self.directory / WEIGHTS_NAME

    @property
    def scaling(self) -> float:
        """The scaling of an adapter without a ``rank_pattern`` / ``alpha_pattern`` entry."""
        return self.lora_config().scaling

    @property
    def dora(self) -> bool:
        return bool(self.config.get("use_dora"))

    def lora_config(self, **changes) -> LoRAConfig:
        """The file's ``r``, ``lora_alpha``, patterns, ``use_rslora`` and ``use_dora`` as a LoRAConfig: PEFT's
        per-layer rank and scaling rules in one place."""
        config = self.config
        return LoRAConfig(r=config["r"], alpha=config["lora_alpha"], rslora=bool(config.get("use_rslora", False)),
                          rank_pattern=config.get("rank_pattern") or None,
                          alpha_pattern=config.get("alpha_pattern") or None, dora=self.dora, **changes)

    def save_entries(self) -> list[str]:
        """``modules_to_save`` of the config plus the heads its PEFT task type trains implicitly."""
        return list(self.config.get("modules_to_save") or []) + _IMPLIED_TO_SAVE.get(self.config.get("task_type"), [])


def _read_config(path: Path) -> dict:
    try:
        config = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise ValueError(f"{path} is not valid JSON ({error}). HINT: re-export the adapter, "
                         "or repair the file.") from None
    if not isinstance(config, dict):
        raise ValueError(f"{path} holds a JSON {type(config).__name__}, not an object with 'r', 'lora_alpha', ... "
                         "HINT: re-export the adapter with save_adapter or peft's save_pretrained.")
    if config.get("peft_type", "LORA") != "LORA":
        raise ValueError(f"{path} is a {config['peft_type']} adapter; only LORA adapters can be loaded")
    used = [key for key in _UNSUPPORTED_PEFT if config.get(key)]
    if used:
        raise ValueError(f"{path} uses PEFT features lit_lowrank does not implement: {used}")
    missing = [key for key in ("r", "lora_alpha") if key not in config]
    if missing:
        raise ValueError(f"{path} has no {missing} entry; the adapter's scaling depends on it. "
                         "HINT: add it (the rank and alpha the adapter was trained with), or re-export the adapter.")
    rank, alpha = config["r"], config["lora_alpha"]
    if isinstance(rank, bool) or not isinstance(rank, int) or rank <= 0:
        raise ValueError(f"{path}: 'r' must be a positive integer, got {rank!r}")
    if isinstance(alpha, bool) or not isinstance(alpha, (int, float)) or not alpha > 0:
        raise ValueError(f"{path}: 'lora_alpha' must be a positive number, got {alpha!r}")
    dropout = config.get("lora_dropout") or 0.0
    if isinstance(dropout, bool) or not isinstance(dropout, (int, float)) or not 0.0 <= dropout < 1.0:
        raise ValueError(f"{path}: 'lora_dropout' must be a number in [0, 1), got {dropout!r}")
    for key in ("rank_pattern", "alpha_pattern"):
        try:
            LoRAConfig(**{key: config.get(key) or None})
        except ValueError as error:
            raise ValueError(f"{path}: {error}") from None
    to_save = config.get("modules_to_save")
    if to_save is not None and not (isinstance(to_save, list) and all(isinstance(n, str) for n in to_save)):
        raise ValueError(f"{path}: 'modules_to_save' must be null or a list of module names, got {to_save!r}")
    return config


def _read_weights(path: Path) -> dict[str, torch.Tensor]:
    try:
        return load_file(str(path))
    except Exception as error:  # safetensors raises its own SafetensorError, without the file name
        raise ValueError(f"{path} is not a readable safetensors file ({type(error).__name__}: {error}). "
                         "HINT: the file is damaged or incomplete; re-export the adapter.") from None


def read_adapter(directory: str | Path) -> AdapterFiles:
    """Read and validate ``adapter_config.json`` and ``adapter_model.safetensors`` without touching a model.

    Example:
        >>> import tempfile, torch.nn as nn
        >>> from lit_lowrank import LoRAConfig, inject_lora, save_adapter
        >>> out = save_adapter(inject_lora(nn.Sequential(nn.Linear(8, 8)), LoRAConfig(r=2, target_modules=["0"])),
        ...                    tempfile.mkdtemp())
        >>> files = read_adapter(out)
        >>> sorted(files.pairs), files.config["r"], files.scaling
        (['0'], 2, 8.0)
    """
    files = AdapterFiles(Path(directory), {})
    for path in (files.config_path, files.weights_path):
        if not path.is_file():
            raise FileNotFoundError(f"{path} not found: an adapter directory holds {CONFIG_NAME} and {WEIGHTS_NAME}")
    files.config = _read_config(files.config_path)
    for key, tensor in _read_weights(files.weights_path).items():
        name = key[len(PEFT_PREFIX):] if key.startswith(PEFT_PREFIX) else key
        match, magnitude = _PAIR_KEY.fullmatch(name), _MAGNITUDE_KEY.fullmatch(name)
        if match:
            files.pairs.setdefault(match["module"], {})[match["side"]] = tensor
        elif magnitude:
            files.pairs.setdefault(magnitude["module"], {})["M"] = tensor
        elif ".lora_" in name:
            raise ValueError(f"{files.weights_path} holds {key!r}, an adapter kind lit_lowrank does not implement")
        else:
            files.others[name] = tensor
    if not files.pairs:
        raise ValueError(f"{files.weights_path} holds no LoRA weights (keys '<module>.lora_A.weight' / "
                         "'<module>.lora_B.weight'). HINT: is this the right directory?")
    for name, pair in files.pairs.items():
        missing = [side for side in "AB" if side not in pair]
        if missing:
            raise ValueError(f"{files.weights_path}: adapter {name!r} has no lora_{missing[0]} tensor; "
                             "the file is incomplete")
        if ("M" in pair) != files.dora:
            raise ValueError(
                f"{files.weights_path}: adapter {name!r} " + ("has no lora_magnitude_vector, and "
                f"{files.config_path} says use_dora: true" if files.dora else "holds a DoRA lora_magnitude_vector, "
                f"and {files.config_path} does not say use_dora: true") + ". HINT: re-export the adapter; the "
                "config and the weights belong to different adapters.")
    return files


def is_peft_loadable(directory: str | Path) -> bool:
    """Whether ``peft.PeftModel.from_pretrained`` can load this adapter: False when it holds adapters on
    ``nn.MultiheadAttention`` parts (q/k/v of a packed projection), which only :func:`load_adapter` places.

    Example:
        >>> import tempfile, torch.nn as nn
        >>> from lit_lowrank import LoRAConfig, inject_lora, save_adapter
        >>> linear = inject_lora(nn.Sequential(nn.Linear(8, 8)), LoRAConfig(r=2, target_modules=["0"]))
        >>> attention = inject_lora(nn.Sequential(nn.MultiheadAttention(8, 2)), LoRAConfig(r=2, target_modules=["0"]))
        >>> (is_peft_loadable(save_adapter(linear, tempfile.mkdtemp())),
        ...  is_peft_loadable(save_adapter(attention, tempfile.mkdtemp())))
        (True, False)
    """
    path = Path(directory) / WEIGHTS_NAME
    try:
        with safe_open(str(path), framework="pt") as handle:
            metadata = handle.metadata() or {}
    except FileNotFoundError:
        raise FileNotFoundError(f"{path} not found: an adapter directory holds {CONFIG_NAME} and "
                                f"{WEIGHTS_NAME}") from None
    except Exception as error:
        raise ValueError(f"{path} is not a readable safetensors file ({type(error).__name__}: {error})") from None
    return metadata.get(PEFT_LOADABLE_KEY, "true") != "false"  # files written by PEFT itself have no such key


@dataclass
class _Plan:
    inject: LoRAConfig | None  # adapters to inject into a model that has none
    pairs: dict[str, dict[str, torch.Tensor]]
    params: list[tuple[nn.Parameter, torch.Tensor]]  # modules_to_save: parameters resolved before any change


def _check_pair_shapes(files: AdapterFiles, name: str, want_a: tuple, want_b: tuple) -> None:
    sides = (("A", want_a), ("B", want_b)) + ((("M", (want_b[0],)),) if files.dora else ())
    for side, want in sides:
        got = tuple(files.pairs[name][side].shape)
        if got != tuple(want):
            label = "lora_magnitude_vector" if side == "M" else f"lora_{side}"
            raise ValueError(f"{files.weights_path}: adapter {name!r}: {label} has shape {got} in the file, "
                             f"{tuple(want)} in the model. HINT: load into the same base model (and rank) it "
                             "was saved from.")


def _mismatch(files: AdapterFiles, model: nn.Module, missing: list[str], unexpected: list[str]) -> ValueError:
    first = f"model adapter {missing[0]!r} has no weights in the file" if missing else (
        f"file adapter {unexpected[0]!r} has no matching adapter in {type(model).__name__}")
    return ValueError(f"{files.weights_path} does not match the model: {first} ({len(missing)} missing, "
                      f"{len(unexpected)} unexpected). HINT: load into the same base model the adapter was saved from.")


def _saved_params(files: AdapterFiles, model: nn.Module) -> list[tuple[nn.Parameter, torch.Tensor]]:
    """Resolve every non-adapter tensor to a model parameter under a ``modules_to_save`` entry, or refuse."""
    entries = files.save_entries()
    outside = [key for key in files.others
               if not any(name_matches(prefix, entries) for prefix in _module_prefixes(key))]
    if outside:
        raise ValueError(
            f"{files.weights_path} holds {len(outside)} tensor(s) outside the adapters and modules_to_save "
            f"{files.config.get('modules_to_save')!r} of {files.config_path}, e.g. {PEFT_PREFIX + outside[0]!r}: "
            "loading them would overwrite frozen base weights. HINT: add their module to modules_to_save in "
            f"{CONFIG_NAME} if they really are trained weights, or remove them from the file.")
    params = []
    for key, tensor in files.others.items():
        if any(key.startswith(name + ".") for name in files.pairs):
            raise ValueError(f"{files.weights_path} holds both an adapter and the full weight {key!r} for one layer; "
                             "lit_lowrank cannot load that combination")
        try:
            param = model.get_parameter(key)
        except AttributeError:
            raise ValueError(f"{files.weights_path}: tensor {key!r} (modules_to_save) has no parameter in "
                             f"{type(model).__name__}. HINT: load into the model the adapter was saved from.") from None
        if param.shape != tensor.shape:
            raise ValueError(f"{files.weights_path}: {key!r} has shape {tuple(tensor.shape)} in the file, "
                             f"{tuple(param.shape)} in the model (e.g. another num_labels)")
        params.append((param, tensor))
    return params


def _module_prefixes(key: str) -> list[str]:
    parts = key.split(".")[:-1]  # drop the parameter name
    return [".".join(parts[:end]) for end in range(len(parts), 0, -1)]


def _plan_fresh(files: AdapterFiles, model: nn.Module) -> _Plan:
    layers = {target.name: target for target in adaptable_layers(model)}
    unknown = sorted(set(files.pairs) - set(layers))
    if unknown:
        raise _mismatch(files, model, [], unknown)
    file_config = files.lora_config()
    for name in files.pairs:
        n_in, n_out = layers[name].shape
        rank = file_config.rank_for(name)
        _check_pair_shapes(files, name, (rank, n_in), (n_out, rank))
        if files.dora and layers[name].part:
            raise ValueError(f"{files.weights_path}: DoRA adapter {name!r} is on an nn.MultiheadAttention part, "
                             "which lit_lowrank has no DoRA for. HINT: is this the right base model?")
    params = _saved_params(files, model)
    module_names = [name for name, _ in model.named_modules() if name]
    explicit = [e for e in files.config.get("modules_to_save") or [] if any(name_matches(n, [e]) for n in module_names)]
    loaded = [e for e in files.save_entries()
              if any(name_matches(p, [e]) for key in files.others for p in _module_prefixes(key))]
    exact = "|".join(re.escape(name) for name in sorted(files.pairs))
    config = files.lora_config(
        dropout=float(files.config.get("lora_dropout") or 0.0), target_modules=f"(?:{exact})",
        modules_to_save=sorted(set(explicit + loaded)),  # never None: that would pick task heads of its own
    )
    return _Plan(config, files.pairs, params)


def _plan_existing(files: AdapterFiles, model: nn.Module) -> _Plan:
    adapters = dict(lora_modules(model))
    missing, unexpected = sorted(set(adapters) - set(files.pairs)), sorted(set(files.pairs) - set(adapters))
    if missing or unexpected:
        raise _mismatch(files, model, missing, unexpected)
    file_config = files.lora_config()
    for name, adapter in adapters.items():
        if bool(getattr(adapter, "use_dora", False)) != files.dora:
            kinds = ("DoRA", "plain LoRA") if files.dora else ("plain LoRA", "DoRA")
            raise ValueError(f"{files.config_path} holds {kinds[0]} adapters, the model's adapter {name!r} is "
                             f"{kinds[1]}. HINT: inject with dora={files.dora}, or load into a fresh model.")
        _check_pair_shapes(files, name, adapter.lora_A.shape, adapter.lora_B.shape)
        scaling = file_config.scaling_for(name)
        if abs(scaling - adapter.scaling) > 1e-12 * max(1.0, scaling):
            raise ValueError(
                f"{files.config_path}: adapter {name!r} has scaling {scaling:g} (r={file_config.rank_for(name)}, "
                f"alpha={file_config.alpha_for(name):g}), the model's is {adapter.scaling:g}. HINT: inject with the "
                "adapter's r, alpha, rslora and patterns, or load into a fresh model.")
    return _Plan(None, files.pairs, _saved_params(files, model))


def load_adapter(model: nn.Module, directory: str | Path) -> nn.Module:
    """Load an adapter saved by :func:`~lit_lowrank.adapters.save_adapter` or by PEFT into ``model`` (the base model).

    A model without adapters gets them injected exactly at the layers named in the file; a model that has
    adapters must match them (names, shapes, scaling). Adapters merged into their base weights (``merge_lora``)
    stay merged: each base weight takes the loaded delta in place of the old one, so the model computes with the
    loaded adapter and a later ``unmerge_lora`` gives back the base. Tensors other than adapters must belong to the
    file's ``modules_to_save``. Everything is checked before the model is changed: a failed load changes nothing.

    Example:
        >>> import tempfile, torch, torch.nn as nn
        >>> from lit_lowrank import LoRAConfig, inject_lora, save_adapter
        >>> net = inject_lora(nn.Sequential(nn.Linear(8, 8)), LoRAConfig(r=2, target_modules=["0"]))
        >>> _ = torch.nn.init.normal_(net[0].lora_B)
        >>> fresh = load_adapter(nn.Sequential(nn.Linear(8, 8)), save_adapter(net, tempfile.mkdtemp()))
        >>> torch.equal(fresh[0].lora_B, net[0].lora_B)
        True
    """
    files = read_adapter(directory)
    fresh = next(lora_modules(model), None) is None
    plan = _plan_fresh(files, model) if fresh else _plan_existing(files, model)
    if plan.inject is not None:
        inject_lora(model, plan.inject)  # validates fully before it changes anything
    with torch.no_grad():
        for wrapper, adapters in _by_wrapper(model).items():
            # a merged wrapper's base weight takes the new delta in place of the old one
            with wrapper.replacing_factors() if isinstance(wrapper, Mergeable) else nullcontext():
                for name, adapter in adapters:
                    for side, tensor in plan.pairs[name].items():
                        target = getattr(adapter, _ATTRIBUTES[side])
                        target.copy_(tensor.to(target.dtype))
        for param, tensor in plan.params:
            param.copy_(tensor.to(param.dtype))
    return model


def _by_wrapper(model: nn.Module) -> dict[nn.Module, list[tuple[str, LoRAAdapter]]]:
    """Every adapter, grouped under the wrapper whose base weights it merges into (LoRALinear: itself)."""
    groups: dict[nn.Module, list[tuple[str, LoRAAdapter]]] = {}
    for name, adapter in lora_modules(model):
        parent = model.get_submodule(name.rpartition(".")[0])
        owner = parent if isinstance(parent, LoRAMultiheadAttention) else adapter
        groups.setdefault(owner, []).append((name, adapter))
    return groups
