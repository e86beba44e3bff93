"""Output heads: which layers "all-linear" leaves alone, and which heads a task adds and therefore trains.

A pretrained body plus a freshly initialised task head (a sequence classifier's ``classifier`` / ``score``,
timm's ``head``) learns nothing with only adapters: the random head stays frozen. PEFT's ``SEQ_CLS`` and
``TOKEN_CLS`` task types therefore train ``classifier`` and ``score`` fully; :func:`task_heads` finds the
same heads (plus timm's ``head``) for :func:`~lit_lowrank.adapters.inject_lora`.
"""
from __future__ import annotations

from collections.abc import Iterable

from torch import nn

#: Last name component of a model's output heads, the one list of them: "all-linear" gives them no adapter (PEFT
#: excludes the head the same way) and :func:`~lit_lowrank.optim.lowrank_param_groups` keeps them on AdamW.
HEAD_NAMES = ("lm_head", "classifier", "score", "head")
#: Heads a task adds on top of a pretrained body (HF ``classifier``/``score``, timm ``head``): freshly
#: initialised, so they are trained fully next to the adapters unless ``modules_to_save`` says otherwise.
#: Every head but ``lm_head``: a causal LM's head is pretrained (often tied to the input embeddings).
TASK_HEAD_NAMES = tuple(name for name in HEAD_NAMES if name != "lm_head")
#: Containers of several heads (torchvision's ``heads``, a multi-task ``heads`` list): every tensor under them stays
#: on AdamW in :func:`~lit_lowrank.optim.lowrank_param_groups`, as a head does.
HEAD_CONTAINER_NAMES = ("heads",)


def head_module_names(model: nn.Module) -> set[str]:
    """Output heads that "all-linear" leaves alone (they are usually trained fully via modules_to_save).

    Example:
        >>> import torch.nn as nn
        >>> net = nn.Sequential()
        >>> net.body, net.classifier = nn.Linear(4, 4), nn.Linear(4, 2)
        >>> sorted(head_module_names(net))
        ['classifier']
    """
    heads: set[int] = set()
    for module in model.modules():
        for getter in ("get_output_embeddings", "get_classifier"):  # transformers, timm
            fn = getattr(module, getter, None)
            try:
                head = fn() if callable(fn) else None
            except (NotImplementedError, AttributeError, TypeError):
                head = None
            if isinstance(head, nn.Module):
                heads.add(id(head))
    names = set()
    for name, module in model.named_modules():
        if id(module) in heads or (name and name.split(".")[-1] in HEAD_NAMES):
            names.add(name)
    return names


def _is_under(name: str, roots: Iterable[str]) -> bool:
    return any(name == root or name.startswith(root + ".") for root in roots)


def task_heads(model: nn.Module, adapted: Iterable[str] = ()) -> list[str]:
    """Names of the task heads in ``model`` (outermost match only, with parameters, not holding an adapter).

    ``adapted`` are the names of layers that get adapters: a head the user chose to adapt is not also
    trained fully (PEFT would wrap it twice).

    Example:
        >>> import torch.nn as nn
        >>> net = nn.Sequential()
        >>> net.body, net.head, net.pool = nn.Linear(4, 4), nn.Linear(4, 2), nn.Identity()
        >>> task_heads(net), task_heads(net, adapted=["head"])
        (['head'], [])
    """
    adapted = list(adapted)
    found: list[str] = []
    for name, module in model.named_modules():
        if not name or name.rsplit(".", 1)[-1] not in TASK_HEAD_NAMES or _is_under(name, found):
            continue
        holds_adapter = any(_is_under(layer, [name]) or _is_under(name, [layer]) for layer in adapted)
        if holds_adapter or next(module.parameters(), None) is None:  # e.g. timm's head=Identity with num_classes=0
            continue
        found.append(name)
    return found
