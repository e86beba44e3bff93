"""``LoRAConfig``: which layers get adapters and how they are shaped, under our names or PEFT's.

PEFT's ``LoraConfig`` field names are accepted where the meaning is the same (``lora_alpha``, ``lora_dropout``,
``use_rslora``, ``use_dora``, ``init_lora_weights``): each is another way to set one of our fields, never a second
copy of it, and giving both names with different values is refused. ``rank_pattern``, ``alpha_pattern``,
``layers_to_transform`` and ``layers_pattern`` follow PEFT's matching rules exactly (tested against PEFT).
A PEFT name lit_lowrank does not implement (:data:`PEFT_REFUSED`) stops with the reason; any other unknown name
stops with the closest accepted one. The table of names: ``docs/peft-compat.md``.
"""
from __future__ import annotations

import difflib
import functools
import inspect
import re
from collections.abc import Sequence
from dataclasses import InitVar, dataclass

from lit_lowrank.adapters.inits import LORA_INITS

#: PEFT's ``LoraConfig`` name -> the LoRAConfig field it sets (same meaning, one value).
PEFT_ALIASES = {"lora_alpha": "alpha", "lora_dropout": "dropout", "use_rslora": "rslora", "use_dora": "dora",
                "init_lora_weights": "init"}
#: PEFT's ``init_lora_weights`` values and the registered init with the same meaning.
PEFT_INITS = {True: "default", False: "random", "gaussian": "gaussian"}
_METADATA = "is metadata of PEFT's saved adapter_config.json; save_adapter writes it. HINT: leave it out."
_NOT_IMPLEMENTED = "is a PEFT feature lit_lowrank does not implement. HINT: leave it out, or use PEFT for it."
#: PEFT ``LoraConfig`` names that LoRAConfig does not take, with the reason (``bias``, ``fan_in_fan_out`` and
#: ``target_parameters`` are fields, refused only at values that would change what PEFT computes).
PEFT_REFUSED = {
    "task_type": "is derived from the model by save_adapter (PEFT's task type of a transformers model), and the "
                 "task heads PEFT's task types train are picked by modules_to_save=None. HINT: leave it out.",
    **dict.fromkeys(["peft_type", "auto_mapping", "peft_version", "base_model_name_or_path", "revision",
                     "inference_mode"], _METADATA),
    **dict.fromkeys(["megatron_config", "megatron_core", "trainable_token_indices", "loftq_config", "eva_config",
                     "corda_config", "lora_ga_config", "velora_config", "alora_invocation_tokens", "use_qalora",
                     "qalora_group_size", "monteclora_config", "layer_replication", "runtime_config", "lora_bias",
                     "use_bdlora", "arrow_config", "kasa_config", "ensure_weight_tying"], _NOT_IMPLEMENTED),
}


