"""``LoRAConfig`` and ``inject_lora``: choose target layers, wrap them with adapters, freeze the base.

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

from lit_lowrank.adapters.heads import HEAD_NAMES, _is_under, head_module_names, task_heads  # noqa: F401 (HEAD_NAMES: old home)
from lit_lowrank.adapters.inits import LORA_INITS
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
class LoRAConfig:
    """Which layers get adapters and how they are shaped.

    Args:
        r: rank of each adapter pair.
        alpha: scale numerator; the update is ``alpha / r * B @ A`` (``alpha / sqrt(r)`` with ``rslora``).
        dropout: dropout on the adapter input (not applied to ``nn.MultiheadAttention`` adapters).
        target_modules: ``"all-linear"``, or a pattern (:mod:`lit_lowrank.adapters.patterns`: a list of names or
            name suffixes, or a regex matching whole module names); ``"default"``: the backbone's default targets,
            resolved by the lit_lowrank tasks.
        exclude_modules: names to leave alone, a pattern as well.
        rslora: rank-stabilised scaling ``alpha / sqrt(r)``.
        init: a name registered in :data:`lit_lowrank.adapters.inits.LORA_INITS` ("default", "gaussian", ...).
        modules_to_save: modules trained fully and saved with the adapter (e.g. ``["classifier"]``). ``None``
            (the default) picks the heads a task adds, as PEFT's task types do (see
            :data:`~lit_lowrank.adapters.heads.TASK_HEAD_NAMES`: ``classifier``, ``score``, timm's ``head``);
            ``[]`` keeps everything but the adapters frozen.

    Example:
        >>> LoRAConfig(r=4, alpha=8, target_modules=["q_proj", "v_proj"]).scaling
        2.0
    """

    r: int = 8
    alpha: float = 16.0
    dropout: float = 0.0
    target_modules: str | list[str] = "all-linear"
    exclude_modules: str | list[str] | None = None
    rslora: bool = False
    init: str = "default"
    modules_to_save: list[str] | None = None

    def __post_init__(self) -> None:
        if isinstance(self.r, bool) or not isinstance(self.r, int) or self.r <= 0:
            raise ValueError(f"LoRAConfig.r must be a positive integer, got {self.r!r}")
        if not self.alpha > 0:
            raise ValueError(f"LoRAConfig.alpha must be > 0, got {self.alpha!r}")
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"LoRAConfig.dropout must be in [0, 1), got {self.dropout!r}")
        if self.init not in LORA_INITS:
            raise ValueError(f"unknown LoRAConfig.init={self.init!r}; registered inits: {sorted(LORA_INITS)}")
        if isinstance(self.modules_to_save, str):  # iterating a string would resolve its characters
            raise ValueError(f"LoRAConfig.modules_to_save must be a list of names, got the string "
                             f"{self.modules_to_save!r}. HINT: write [{self.modules_to_save!r}].")
        if isinstance(self.target_modules, (list, tuple)) and not self.target_modules:
            raise ValueError("LoRAConfig.target_modules is empty; use 'all-linear' or name the layers")

    @property
    def scaling(self) -> float:
        return self.alpha / self.r**0.5 if self.rslora else self.alpha / self.r


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
    if not chosen:
        raise ValueError(
            f"LoRAConfig(target_modules={spec!r}, exclude_modules={config.exclude_modules!r}) matched no layer "
            f"of {type(model).__name__}. {describe_candidates(candidates)}"
        )
    return chosen


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
    for target in targets:
        n_in, n_out = target.shape
        if config.r > min(n_in, n_out):
            raise ValueError(
                f"LoRA rank r={config.r} is larger than layer {target.name!r} allows (in={n_in}, out={n_out}); "
                f"r must be <= {min(n_in, n_out)}. HINT: lower LoRAConfig.r or exclude this layer."
            )
    if config.modules_to_save is None:
        to_save = task_heads(model, adapted=[t.owner for t in targets])
        if to_save:
            log.info("LoRA: task heads %s are trained fully (modules_to_save=None picks them); "
                     "LoRAConfig(modules_to_save=[]) keeps them frozen", to_save)
    else:
        to_save = _resolve_modules_to_save(model, config.modules_to_save)
    if config.dropout > 0 and any(t.part for t in targets):
        log.warning("LoRA dropout=%s is not applied to nn.MultiheadAttention adapters (weight-delta form)",
                    config.dropout)

    for param in model.parameters():
        param.requires_grad_(False)
    parts_by_attention: dict[str, list[str]] = defaultdict(list)
    for target in targets:
        if target.part:
            parts_by_attention[target.owner].append(target.part)
        else:
            _replace(model, target.name,
                     LoRALinear(target.module, config.r, config.alpha, config.dropout, config.rslora))
    for owner, parts in parts_by_attention.items():
        attention = model.get_submodule(owner)
        _replace(model, owner, LoRAMultiheadAttention(attention, parts, config.r, config.alpha, config.rslora))
    for _, adapter in lora_modules(model):
        if config.init != "default":
            adapter.reset_lora_parameters(config.init)
        adapter.lora_A.requires_grad_(True)
        adapter.lora_B.requires_grad_(True)
    for name in to_save:
        for param in model.get_submodule(name).parameters():
            param.requires_grad_(True)
    record = InjectionRecord(config, adapted=[name for name, _ in lora_modules(model)], modules_to_save=to_save)
    setattr(model, INJECTION_RECORD, record)
    log.info("LoRA: %d adapters (r=%d) in %s; %d modules trained fully", len(record.adapted), config.r,
             type(model).__name__, len(to_save))
    return model


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
