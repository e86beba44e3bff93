"""PEFT's adapter layers found in a model, read as LoRA pairs where they are plain LoRA, without importing ``peft``.

``peft`` is an optional (dev) dependency, and a model can only hold PEFT layers once ``peft`` is imported: the classes
are looked up in ``sys.modules``, never imported here, so this module costs nothing without ``peft``.

A PEFT ``LoraLayer`` keeps one pair per adapter name. ``lora_A[name]`` and ``lora_B[name]`` are ``nn.Linear`` whose
weights are (r x in) and (out x r), the orientation of :class:`~lit_lowrank.adapters.LoRAAdapter`; a GPT-2 ``Conv1D``
base (``fan_in_fan_out``) only changes how PEFT merges, not the factors. ``lora_embedding_A[name]`` (r x
num_embeddings) and ``lora_embedding_B[name]`` (dim x r) give the transposed table ``W0^T + s B A``, the same form.
``scaling[name]`` is ``alpha / r`` (``alpha / sqrt(r)`` with rsLoRA).
"""
from __future__ import annotations

import sys
from collections.abc import Iterator
from dataclasses import dataclass

from torch import nn

_LORA_LAYERS = "peft.tuners.lora.layer"
_TUNER_LAYERS = "peft.tuners.tuners_utils"


@dataclass(frozen=True, eq=False)
class PeftLoRAFactors:
    """One adapter of a PEFT ``LoraLayer``: ``W = W0 + scaling * B @ A`` unless ``unsupported`` says why not.

    ``unsupported`` is None for a plain LoRA pair, else a sentence that names the module and the fix (DoRA or another
    PEFT variant, a convolution, AdaLoRA, ``target_parameters``, several trainable adapters active at once).
    """

    module_name: str
    adapter: str
    A: nn.Parameter
    B: nn.Parameter
    scaling: float
    unsupported: str | None = None

    @property
    def name(self) -> str:
        """``module_name[adapter]``: a layer may hold several adapters."""
        return f"{self.module_name}[{self.adapter}]"


def _peft_class(module_path: str, name: str) -> type | None:
    return getattr(sys.modules.get(module_path), name, None)


def is_peft_lora_layer(module: nn.Module) -> bool:
    """Whether ``module`` is one of PEFT's LoRA layers (``peft.tuners.lora.LoraLayer``, its subclasses included).

    Example:
        >>> is_peft_lora_layer(nn.Linear(2, 2))
        False
    """
    lora_layer = _peft_class(_LORA_LAYERS, "LoraLayer")
    return lora_layer is not None and isinstance(module, lora_layer)


def peft_lora_factors(module_name: str, module: nn.Module) -> list[PeftLoRAFactors]:
    """The adapters of one PEFT ``LoraLayer`` (every adapter name, trainable or frozen, active or not).

    Example:
        >>> import peft, torch
        >>> net = peft.get_peft_model(nn.Sequential(nn.Linear(6, 4)),
        ...                           peft.LoraConfig(r=4, lora_alpha=8, target_modules=["0"], use_rslora=True))
        >>> layer = net.base_model.model[0]
        >>> [(f.name, tuple(f.A.shape), tuple(f.B.shape), f.scaling, f.unsupported)
        ...  for f in peft_lora_factors("0", layer)]  # rsLoRA: alpha / sqrt(r)
        [('0[default]', (4, 6), (4, 4), 4.0, None)]
    """
    pairs = []
    for adapter in module.lora_A:
        A, B = _weight(module.lora_A[adapter]), _weight(module.lora_B[adapter])
        problem = _layer_problem(module_name, module, adapter)
        pairs.append(PeftLoRAFactors(module_name, adapter, A, B, float(module.scaling[adapter]), problem))
    for adapter in module.lora_embedding_A:
        pairs.append(PeftLoRAFactors(module_name, adapter, module.lora_embedding_A[adapter],
                                     module.lora_embedding_B[adapter], float(module.scaling[adapter]),
                                     _variant_problem(module_name, module, adapter)))
    return _refuse_stacked_adapters(module_name, module, pairs)


def _weight(factor: nn.Module | nn.Parameter) -> nn.Parameter:
    # LoRA's factors are nn.Linear (or nn.Conv*) modules; AdaLoRA keeps bare parameters in the same dicts.
    return factor.weight if isinstance(factor, nn.Module) else factor


