"""Param-group builders for the low-rank optimizers: which tensors are the "matrices" of a model.

LoRA-Pre (and GaLore-style methods) compress the state of the attention and MLP projection weights inside the
transformer blocks; embeddings, the output head, norms, biases and other 1-D or odd tensors keep a plain AdamW
state. :func:`lowrank_param_groups` finds those matrices generically, for transformers, timm and open_clip models.
"""

from __future__ import annotations

import re
import sys
from collections.abc import Sequence
from typing import Any

import torch
from torch import nn

from lit_lowrank.adapters.heads import HEAD_CONTAINER_NAMES, HEAD_NAMES
from lit_lowrank.adapters.lora import LoRAAdapter
from lit_lowrank.adapters.patterns import Pattern, name_matches
from lit_lowrank.adapters.peft_layers import trainable_peft_layer_names

_MHA_MATRIX_NAMES = ("in_proj_weight", "q_proj_weight", "k_proj_weight", "v_proj_weight")


def lowrank_param_groups(
    model: nn.Module,
    rank: int = 16,
    include: Pattern = None,
    exclude: Pattern = None,
    **group_options: Any,
) -> list[dict[str, Any]]:
    """Split ``model``'s trainable parameters into a low-rank group and an AdamW group.

    The low-rank group holds the 2-D weights of linear-like modules that sit inside a repeated block, i.e.
    whose qualified name has an integer component (``layers.3``, ``h.0``, ``blocks.1``, ``resblocks.2``,
    ``layer.5``): ``nn.Linear`` and subclasses, transformers' ``Conv1D`` (GPT-2, weight stored ``in x out``),
    and ``nn.MultiheadAttention``'s packed ``in_proj_weight`` (fused q/k/v, as in open_clip) or its separate
    ``q/k/v_proj_weight``. Everything else goes to the AdamW group: embeddings, output heads
    (``get_output_embeddings()``, timm's ``get_classifier()``, modules named as in
    :data:`~lit_lowrank.adapters.heads.HEAD_NAMES`), norms, biases, 1-D tensors, convolutions and matrices outside
    the blocks (e.g. poolers, CLIP's ``proj``). Frozen parameters (``requires_grad=False``) are left out of both
    groups.

    Args:
        model: the network.
        rank: ``rank`` of the low-rank group.
        include: parameters to add to the low-rank group (if 2-D): a pattern (:mod:`lit_lowrank.adapters.patterns`:
            a list of names or name suffixes, ``["q_proj", "visual.proj"]``, or a regex matching a whole name)
            that selects the parameter's qualified name or its module's.
        exclude: parameters to move to the AdamW group, same forms; wins over ``include``.
        **group_options: other keys of the low-rank group (``scale=0.25``, ``lr=...``). The AdamW group only
            gets ``lowrank=False``, so the optimizer's defaults apply to it; edit the returned dicts for more.

    Raises:
        ValueError: for a regex ``include``/``exclude`` that would give another low-rank group than when regexes
            were searched anywhere in parameter names (the former rule); the message names the tensors that differ.
        ValueError: when ``model`` carries trainable adapters (``inject_lora`` or ``peft.get_peft_model``): LoRA-Pre
            compresses the momenta of full weight matrices, and an adapted model has none trainable, so the optimizer
            would silently be plain AdamW (our adapters) or factor the adapter factors themselves (PEFT's ``lora_A``
            and ``lora_B`` are ``nn.Linear`` inside the blocks).

    Returns:
        ``[{"params", "param_names", "lowrank": True, "rank", **group_options}, {"params", "param_names",
        "lowrank": False}]``, without a group that would be empty. ``param_names`` is the key under which
        ``torch.optim`` keeps parameter names (saved in ``state_dict()``); see :func:`param_group_names`.

    Example:
        >>> from transformers import LlamaConfig, LlamaForCausalLM
        >>> model = LlamaForCausalLM(LlamaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2,
        ...     num_attention_heads=4, num_key_value_heads=2, vocab_size=128))
        >>> lowrank, adamw = lowrank_param_groups(model, rank=4)
        >>> lowrank["param_names"][:2], len(lowrank["params"]), adamw["param_names"][0]
        (['model.layers.0.self_attn.q_proj.weight', 'model.layers.0.self_attn.k_proj.weight'], 14,
         'model.embed_tokens.weight')
    """
    _reject_adapters(model)
    lowrank, adamw = _split(model, _matcher(include), _matcher(exclude))
    _check_regex_rule(model, lowrank["param_names"], include, exclude)
    groups = []
    if lowrank["params"]:
        groups.append({**lowrank, "lowrank": True, "rank": rank, **group_options})
    if adamw["params"]:
        groups.append({**adamw, "lowrank": False})
    return groups


