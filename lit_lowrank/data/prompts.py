"""Batches of prompts to generate from: left-padded ids plus the texts a prediction file shows next to them."""
from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch


@dataclass(frozen=True)
class Prompt:
    """One prompt to continue.

    Attributes:
        ids: model token ids of the prompt, as the model reads it (template and all).
        text: the prompt as a person wrote it (the last user message, or the text to continue).
        reference: the expected response as written, when known.
        reference_decoded: the expected response as the tokenizer renders its tokens (what a perfect model
            generates, e.g. lower-cased by an uncased tokenizer), when known; answers are compared on this.
    """

    ids: Sequence[int]
    text: str
    reference: str | None = None
    reference_decoded: str | None = None


def left_pad(sequences: Sequence[Sequence[int]], pad_id: int) -> dict[str, torch.Tensor]:
    """``input_ids`` and ``attention_mask`` padded on the left, so every prompt ends at the last column and the
    generated tokens of all rows start together.

    Example:
        >>> batch = left_pad([[5, 6, 7], [8]], pad_id=0)
        >>> batch["input_ids"].tolist(), batch["attention_mask"].tolist()
        ([[5, 6, 7], [0, 0, 8]], [[1, 1, 1], [0, 0, 1]])
    """
    width = max(len(s) for s in sequences)
    ids = torch.full((len(sequences), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(sequences), width), dtype=torch.long)
    for row, seq in enumerate(sequences):
        if len(seq):
            ids[row, width - len(seq):] = torch.as_tensor(list(seq), dtype=torch.long)
            mask[row, width - len(seq):] = 1
    return {"input_ids": ids, "attention_mask": mask}


class PromptCollator:
    """Collate :class:`Prompt` items into ``prompt_input_ids``/``prompt_attention_mask`` (left-padded) and the
    lists ``prompts``, ``references`` and ``references_decoded`` (picklable for DataLoader workers).

    Example:
        >>> batch = PromptCollator(pad_id=0)([Prompt([3, 4], "hi", "yo", "yo"), Prompt([5], "x")])
        >>> batch["prompt_input_ids"].tolist(), batch["prompts"], batch["references"]
        ([[3, 4], [0, 5]], ['hi', 'x'], ['yo', None])
    """

    def __init__(self, pad_id: int) -> None:
        self.pad_id = pad_id

    def __call__(self, prompts: list[Prompt]) -> dict[str, Any]:
        return prompt_fields(prompts, self.pad_id)


def prompt_fields(prompts: Sequence[Prompt], pad_id: int) -> dict[str, Any]:
    """The prompt part of a batch (see :class:`PromptCollator`)."""
    padded = left_pad([p.ids for p in prompts], pad_id)
    return {"prompt_input_ids": padded["input_ids"], "prompt_attention_mask": padded["attention_mask"],
            "prompts": [p.text for p in prompts], "references": [p.reference for p in prompts],
            "references_decoded": [p.reference_decoded for p in prompts]}
