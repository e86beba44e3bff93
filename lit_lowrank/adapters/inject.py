"""``inject_lora``: choose target layers, wrap them with adapters (LoRA or DoRA), freeze the base.

The configuration, :class:`~lit_lowrank.adapters.config.LoRAConfig`, is defined in ``config.py`` and importable here.

Target names follow PEFT: ``"all-linear"`` (every Linear-like layer except the output head / classifier),
or a pattern in the one rule of :mod:`lit_lowrank.adapters.patterns` (a list of module names or suffixes, or a
regex that must match the whole name). An ``nn.MultiheadAttention`` at ``P`` offers four virtual targets
``P.q_proj``, ``P.k_proj``, ``P.v_proj`` and ``P.out_proj``; naming ``P`` itself adapts all four.
"""
from __future__ import annotations

import logging
from collections import Counter, defaultdict
from collections.abc import Iterator
from dataclasses import dataclass, field

from torch import nn

from lit_lowrank.adapters.config import LoRAConfig, pattern_value
from lit_lowrank.adapters.dora import DoRALinear
from lit_lowrank.adapters.heads import HEAD_NAMES, _is_under, head_module_names, task_heads  # noqa: F401 (HEAD_NAMES: old home)
from lit_lowrank.adapters.lora import (
    MHA_PARTS,
    LoRAAdapter,
    LoRALinear,
    LoRAMultiheadAttention,
    is_linear_like,
    linear_shape,
)
from lit_lowrank.adapters.patterns import name_matches

log = logging.getLogger(__name__)

#: Attribute on the module ``inject_lora`` was called on; ``save_adapter`` reads it back.
INJECTION_RECORD = "lora_injection"


@dataclass
class InjectionRecord:
    """What ``inject_lora`` did, kept on the model so adapters can be exported without the config."""

    config: LoRAConfig
    adapted: list[str] = field(default_factory=list)
    modules_to_save: list[str] = field(default_factory=list)


@dataclass
class _Target:
    name: str  # full name; for attention parts the virtual name "P.q_proj"
    module: nn.Module  # the Linear-like layer, or the nn.MultiheadAttention that owns the part
    part: str | None = None  # q_proj/k_proj/v_proj/out_proj for attention parts

    @property
    def owner(self) -> str:
        return self.name.rsplit(".", 1)[0] if self.part else self.name

    @property
    def shape(self) -> tuple[int, int]:
        if self.part:
            return self.module.embed_dim, self.module.embed_dim
        n_in, n_out, _ = linear_shape(self.module)
        return n_in, n_out


def lora_modules(model: nn.Module) -> Iterator[tuple[str, LoRAAdapter]]:
    """Every adapter pair in ``model`` as ``(name, module)``, in ``named_modules`` order.

    Example:
        >>> import torch.nn as nn
        >>> net = inject_lora(nn.Sequential(nn.Linear(4, 4), nn.ReLU(), nn.Linear(4, 4)),
        ...                   LoRAConfig(r=2, target_modules=["0"]))
        >>> [name for name, _ in lora_modules(net)]
        ['0']
    """
    for name, module in model.named_modules():
        if isinstance(module, LoRAAdapter):
            yield name, module


#: The pattern rule under its former name here (it lives in :mod:`lit_lowrank.adapters.patterns`).
matches = name_matches


def adaptable_layers(model: nn.Module) -> list[_Target]:
    """All Linear-like layers and attention parts that could take an adapter, in module order."""
    targets, inside_attention = [], set()
    for name, module in model.named_modules():
        if isinstance(module, nn.MultiheadAttention):
            targets.extend(_Target(f"{name}.{part}" if name else part, module, part) for part in MHA_PARTS)
            inside_attention.add(id(module.out_proj))
        elif is_linear_like(module) and id(module) not in inside_attention:
            targets.append(_Target(name, module))
    return targets