def param_group_names(groups_or_optimizer: Sequence[dict[str, Any]] | torch.optim.Optimizer) -> list[list[str]]:
    """Names of the parameters in each group (for logs), ``"?"`` where a group carries no names.

    Example:
        >>> net = nn.Sequential(nn.Linear(4, 4))
        >>> param_group_names([{"params": [net[0].weight], "param_names": ["0.weight"]}, {"params": [net[0].bias]}])
        [['0.weight'], ['?']]
    """
    groups = getattr(groups_or_optimizer, "param_groups", groups_or_optimizer)
    return [list(group.get("param_names", ["?"] * len(list(group["params"])))) for group in groups]


def trainable_adapter_names(model: nn.Module) -> list[str]:
    """Names of the adapter layers in ``model`` with a trainable adapter parameter: lit_lowrank's LoRA adapters
    (``inject_lora``) and PEFT's adapter layers (``peft.get_peft_model``, any PEFT method), in ``named_modules`` order.

    Example:
        >>> import peft
        >>> from lit_lowrank import LoRAConfig, inject_lora
        >>> trainable_adapter_names(inject_lora(nn.Sequential(nn.Linear(4, 4)), LoRAConfig(r=2, target_modules=["0"])))
        ['0']
        >>> trainable_adapter_names(peft.get_peft_model(nn.Sequential(nn.Linear(4, 4)),
        ...                                             peft.LoraConfig(r=2, target_modules=["0"])))
        ['base_model.model.0']
    """
    ours = {name for name, module in model.named_modules()
            if isinstance(module, LoRAAdapter) and (module.lora_A.requires_grad or module.lora_B.requires_grad)}
    theirs = set(trainable_peft_layer_names(model))
    return [name for name, _ in model.named_modules() if name in ours or name in theirs]


def _reject_adapters(model: nn.Module) -> None:
    adapters = trainable_adapter_names(model)
    if adapters:
        raise ValueError(
            f"{type(model).__name__} has {len(adapters)} trainable LoRA adapter(s) (e.g. {adapters[0]!r}): LoRA-Pre "
            "factors the momenta of full weight matrices, and with adapters every trainable tensor would get plain "
            "AdamW or the adapter factors themselves would be factored. HINT: for LoRA-Pre full-parameter training "
            "do not add adapters (YAML: `lora: null`; no inject_lora, no peft.get_peft_model); to train adapters use "
            "LoRAPro or torch.optim.AdamW instead of LoRA-Pre.")


def _split(model: nn.Module, matches_include, matches_exclude) -> tuple[dict[str, list], dict[str, list]]:
    """``({"params", "param_names"}, ...)`` of the low-rank and the AdamW group; the predicates take
    ``(param_name, module_name)``."""
    head_params = _head_parameter_ids(model)
    lowrank: dict[str, list[Any]] = {"params": [], "param_names": []}
    adamw: dict[str, list[Any]] = {"params": [], "param_names": []}
    seen: set[int] = set()  # a tensor shared by two modules (tied embeddings) is yielded once per module
    for module_name, module in model.named_modules():
        for param_name, param in module.named_parameters(recurse=False, prefix=module_name):
            if not param.requires_grad or id(param) in seen:
                continue
            seen.add(id(param))
            local_name = param_name.rsplit(".", 1)[-1]
            is_matrix = (
                param.ndim == 2
                and id(param) not in head_params
                and _is_block_path(module_name)
                and _is_linear_like_weight(module, local_name)
            )
            if param.ndim == 2 and matches_include(param_name, module_name):
                is_matrix = True
            if matches_exclude(param_name, module_name):
                is_matrix = False
            target = lowrank if is_matrix else adamw
            target["params"].append(param)
            target["param_names"].append(param_name)
    return lowrank, adamw


