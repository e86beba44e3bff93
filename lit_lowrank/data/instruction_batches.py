"""Batches of instruction examples: dynamic padding, evaluation batches that also carry the prompts, and packing."""
from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch

from lit_lowrank.data.chat_format import IGNORE_INDEX, EncodedExample
from lit_lowrank.data.prompts import prompt_fields


def right_pad(examples: Sequence[EncodedExample], pad_id: int) -> dict[str, torch.Tensor]:
    """``input_ids``, ``attention_mask`` and ``labels`` padded to the longest example (labels -100 on padding)."""
    width = max(len(e.input_ids) for e in examples)
    ids = torch.full((len(examples), width), pad_id, dtype=torch.long)
    labels = torch.full((len(examples), width), IGNORE_INDEX, dtype=torch.long)
    mask = torch.zeros((len(examples), width), dtype=torch.long)
    for row, example in enumerate(examples):
        n = len(example.input_ids)
        ids[row, :n] = torch.as_tensor(example.input_ids)
        labels[row, :n] = torch.as_tensor(example.labels)
        mask[row, :n] = 1
    return {"input_ids": ids, "attention_mask": mask, "labels": labels}


class SupervisedCollator:
    """Training batches padded to their longest example (picklable for DataLoader workers).

    Example:
        >>> from lit_lowrank.data.prompts import Prompt
        >>> items = [EncodedExample([5, 6, 7], [-100, 6, 7], Prompt([5], "q")),
        ...          EncodedExample([8, 9], [-100, 9], Prompt([8], "r"))]
        >>> batch = SupervisedCollator(pad_id=0)(items)
        >>> batch["input_ids"].tolist(), batch["labels"].tolist()
        ([[5, 6, 7], [8, 9, 0]], [[-100, 6, 7], [-100, 9, -100]])
    """

    def __init__(self, pad_id: int) -> None:
        self.pad_id = pad_id

    def __call__(self, examples: list[EncodedExample]) -> dict[str, Any]:
        return right_pad(examples, self.pad_id)


class EvaluationCollator(SupervisedCollator):
    """Validation/test batches: the padded sequences (for the loss on supervised tokens) plus the left-padded
    prompts and the references (for generating and scoring answers)."""

    def __call__(self, examples: list[EncodedExample]) -> dict[str, Any]:
        return {**right_pad(examples, self.pad_id), **prompt_fields([e.prompt for e in examples], self.pad_id)}


def pack(examples: Sequence[EncodedExample], max_length: int) -> list[list[EncodedExample]]:
    """Group examples, in order, into packs of at most ``max_length`` tokens (a new pack starts when the next
    example does not fit).

    Example:
        >>> from lit_lowrank.data.prompts import Prompt
        >>> items = [EncodedExample([1] * n, [1] * n, Prompt([1], "")) for n in (3, 4, 2, 5)]
        >>> [[len(e.input_ids) for e in group] for group in pack(items, max_length=8)]
        [[3, 4], [2, 5]]
    """
    packs: list[list[EncodedExample]] = []
    used = max_length + 1
    for example in examples:
        if used + len(example.input_ids) > max_length:
            packs.append([])
            used = 0
        packs[-1].append(example)
        used += len(example.input_ids)
    return packs


class PackedCollator:
    """Batches of packs: each row holds several examples one after another. ``position_ids`` restart at every
    example and ``attention_mask`` is a ``[B, 1, T, T]`` boolean block-diagonal causal mask (True: may attend), so
    an example sees only its own tokens, exactly as unpacked; padding attends only to itself. Needs a model that
    takes a 4D mask (transformers' Llama, Mistral, Qwen2, ... do).

    Example:
        >>> from lit_lowrank.data.prompts import Prompt
        >>> batch = PackedCollator(pad_id=0)([[EncodedExample([5, 6], [-100, 6], Prompt([5], "")),
        ...                                     EncodedExample([7, 8, 9], [-100, 8, 9], Prompt([7], ""))]])
        >>> batch["position_ids"].tolist(), batch["attention_mask"][0, 0].int().tolist()
        ([[0, 1, 0, 1, 2]], [[1, 0, 0, 0, 0], [1, 1, 0, 0, 0], [0, 0, 1, 0, 0], [0, 0, 1, 1, 0], [0, 0, 1, 1, 1]])
    """

    def __init__(self, pad_id: int) -> None:
        self.pad_id = pad_id

    def __call__(self, packs: list[list[EncodedExample]]) -> dict[str, torch.Tensor]:
        rows = [self._row(group) for group in packs]
        width = max(len(ids) for ids, _, _ in rows)
        batch = len(rows)
        ids = torch.full((batch, width), self.pad_id, dtype=torch.long)
        labels = torch.full((batch, width), IGNORE_INDEX, dtype=torch.long)
        positions = torch.zeros((batch, width), dtype=torch.long)
        segments = torch.arange(width).repeat(batch, 1) + width  # padding: a segment of its own per position
        for row, (row_ids, row_labels, row_segments) in enumerate(rows):
            n = len(row_ids)
            ids[row, :n], labels[row, :n] = torch.as_tensor(row_ids), torch.as_tensor(row_labels)
            segments[row, :n] = torch.as_tensor(row_segments)
            starts = torch.as_tensor(row_segments)
            first = torch.cat([torch.tensor([0]), (starts[1:] != starts[:-1]).nonzero().flatten() + 1])
            offsets = torch.zeros(n, dtype=torch.long)
            offsets[first] = first
            positions[row, :n] = torch.arange(n) - offsets.cummax(0).values
        causal = torch.ones(width, width, dtype=torch.bool).tril()
        mask = (segments[:, :, None] == segments[:, None, :]) & causal
        return {"input_ids": ids, "labels": labels, "position_ids": positions, "attention_mask": mask[:, None]}

    @staticmethod
    def _row(group: Sequence[EncodedExample]) -> tuple[list[int], list[int], list[int]]:
        ids, labels, segments = [], [], []
        for index, example in enumerate(group):
            ids += example.input_ids
            labels += example.labels
            segments += [index] * len(example.input_ids)
        return ids, labels, segments