def select_targets(model: nn.Module, config: LoRAConfig) -> list[_Target]:
    """The layers ``config`` adapts in ``model``; raises with the candidate names when nothing matches."""
    candidates = adaptable_layers(model)
    spec = config.target_modules
    if spec == "default":
        raise ValueError("target_modules='default' means the backbone's default targets and is resolved by the "
                         "lit_lowrank tasks. HINT: with inject_lora, pass backbone.lora_targets or explicit names.")
    if spec == "all-linear":
        heads = head_module_names(model)
        chosen = [t for t in candidates if not _is_under(t.name, heads)]
    else:
        chosen = [t for t in candidates if name_matches(t.name, spec) or (t.part and name_matches(t.owner, spec))]
        if isinstance(spec, (list, tuple)):
            for key in spec:
                if not any(name_matches(t.name, [key]) or (t.part and name_matches(t.owner, [key])) for t in chosen):
                    log.warning("LoRA target %r matched no layer in %s", key, type(model).__name__)
    excluded = config.exclude_modules
    chosen = [t for t in chosen if not (name_matches(t.name, excluded) or name_matches(t.owner, excluded))]
    if config.transforms_some_layers:
        if isinstance(spec, str):  # "all-linear" or a regex: PEFT refuses layers_to_transform there too
            raise ValueError(f"LoRAConfig.layers_to_transform needs target_modules as a list of names, got "
                             f"{spec!r}. HINT: list the layer names, e.g. ['q_proj', 'v_proj'].")
        # PEFT filters only names matched as a suffix: a full name listed in target_modules is kept as it is
        chosen = [t for t in chosen if t.name in spec or config.in_transformed_layer(t.name)]
    if not chosen:
        raise ValueError(
            f"LoRAConfig(target_modules={spec!r}, exclude_modules={config.exclude_modules!r}"
            f"{_layers_text(config)}) matched no layer of {type(model).__name__}. {describe_candidates(candidates)}"
        )
    return chosen


def _layers_text(config: LoRAConfig) -> str:
    if not config.transforms_some_layers:
        return ""
    return f", layers_to_transform={config.layers_to_transform!r}, layers_pattern={config.layers_pattern!r}"


def describe_candidates(candidates: list[_Target], limit: int = 30) -> str:
    if not candidates:
        return "The model has no Linear, Conv1D or MultiheadAttention layer to adapt."
    suffixes = Counter(t.name.rsplit(".", 1)[-1] for t in candidates)
    listed = ", ".join(f"{suffix} (x{count})" for suffix, count in suffixes.most_common(limit))
    return (
        f"Adaptable layers by name suffix: {listed}; e.g. full name {candidates[0].name!r}. "
        "HINT: use these suffixes, a regex over full names, or 'all-linear'."
    )


def inject_lora(model: nn.Module, config: LoRAConfig) -> nn.Module:
    """Wrap the targeted layers of ``model`` with LoRA adapters in place and freeze everything else.

    Only ``lora_A``/``lora_B`` and the parameters of ``config.modules_to_save`` stay trainable; with
    ``modules_to_save=None`` that is the task heads found by :func:`~lit_lowrank.adapters.heads.task_heads`
    (logged). Nothing is changed when validation fails (unknown targets, rank too large, already injected).

    Example:
        >>> import torch, torch.nn as nn
        >>> net = nn.Sequential(nn.Linear(8, 8), nn.ReLU(), nn.Linear(8, 3))
        >>> net = inject_lora(net, LoRAConfig(r=2, target_modules=["0"], modules_to_save=["2"]))
        >>> sorted(n for n, p in net.named_parameters() if p.requires_grad)
        ['0.lora_A', '0.lora_B', '2.bias', '2.weight']
        >>> net = nn.Sequential()
        >>> net.body, net.classifier = nn.Linear(8, 8), nn.Linear(8, 3)  # a new task head: trained by default
        >>> sorted(n for n, p in inject_lora(net, LoRAConfig(r=2)).named_parameters() if p.requires_grad)
        ['body.lora_A', 'body.lora_B', 'classifier.bias', 'classifier.weight']
    """
    existing = [name for name, _ in lora_modules(model)]
    if existing:
        raise ValueError(
            f"{type(model).__name__} already has {len(existing)} LoRA adapters (e.g. {existing[0]!r}); injecting "
            "twice would stack adapters. HINT: use a fresh model, or merge_lora(model, unload=True) first."
        )
    targets = select_targets(model, config)
    _check_targets(targets, config)
    if config.modules_to_save is None:
        to_save = task_heads(model, adapted=[t.owner for t in targets])
        if to_save:
            log.info("LoRA: task heads %s are trained fully (modules_to_save=None picks them); "
                     "LoRAConfig(modules_to_save=[]) keeps them frozen", to_save)
    else:
        to_save = _resolve_modules_to_save(model, config.modules_to_save)
    _warn_unmatched_patterns(targets, config)
    if config.dropout > 0 and any(t.part for t in targets):
        log.warning("LoRA dropout=%s is not applied to nn.MultiheadAttention adapters (weight-delta form)",
                    config.dropout)

    for param in model.parameters():
        param.requires_grad_(False)
    parts_by_attention: dict[str, dict[str, tuple[int, float]]] = defaultdict(dict)
    wrapper = DoRALinear if config.dora else LoRALinear
    for target in targets:
        rank, alpha = config.rank_for(target.name), config.alpha_for(target.name)
        if target.part:
            parts_by_attention[target.owner][target.part] = (rank, alpha)
        else:
            _replace(model, target.name, wrapper(target.module, rank, alpha, config.dropout, config.rslora))
    for owner, parts in parts_by_attention.items():
        attention = model.get_submodule(owner)
        _replace(model, owner, LoRAMultiheadAttention(attention, list(parts), config.r, config.alpha, config.rslora,
                                                      part_shapes=parts))
    for _, adapter in lora_modules(model):
        if config.init != "default":
            adapter.reset_lora_parameters(config.init)
        for param in adapter.parameters(recurse=False):  # lora_A, lora_B (and DoRA's lora_magnitude_vector)
            param.requires_grad_(True)
    for name in to_save:
        for param in model.get_submodule(name).parameters():
            param.requires_grad_(True)
    record = InjectionRecord(config, adapted=[name for name, _ in lora_modules(model)], modules_to_save=to_save)
    setattr(model, INJECTION_RECORD, record)
    log.info("LoRA: %d %s adapters (r=%d) in %s; %d modules trained fully", len(record.adapted),
             "DoRA" if config.dora else "LoRA", config.r, type(model).__name__, len(to_save))
    return model