def _is_block_path(module_name: str) -> bool:
    return any(part.isdigit() for part in module_name.split("."))


def _is_linear_like_weight(module: nn.Module, local_name: str) -> bool:
    if isinstance(module, nn.Linear):
        return local_name == "weight"
    if isinstance(module, nn.MultiheadAttention):
        return local_name in _MHA_MATRIX_NAMES
    # transformers' Conv1D (GPT-2): only present when transformers is already imported, never imported here.
    conv1d = getattr(sys.modules.get("transformers.pytorch_utils"), "Conv1D", None)
    return conv1d is not None and isinstance(module, conv1d) and local_name == "weight"


def _head_parameter_ids(model: nn.Module) -> set[int]:
    heads: list[nn.Module] = []
    for getter in ("get_output_embeddings", "get_classifier"):
        method = getattr(model, getter, None)
        if callable(method):
            try:
                head = method()
            except (NotImplementedError, AttributeError):
                head = None
            if isinstance(head, nn.Module):
                heads.append(head)
    head_names = HEAD_NAMES + HEAD_CONTAINER_NAMES
    heads += [module for name, module in model.named_modules() if name.rsplit(".", 1)[-1] in head_names]
    return {id(param) for head in heads for param in head.parameters()}


def _matcher(pattern: Pattern):
    """A predicate ``(param_name, module_name) -> bool``: whether ``pattern`` selects either name."""
    return lambda param_name, module_name: name_matches(param_name, pattern) or name_matches(module_name, pattern)


def _check_regex_rule(model: nn.Module, lowrank_names: list[str], include: Pattern, exclude: Pattern) -> None:
    """Refuse regex patterns that the one pattern rule would make select other parameters, rather than silently
    training other tensors with low-rank state.

    Regexes here used to be searched anywhere in parameter names (``re.search``); they now follow the rule of
    ``LoRAConfig.target_modules`` (:mod:`lit_lowrank.adapters.patterns`). Patterns that give the same low-rank group
    under both rules pass.
    """
    if not isinstance(include, str) and not isinstance(exclude, str):
        return
    before, _ = _split(model, _searcher(include), _searcher(exclude))
    if before["param_names"] == lowrank_names:
        return
    added = [name for name in lowrank_names if name not in before["param_names"]]
    dropped = [name for name in before["param_names"] if name not in lowrank_names]
    raise ValueError(
        f"lowrank_param_groups(include={include!r}, exclude={exclude!r}): a regex must now match a whole parameter or "
        "module name (re.fullmatch, the rule of LoRAConfig.target_modules). Under that rule the low-rank group gains "
        f"{_listed(added)} and loses {_listed(dropped)} against the former rule (re.search anywhere in parameter "
        f"names): {len(lowrank_names)} tensors instead of {len(before['param_names'])}. HINT: write a regex for the "
        "whole name (e.g. '.*q_proj.*' for 'q_proj') or a list of name suffixes.")


def _searcher(pattern: Pattern):
    """The former rule: a regex searched anywhere in the parameter name; lists as in :func:`_matcher`."""
    if isinstance(pattern, str):
        return lambda param_name, module_name: re.search(pattern, param_name) is not None
    return _matcher(pattern)


def _listed(names: list[str], limit: int = 8) -> str:
    shown = ", ".join(names[:limit]) + (f", ... ({len(names)} in all)" if len(names) > limit else "")
    return f"[{shown}]"