def _layer_problem(module_name: str, module: nn.Module, adapter: str) -> str | None:
    """Why the ``lora_A`` / ``lora_B`` pair ``adapter`` of ``module`` is not ``W0 + s B A`` on a matrix (or None)."""
    where = f"adapter {adapter!r} of {module_name!r} ({type(module).__name__})"
    param_wrapper = _peft_class(_LORA_LAYERS, "ParamWrapper")
    if param_wrapper is not None and isinstance(module, param_wrapper):
        return (f"{where} adapts a parameter through PEFT's target_parameters (one rank-r pair per expert, stacked): "
                "LoRA-Pro's closed form is for one pair per weight matrix. HINT: target the modules instead "
                "(LoraConfig(target_modules=[...])), or train this adapter with torch.optim.AdamW.")
    if not (isinstance(module.lora_A[adapter], nn.Linear) and isinstance(module.lora_B[adapter], nn.Linear)):
        kind = ("AdaLoRA (SVD-form factors)" if isinstance(module.lora_A[adapter], nn.Parameter)
                else f"LoRA with {type(module.lora_A[adapter]).__name__} factors")
        return (f"{where} is {kind}: LoRA-Pro supports plain LoRA on Linear, GPT-2 Conv1D, nn.MultiheadAttention "
                "and Embedding layers. HINT: leave this layer out of target_modules (or exclude_modules=[...]) for "
                "LoRA-Pro, or train it with torch.optim.AdamW.")
    return _variant_problem(module_name, module, adapter)


def _variant_problem(module_name: str, module: nn.Module, adapter: str) -> str | None:
    where = f"adapter {adapter!r} of {module_name!r}"
    variant = getattr(module, "lora_variant", {}).get(adapter)
    if getattr(module, "use_dora", {}).get(adapter, False) or "Dora" in type(variant).__name__:
        return (f"{where} is DoRA (use_dora=True): LoRA-Pro's closed form is for plain LoRA, W0 + s B A, and DoRA "
                "also rescales the weight by its magnitude vector. HINT: LoraConfig(use_dora=False) to train it with "
                "LoRA-Pro, or keep DoRA and use torch.optim.AdamW.")
    if variant is not None:
        return (f"{where} uses PEFT's {type(variant).__name__}, which changes LoRA's forward: LoRA-Pro's closed form "
                "is for plain LoRA, W0 + s B A. HINT: drop that LoraConfig option for LoRA-Pro, or use "
                "torch.optim.AdamW.")
    return None


def _refuse_stacked_adapters(module_name: str, module: nn.Module, pairs: list[PeftLoRAFactors]):
    """Mark the pairs of a layer where several trainable adapters are active: their deltas add up, and LoRA-Pro
    would fit each of them to the whole gradient (a step about k times too large)."""
    active = set(getattr(module, "active_adapters", []))
    stacked = [p for p in pairs if p.adapter in active and (p.A.requires_grad or p.B.requires_grad)]
    if len(stacked) < 2:
        return pairs
    names = [p.adapter for p in stacked]
    problem = (f"{module_name!r} has {len(stacked)} trainable adapters active at once ({', '.join(map(repr, names))}): "
               "their deltas add up, and LoRA-Pro would fit each one to the whole gradient. HINT: train one adapter "
               f"at a time (peft_model.set_adapter({names[0]!r})), or freeze the others (requires_grad_(False)).")
    return [PeftLoRAFactors(p.module_name, p.adapter, p.A, p.B, p.scaling, p.unsupported or problem)
            if p in stacked else p for p in pairs]


def trainable_peft_layer_names(model: nn.Module) -> list[str]:
    """Names of the PEFT adapter layers in ``model`` (any PEFT method: LoRA, DoRA, LoHa, IA3, ...) that have a trainable
    adapter parameter. ``modules_to_save`` copies are not adapter layers: they are trained like any other module.

    Example:
        >>> import peft
        >>> net = peft.get_peft_model(nn.Sequential(nn.Linear(6, 4), nn.Linear(4, 2)),
        ...                           peft.LoraConfig(r=2, target_modules=["0"], modules_to_save=["1"]))
        >>> trainable_peft_layer_names(net)
        ['base_model.model.0']
    """
    return [name for name, module in peft_tuner_layers(model) if any(
        param.requires_grad for attribute in module.adapter_layer_names
        if isinstance(getattr(module, attribute, None), nn.Module)
        for param in getattr(module, attribute).parameters())]


def peft_tuner_layers(model: nn.Module) -> Iterator[tuple[str, nn.Module]]:
    """``(name, module)`` of every PEFT adapter layer (``BaseTunerLayer``) in ``model``, in ``named_modules`` order."""
    tuner_layer = _peft_class(_TUNER_LAYERS, "BaseTunerLayer")
    if tuner_layer is None:
        return
    for name, module in model.named_modules():
        if isinstance(module, tuner_layer):
            yield name, module
