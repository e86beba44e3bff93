"""What every backbone factory returns, and the shared offline-error wording."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, List, Optional, Union

from torch import nn


@dataclass
class Backbone:
    """A model plus what a task needs to use it.

    Attributes:
        model: the ``nn.Module``.
        lora_targets: sensible default ``LoRAConfig.target_modules`` for this architecture.
        tokenizer: a Hugging Face or open_clip tokenizer, when the model reads text.
        preprocess: image transforms (timm data config / open_clip preprocess), when it reads images.
    """

    model: nn.Module
    lora_targets: Union[str, List[str]] = "all-linear"
    tokenizer: Optional[Any] = None
    preprocess: Optional[Any] = None


class PretrainedUnavailableError(OSError):
    """Pretrained weights could not be fetched (usually: the hub is unreachable from this machine)."""


def unreachable(what: str, error: BaseException, hint: str) -> PretrainedUnavailableError:
    return PretrainedUnavailableError(
        f"could not load pretrained {what}: the model hub is unreachable or the files are not cached here "
        f"({type(error).__name__}: {str(error).splitlines()[0][:200]}). HINT: {hint}"
    )
