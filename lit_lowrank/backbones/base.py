"""What every backbone factory returns, and the shared offline-error wording."""
from __future__ import annotations

from typing import Any

from torch import nn


class Backbone:
    """A model plus what a task needs to use it.

    A plain class rather than a dataclass so that YAML can name a factory function as its ``class_path``
    (``lit_lowrank.backbones.transformers_backbone`` with ``init_args``): jsonargparse accepts functions that
    return the class, which it does not for dataclasses.

    Args:
        model: the ``nn.Module``.
        lora_targets: sensible default ``LoRAConfig.target_modules`` for this architecture.
        tokenizer: a Hugging Face or open_clip tokenizer, when the model reads text.
        preprocess: an :class:`~lit_lowrank.backbones.image_preprocessing.ImagePreprocessing` (input size,
            normalisation, resizing; timm's data config or open_clip's preprocess config), when it reads images.

    Example:
        >>> bb = Backbone(nn.Linear(2, 2), ["0"])
        >>> bb
        Backbone(model=Linear, lora_targets=['0'])
    """

    def __init__(self, model: nn.Module, lora_targets: str | list[str] = "all-linear",
                 tokenizer: Any | None = None, preprocess: Any | None = None) -> None:
        self.model = model
        self.lora_targets = lora_targets
        self.tokenizer = tokenizer
        self.preprocess = preprocess

    def __repr__(self) -> str:
        return f"Backbone(model={type(self.model).__name__}, lora_targets={self.lora_targets!r})"


class PretrainedUnavailableError(OSError):
    """Pretrained weights could not be fetched (usually: the hub is unreachable from this machine)."""


def unreachable(what: str, error: BaseException, hint: str) -> PretrainedUnavailableError:
    return PretrainedUnavailableError(
        f"could not load pretrained {what}: the model hub is unreachable or the files are not cached here "
        f"({type(error).__name__}: {str(error).splitlines()[0][:200]}). HINT: {hint}"
    )