def _check_targets(targets: list[_Target], config: LoRAConfig) -> None:
    """Everything about the chosen layers that can fail, checked before the model is changed."""
    for target in targets:
        n_in, n_out = target.shape
        rank = config.rank_for(target.name)
        if rank > min(n_in, n_out):
            source = "rank_pattern" if rank != config.r else "LoRAConfig.r"
            raise ValueError(
                f"LoRA rank r={rank} is larger than layer {target.name!r} allows (in={n_in}, out={n_out}); "
                f"r must be <= {min(n_in, n_out)}. HINT: lower {source} or exclude this layer."
            )
        transposed = bool(target.part is None and linear_shape(target.module)[2])
        if config.fan_in_fan_out is not None and config.fan_in_fan_out != transposed:
            raise ValueError(
                f"LoRAConfig(fan_in_fan_out={config.fan_in_fan_out}) does not fit layer {target.name!r} "
                f"({type(target.module).__name__}, weight stored {'in x out' if transposed else 'out x in'}). "
                "HINT: leave fan_in_fan_out unset (None): lit_lowrank reads it from each layer.")
        if config.dora and (target.part or not target.module.weight.is_floating_point()):
            kind = "nn.MultiheadAttention part" if target.part else "quantized layer"
            raise ValueError(
                f"DoRA is not implemented for {target.name!r}, a {kind} (PEFT has no DoRA for it either). HINT: "
                "exclude it with exclude_modules, or use plain LoRA (dora=False).")


def _warn_unmatched_patterns(targets: list[_Target], config: LoRAConfig) -> None:
    # PEFT warns about the same keys: a typo in a pattern would otherwise silently keep the default rank
    for field_name in ("rank_pattern", "alpha_pattern"):
        patterns = getattr(config, field_name) or {}
        for key in patterns:
            if not any(pattern_value({key: True}, t.name, False) for t in targets):
                log.warning("LoRAConfig.%s key %r matched no adapted layer and is ignored", field_name, key)


def _resolve_modules_to_save(model: nn.Module, names: list[str] | None) -> list[str]:
    resolved = []
    for key in names or []:
        found = [name for name, _ in model.named_modules() if name and name_matches(name, [key])]
        if not found:
            children = [name for name, _ in model.named_children()]
            raise ValueError(
                f"modules_to_save entry {key!r} matches no module of {type(model).__name__}; "
                f"top-level modules: {children}. HINT: give a module name or suffix, e.g. 'classifier'."
            )
        resolved.extend(found)
    return sorted(set(resolved))


def _replace(model: nn.Module, name: str, new: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    setattr(parent, child, new)