@dataclass
class LoRAConfig:
    """Which layers get adapters and how they are shaped.

    Args:
        r: rank of each adapter pair (``rank_pattern`` overrides it per layer).
        alpha: scale numerator; the update is ``alpha / r * B @ A`` (``alpha / sqrt(r)`` with ``rslora``).
            PEFT's name: ``lora_alpha``.
        dropout: dropout on the adapter input (not applied to ``nn.MultiheadAttention`` adapters).
            PEFT's name: ``lora_dropout``.
        target_modules: ``"all-linear"``, or a pattern (:mod:`lit_lowrank.adapters.patterns`: a list of names or
            name suffixes, or a regex matching whole module names); ``"default"``: the backbone's default targets,
            resolved by the lit_lowrank tasks.
        exclude_modules: names to leave alone, a pattern as well.
        rslora: rank-stabilised scaling ``alpha / sqrt(r)``. PEFT's name: ``use_rslora``.
        init: a name registered in :data:`lit_lowrank.adapters.inits.LORA_INITS` ("default", "gaussian", "random").
            PEFT's name: ``init_lora_weights`` (True: "default", False: "random", "gaussian").
        modules_to_save: modules trained fully and saved with the adapter (e.g. ``["classifier"]``). ``None``
            (the default) picks the heads a task adds, as PEFT's task types do (see
            :data:`~lit_lowrank.adapters.heads.TASK_HEAD_NAMES`: ``classifier``, ``score``, timm's ``head``);
            ``[]`` keeps everything but the adapters frozen.
        rank_pattern: ``{pattern: rank}``, PEFT's rule: the first key (in order) that matches the end of a layer's
            name after a dot (``re.match(rf"(.*\\.)?({key})$", name)``) gives that layer's rank.
        alpha_pattern: ``{pattern: alpha}``, the same rule for alpha.
        layers_to_transform: only adapt layers with this index (an int or a list), PEFT's rule: the index is the
            first number in the name after a module of ``layers_pattern`` (any module when unset), e.g. 1 in
            ``model.layers.1.self_attn.q_proj``. Needs ``target_modules`` as a list, as in PEFT.
        layers_pattern: the name(s) of the module list holding the layers (``"layers"``, ``"h"``), PEFT's rule.
        dora: DoRA (weight-decomposed LoRA, PEFT's ``use_dora``): a trainable magnitude per output unit,
            ``W' = m * (W + s B A) / ||W + s B A||`` (:class:`~lit_lowrank.adapters.dora.DoRALinear`).
        fan_in_fan_out: PEFT's flag for weights stored (in, out), as GPT-2's ``Conv1D``. lit_lowrank reads it from
            each layer; ``None`` (the default) leaves it at that, a bool must agree with every adapted layer.
        lora_alpha, lora_dropout, use_rslora, use_dora, init_lora_weights: PEFT's names of the fields above.
        bias: PEFT's bias training; only ``"none"`` (biases of adapted layers stay frozen).
        target_parameters: PEFT's adapters on bare ``nn.Parameter`` s; not implemented, only empty.

    Example:
        >>> LoRAConfig(r=4, alpha=8, target_modules=["q_proj", "v_proj"]).scaling
        2.0
        >>> config = LoRAConfig(r=8, lora_alpha=32, lora_dropout=0.05, rank_pattern={"v_proj": 4})
        >>> config.alpha, config.dropout, config.rank_for("model.layers.0.self_attn.v_proj")
        (32, 0.05, 4)
        >>> LoRAConfig(lora_dropot=0.1)
        Traceback (most recent call last):
        ...
        TypeError: LoRAConfig got an unknown argument 'lora_dropot'. HINT: did you mean 'lora_dropout'? ...
    """

    r: int = 8
    alpha: float = 16.0
    dropout: float = 0.0
    target_modules: str | list[str] = "all-linear"
    exclude_modules: str | list[str] | None = None
    rslora: bool = False
    init: str = "default"
    modules_to_save: list[str] | None = None
    rank_pattern: dict[str, int] | None = None
    alpha_pattern: dict[str, float] | None = None
    layers_to_transform: int | list[int] | None = None
    layers_pattern: str | list[str] | None = None
    dora: bool = False
    fan_in_fan_out: bool | None = None
    lora_alpha: InitVar[float | None] = None
    lora_dropout: InitVar[float | None] = None
    use_rslora: InitVar[bool | None] = None
    use_dora: InitVar[bool | None] = None
    init_lora_weights: InitVar[bool | str | None] = None
    bias: InitVar[str] = "none"
    target_parameters: InitVar[list[str] | None] = None

    def __post_init__(self, lora_alpha, lora_dropout, use_rslora, use_dora, init_lora_weights, bias,
                      target_parameters) -> None:
        peft_values = {"lora_alpha": lora_alpha, "lora_dropout": lora_dropout, "use_rslora": use_rslora,
                       "use_dora": use_dora, "init_lora_weights": init_lora_weights}
        for peft_name, value in peft_values.items():
            if value is not None:
                self._set_from_peft_name(peft_name, value)
        if bias != "none":
            raise ValueError(f"LoRAConfig(bias={bias!r}) is not supported: lit_lowrank trains no bias next to the "
                             "adapters (PEFT's bias='all'/'lora_only'). HINT: leave bias='none', and name a module "
                             "in modules_to_save to train it fully, biases included.")
        if target_parameters:
            raise ValueError(f"LoRAConfig(target_parameters={target_parameters!r}): PEFT's LoRA on bare "
                             "nn.Parameters (MoE experts) is not implemented. HINT: adapt modules with "
                             "target_modules, or use PEFT for this.")
        self._validate()

    def _set_from_peft_name(self, peft_name: str, value) -> None:
        field_name = PEFT_ALIASES[peft_name]
        if peft_name == "init_lora_weights":
            value = _init_from_peft(value)
        current, default = getattr(self, field_name), _DEFAULTS[field_name]
        if current != default and current != value:
            raise ValueError(f"LoRAConfig got both {field_name}={current!r} and {peft_name}={value!r}, two names "
                             f"of one setting ({peft_name} is PEFT's name). HINT: give only one of them.")
        setattr(self, field_name, value)

    def _validate(self) -> None:
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
        _check_pattern("rank_pattern", self.rank_pattern, integer=True)
        _check_pattern("alpha_pattern", self.alpha_pattern, integer=False)
        self._validate_layers()

    def _validate_layers(self) -> None:
        layers, pattern = self.layers_to_transform, self.layers_pattern
        indexes = [layers] if isinstance(layers, int) else layers
        if layers is not None and (not isinstance(indexes, list) or any(
                isinstance(i, bool) or not isinstance(i, int) or i < 0 for i in indexes)):
            raise ValueError(f"LoRAConfig.layers_to_transform must be a layer index or a list of them, got {layers!r}")
        if pattern is not None and not (isinstance(pattern, str) or (
                isinstance(pattern, list) and all(isinstance(p, str) for p in pattern))):
            raise ValueError(f"LoRAConfig.layers_pattern must be a name or a list of names, got {pattern!r}")
        if pattern and layers is None:
            raise ValueError("LoRAConfig.layers_pattern is set without layers_to_transform (PEFT's rule: it only "
                             "says where to find the layer index). HINT: give layers_to_transform too.")
        if self.transforms_some_layers and isinstance(self.target_modules, str) and self.target_modules != "default":
            raise ValueError(f"LoRAConfig.layers_to_transform needs target_modules as a list of names, got the string "
                             f"{self.target_modules!r} (PEFT's rule too). HINT: list the layer names, e.g. "
                             "['q_proj', 'v_proj'].")

    @property
    def scaling(self) -> float:
        """The scaling of a layer with no ``rank_pattern`` / ``alpha_pattern`` entry."""
        return self.alpha / self.r**0.5 if self.rslora else self.alpha / self.r

    def rank_for(self, name: str) -> int:
        """The rank of the adapter on layer ``name`` (``rank_pattern``, else ``r``)."""
        return pattern_value(self.rank_pattern, name, self.r)

    def alpha_for(self, name: str) -> float:
        """The alpha of the adapter on layer ``name`` (``alpha_pattern``, else ``alpha``)."""
        return pattern_value(self.alpha_pattern, name, self.alpha)

    def scaling_for(self, name: str) -> float:
        """The scaling of the adapter on layer ``name``, as PEFT computes it.

        Example:
            >>> LoRAConfig(r=8, alpha=16, rank_pattern={"v_proj": 4}).scaling_for("layers.0.v_proj")
            4.0
        """
        rank, alpha = self.rank_for(name), self.alpha_for(name)
        return alpha / rank**0.5 if self.rslora else alpha / rank

    @property
    def transforms_some_layers(self) -> bool:
        """Whether ``layers_to_transform`` restricts the layers (PEFT: an empty list does not)."""
        return self.layers_to_transform is not None and self.layers_to_transform != []

    def in_transformed_layer(self, name: str) -> bool:
        """Whether layer ``name`` passes ``layers_to_transform`` (always, when unset).

        Example:
            >>> config = LoRAConfig(target_modules=["q_proj"], layers_to_transform=[1])
            >>> config.in_transformed_layer("model.layers.1.self_attn.q_proj"), config.in_transformed_layer("q_proj")
            (True, False)
        """
        if not self.transforms_some_layers:
            return True
        index = layer_index(name, self.layers_pattern)
        wanted = self.layers_to_transform
        return index is not None and (index == wanted if isinstance(wanted, int) else index in wanted)


