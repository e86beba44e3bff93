"""Setup-time checks that the model fits the data: class counts and token vocabularies.

A head with more classes than the data trains silently (the extra logits just never win), and a tokenizer
whose ids exceed the embedding table fails deep inside the forward pass with a bare ``IndexError``. The tasks
call these from ``setup(stage)``, when both the model and the DataModule are known, so a YAML user learns which
keys to change before any step runs.
"""
from __future__ import annotations

from typing import Any

from torch import nn


def attached_datamodule(module: Any) -> Any | None:
    """The Trainer's DataModule, or None (no Trainer, or dataloaders passed to ``fit`` directly)."""
    trainer = getattr(module, "_trainer", None)
    return getattr(trainer, "datamodule", None) if trainer is not None else None


def check_num_classes(model_classes: int, datamodule: Any, model_key: str) -> None:
    """Raise when ``datamodule.num_classes`` (if it has one) differs from the head's ``model_classes``.

    Example:
        >>> class Data:
        ...     num_classes, class_names = 2, ["cat", "dog"]
        >>> check_num_classes(10, Data(), "model.init_args.backbone.init_args.num_classes")
        Traceback (most recent call last):
        ...
        ValueError: the data (Data) has 2 classes (['cat', 'dog']) but the model's head has 10 outputs. HINT: ...
    """
    classes = getattr(datamodule, "num_classes", None)
    if classes is None or classes == model_classes:
        return
    names = list(getattr(datamodule, "class_names", None) or [])
    shown = f" ({names[:10]}{' ...' if len(names) > 10 else ''})" if names else ""
    raise ValueError(
        f"the data ({type(datamodule).__name__}) has {classes} classes{shown} but the model's head has "
        f"{model_classes} outputs. HINT: set `{model_key}: {classes}`, or fix the data's classes (its class "
        "folders / label column, or `data.init_args.class_names`)")


def check_vocabulary(model: nn.Module, datamodule: Any) -> None:
    """Raise when the DataModule's token ids (``vocab_size``) can exceed the model's input embedding rows.

    Example:
        >>> class Data:
        ...     vocab_size = 30522
        >>> check_vocabulary(nn.Module(), Data())  # no input embedding to compare with: nothing to check
        >>> class Tiny(nn.Module):
        ...     def get_input_embeddings(self):
        ...         return nn.Embedding(128, 4)
        >>> check_vocabulary(Tiny(), Data())
        Traceback (most recent call last):
        ...
        ValueError: the data (Data) produces token ids up to 30521 (vocabulary 30522) but ... only 128 rows. HINT: ...
    """
    vocab = getattr(datamodule, "vocab_size", None)
    get_embeddings = getattr(model, "get_input_embeddings", None)
    if vocab is None or not callable(get_embeddings):
        return
    embedding = get_embeddings()
    rows = getattr(embedding, "num_embeddings", None)
    if rows is None or vocab <= rows:
        return
    raise ValueError(
        f"the data ({type(datamodule).__name__}) produces token ids up to {vocab - 1} (vocabulary {vocab}) but the "
        f"model's input embedding has only {rows} rows. HINT: use the model's own tokenizer (give the backbone its "
        "tokenizer and leave `data.init_args.tokenizer` unset), cap the data's vocabulary where it can "
        f"(`data.init_args.max_vocab: {rows}`), or, for a model built from a config, set "
        f"`model.init_args.backbone.init_args.config.vocab_size: {vocab}`")
