"""What ``adapter_config.json`` says about the base model: where it was loaded from and PEFT's task type.

``peft.AutoPeftModelFor<Task>.from_pretrained(adapter_dir)`` loads ``base_model_name_or_path`` with the auto
class of ``task_type``, so both must describe the model that was actually trained, not a recipe's default.
"""
from __future__ import annotations

import logging
import os
import sys

from torch import nn

log = logging.getLogger(__name__)

#: transformers' auto-class mappings and the PEFT task type of the models in each (first match wins:
#: a class listed both as a causal LM and as a base model is a causal LM).
TASK_TYPES = (
    ("MODEL_FOR_SEQUENCE_CLASSIFICATION_MAPPING_NAMES", "SEQ_CLS"),
    ("MODEL_FOR_TOKEN_CLASSIFICATION_MAPPING_NAMES", "TOKEN_CLS"),
    ("MODEL_FOR_QUESTION_ANSWERING_MAPPING_NAMES", "QUESTION_ANS"),
    ("MODEL_FOR_CAUSAL_LM_MAPPING_NAMES", "CAUSAL_LM"),
    ("MODEL_FOR_SEQ_TO_SEQ_CAUSAL_LM_MAPPING_NAMES", "SEQ_2_SEQ_LM"),
    ("MODEL_MAPPING_NAMES", "FEATURE_EXTRACTION"),
)


def _is_transformers_model(model: nn.Module) -> bool:
    transformers = sys.modules.get("transformers")  # not imported: the model cannot be one of its classes
    return transformers is not None and isinstance(model, transformers.PreTrainedModel)


def peft_task_type(model: nn.Module) -> str | None:
    """PEFT's task type for a transformers model (``SEQ_CLS``, ``CAUSAL_LM``, ...); None for anything else
    (timm, open_clip, plain torch, transformers image classifiers), where PEFT has none.

    Example:
        >>> import torch.nn as nn
        >>> peft_task_type(nn.Linear(2, 2)) is None
        True
    """
    if not _is_transformers_model(model):
        return None
    from transformers.models.auto import modeling_auto

    # FSDP2's fully_shard swaps the class for a subclass "FSDP<Name>": look along the MRO.
    names = [cls.__name__ for cls in type(model).__mro__]
    for mapping, task_type in TASK_TYPES:
        for classes in getattr(modeling_auto, mapping, {}).values():
            listed = classes if isinstance(classes, (tuple, list)) else (classes,)
            if any(name in listed for name in names[:2]):
                return task_type
    return None


def loaded_from(model: nn.Module) -> str | None:
    """The hub name or folder a transformers model was loaded from; None when it was built from a config."""
    if not _is_transformers_model(model):
        return None
    return getattr(model.config, "_name_or_path", None) or None


def _same_source(given: str, loaded: str) -> bool:
    if given == loaded:
        return True
    if os.path.isdir(given) and os.path.isdir(loaded):
        return os.path.realpath(given) == os.path.realpath(loaded)
    from lit_lowrank.backbones.hf import resolve_name  # bundled hub names load from a pip-installed folder

    resolved = resolve_name(given)
    return resolved != given and os.path.isdir(loaded) and os.path.realpath(resolved) == os.path.realpath(loaded)


def base_model_name(model: nn.Module, given: str | None = None) -> str | None:
    """What to write as ``base_model_name_or_path``: where ``model`` was loaded from when it knows (a
    transformers ``from_pretrained`` model), else ``given``. A ``given`` that names another model is reported
    and ignored: the adapter only fits the weights it was trained on.

    Example:
        >>> import torch.nn as nn
        >>> base_model_name(nn.Linear(2, 2), "my-org/my-model")
        'my-org/my-model'
    """
    loaded = loaded_from(model)
    if loaded is None:
        return given
    if given and not _same_source(given, loaded):
        log.warning("base_model_name_or_path=%r is not the model that was trained (loaded from %r); writing %r "
                    "to adapter_config.json. HINT: drop base_model_name_or_path, the loaded model is recorded "
                    "on its own.", given, loaded, loaded)
    return loaded