#: Every argument LoRAConfig takes (fields and PEFT names) with its default.
_DEFAULTS = {name: parameter.default for name, parameter in inspect.signature(LoRAConfig).parameters.items()}


def pattern_value(patterns: dict | None, name: str, default):
    r"""PEFT's ``rank_pattern`` / ``alpha_pattern`` rule (``peft.utils.other.get_pattern_key``): the value of the
    first key that matches the end of ``name`` after a dot, as a regex; ``default`` when none does.

    Example:
        >>> patterns = {r"layers\.0\.self_attn\.q_proj": 2, "q_proj": 4}
        >>> [pattern_value(patterns, f"model.layers.{i}.self_attn.q_proj", 8) for i in (0, 1)]
        [2, 4]
        >>> pattern_value(patterns, "model.layers.0.self_attn.kq_proj", 8)  # a suffix only after a dot
        8
    """
    for key, value in (patterns or {}).items():
        if re.match(rf"(.*\.)?({key})$", name):
            return value
    return default


def layer_index(name: str, layers_pattern: str | Sequence[str] | None = None) -> int | None:
    """The layer index in module ``name`` by PEFT's ``layers_to_transform`` rule: the first number that follows a
    module named in ``layers_pattern`` (with none, the first number that follows any module), or None.

    Example:
        >>> layer_index("model.layers.3.mlp.experts.0.up_proj"), layer_index("encoder.h.2.attn.c_attn", "h")
        (3, 2)
    """
    if not layers_pattern:
        match = re.match(r".*?\.[^.]*\.(?P<idx>\d+)\.", name)
    else:
        match = None
        for pattern in [layers_pattern] if isinstance(layers_pattern, str) else layers_pattern:
            match = re.match(rf"(?:^|.*?\.){pattern}\.(?P<idx>\d+)\.", name)
            if match is not None:
                break
    return int(match["idx"]) if match else None


def _init_from_peft(value) -> str:
    if isinstance(value, bool) or value in PEFT_INITS:
        return PEFT_INITS[value]
    if isinstance(value, str) and value in LORA_INITS:
        return value
    raise ValueError(f"LoRAConfig(init_lora_weights={value!r}): that init is not implemented; PEFT's True, False and "
                     f"'gaussian' are, and the registered inits {sorted(LORA_INITS)}. HINT: register one with "
                     "lit_lowrank.adapters.register_lora_init, or use PEFT for it.")


def _check_pattern(field_name: str, patterns, integer: bool) -> None:
    if patterns is None:
        return
    kind = "positive integer" if integer else "positive number"
    if not isinstance(patterns, dict):
        raise ValueError(f"LoRAConfig.{field_name} must be a dict {{pattern: {kind}}}, got {patterns!r}")
    for key, value in patterns.items():
        good_value = not isinstance(value, bool) and isinstance(value, int if integer else (int, float)) and value > 0
        if not isinstance(key, str) or not good_value:
            raise ValueError(f"LoRAConfig.{field_name} maps module-name patterns to a {kind}; got {key!r}: {value!r}")
        try:
            re.compile(key)
        except re.error as error:
            raise ValueError(f"LoRAConfig.{field_name} key {key!r} is not a valid regular expression ({error}). "
                             r"HINT: escape dots and brackets, e.g. 'layers\.0\.q_proj'.") from None


def unknown_name_message(name: str, accepted: Sequence[str]) -> str:
    """The error for a LoRAConfig argument that does not exist: PEFT's reason, or the closest accepted name."""
    if name in PEFT_REFUSED:
        return f"LoRAConfig does not take PEFT's {name!r}: it {PEFT_REFUSED[name]}"
    closest = difflib.get_close_matches(name, accepted, n=1, cutoff=0.6)
    hint = f"did you mean {closest[0]!r}? " if closest else ""
    return (f"LoRAConfig got an unknown argument {name!r}. HINT: {hint}LoRAConfig takes {', '.join(accepted)} "
            "(docs/peft-compat.md).")


def _refusing_unknown_names(generated_init):
    accepted = list(_DEFAULTS)

    @functools.wraps(generated_init)  # the signature stays the dataclass's: jsonargparse and help read it
    def __init__(self, *args, **kwargs):
        for name in kwargs:
            if name not in _DEFAULTS:
                raise TypeError(unknown_name_message(name, accepted))
        generated_init(self, *args, **kwargs)

    return __init__


LoRAConfig.__init__ = _refusing_unknown_names(LoRAConfig.__init__)
