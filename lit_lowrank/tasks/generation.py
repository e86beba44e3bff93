"""Generating answers from prompt batches, and scoring them: answer extraction by regex, then exact match.

Text is compared as the tokenizer decodes it: the generation, and the reference response after a round trip
through the tokenizer (``references_decoded`` of the batches), so that a tokenizer that changes text (MiniLM's
uncased WordPiece lower-cases it and spaces out punctuation: ``#### 72`` decodes as ``# # # # 72``) treats both
alike. Stop strings are matched against that decoded text too.
"""
from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn
from transformers import GenerationConfig, StoppingCriteria, StoppingCriteriaList

#: GSM8K's answer line, ``#### <number>``, for tokenizers that keep text as written (byte-level BPE, SentencePiece).
GSM8K_ANSWER = r"####\s*(-?[\d,]*\.?\d+)"
#: The same for tokenizers that space out punctuation (BERT's WordPiece: ``# # # # 72``).
GSM8K_ANSWER_SPACED = r"#\s*#\s*#\s*#\s*(-?[\d,\s]*\.?\d+)"


@dataclass(frozen=True)
class GenerationOptions:
    """How :class:`~lit_lowrank.tasks.CausalLMTask` generates, and how it reads an answer out of a generation.

    Args:
        max_new_tokens: most tokens generated per prompt.
        temperature: 0 generates greedily (the default, deterministic); above 0 samples at that temperature.
        top_p: nucleus sampling: sample from the smallest set of tokens whose probability reaches ``top_p``
            (sampling only).
        stop: strings that end a generation (it is cut before the first one); generation also stops at the
            tokenizer's EOS token (and a chat template's end-of-turn token).
        answer_pattern: regex whose first group (or whole match, without groups) is the answer, e.g.
            :data:`GSM8K_ANSWER`; ``None`` takes the whole generation. A generation without a match has no answer.

    Example:
        >>> GenerationOptions(answer_pattern="(").answer_pattern
        Traceback (most recent call last):
        ...
        ValueError: answer_pattern '(' is not a valid regular expression (missing ), unterminated subpattern at
        position 0). HINT: ...
    """

    max_new_tokens: int = 64
    temperature: float = 0.0
    top_p: float = 1.0
    stop: tuple[str, ...] = ()
    answer_pattern: str | None = None

    def __post_init__(self) -> None:
        if self.max_new_tokens < 1:
            raise ValueError(f"max_new_tokens must be >= 1, got {self.max_new_tokens}")
        if self.temperature < 0:
            raise ValueError(f"temperature must be >= 0 (0: greedy), got {self.temperature}")
        if not 0.0 < self.top_p <= 1.0:
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p}")
        if any(not s for s in self.stop):
            raise ValueError(f"stop strings must not be empty, got {list(self.stop)}")
        if self.answer_pattern is not None:
            try:
                re.compile(self.answer_pattern)
            except re.error as error:
                raise ValueError(f"answer_pattern {self.answer_pattern!r} is not a valid regular expression ({error}). "
                                 r"HINT: e.g. '####\s*(\S+)' takes what follows '####'") from error


def normalize_answer(text: str) -> str:
    """Whitespace collapsed, thousands separators dropped from numbers, a trailing full stop removed.

    Example:
        >>> normalize_answer("  1,234.  "), normalize_answer("New   York")
        ('1234', 'New York')
    """
    text = " ".join(text.split())
    text = re.sub(r"(?<=\d),(?=\d{3}(?!\d))", "", text)
    return text.rstrip(".").strip()


def extract_answer(text: str | None, pattern: str | None) -> str | None:
    """The normalised answer in ``text``: the first match of ``pattern`` (its first group that matched, else the whole
    match), or all of ``text`` when ``pattern`` is None; None when nothing matches.

    Example:
        >>> extract_answer("She pays 3 * 4 = 12 dollars.\\n#### 12", GSM8K_ANSWER)
        '12'
        >>> extract_answer("# # # # 1, 234", GSM8K_ANSWER_SPACED), extract_answer("no answer here", GSM8K_ANSWER)
        ('1, 234', None)
    """
    if text is None:
        return None
    if pattern is None:
        return normalize_answer(text)
    match = re.search(pattern, text)
    if match is None:
        return None
    value = next((group for group in match.groups() if group is not None), match.group(0))
    return normalize_answer(value)


def is_exact_match(generation: str, reference: str, pattern: str | None) -> bool:
    """Whether the answers extracted from both are equal (a reference without a match is compared whole).

    Example:
        >>> is_exact_match("so the total is\\n#### 1,234", "#### 1234", GSM8K_ANSWER)
        True
        >>> is_exact_match("#### 12", "#### 13", GSM8K_ANSWER), is_exact_match("12", "#### 12", GSM8K_ANSWER)
        (False, False)
    """
    answer = extract_answer(generation, pattern)
    expected = extract_answer(reference, pattern)
    expected = expected if expected is not None else normalize_answer(reference)
    return answer is not None and answer == expected


def _cut_at_stop_ids(ids: Sequence[int], stop_ids: Sequence[int]) -> list[int]:
    for position, token in enumerate(ids):
        if token in stop_ids:
            return list(ids[:position])
    return list(ids)


def _cut_at_stop_strings(text: str, stop: Sequence[str]) -> tuple[str, bool]:
    cut = min((text.find(s) for s in stop if s in text), default=-1)
    return (text[:cut], True) if cut >= 0 else (text, False)


class StopOnStrings(StoppingCriteria):
    """A transformers stopping criterion: a row is done once its decoded new tokens contain a stop string."""

    def __init__(self, stop: Sequence[str], codec: Any, prompt_width: int) -> None:
        self.stop, self.codec, self.prompt_width = tuple(stop), codec, prompt_width

    def __call__(self, input_ids: torch.Tensor, scores: Any = None, **kwargs: Any) -> torch.Tensor:
        rows = input_ids[:, self.prompt_width:].tolist()
        done = [_cut_at_stop_strings(self.codec.decode(_cut_at_stop_ids(r, self.codec.stop_token_ids)), self.stop)[1]
                for r in rows]
        return torch.tensor(done, dtype=torch.bool, device=input_ids.device)


def generate_texts(model: nn.Module, prompt_ids: torch.Tensor, prompt_mask: torch.Tensor,
                   options: GenerationOptions, codec: Any) -> list[str]:
    """Generate from left-padded prompts and return each continuation's text, cut at EOS and at stop strings.

    ``codec`` decodes model ids and names the stop tokens and the padding id (a
    :class:`~lit_lowrank.data.codec.TokenCodec`). Only the options given here apply: the model's own
    ``generation_config`` (a hub model may ask for sampling) is not used.
    """
    if not hasattr(model, "generate"):
        raise TypeError(f"{type(model).__name__} cannot generate (no `generate` method). HINT: use a transformers "
                        "causal LM (AutoModelForCausalLM)")
    sampling: dict[str, Any] = {"do_sample": False}
    if options.temperature > 0:
        sampling = {"do_sample": True, "temperature": options.temperature, "top_p": options.top_p, "top_k": 0}
    config = GenerationConfig(max_new_tokens=options.max_new_tokens, eos_token_id=list(codec.stop_token_ids),
                              pad_token_id=codec.pad_token_id, **sampling)
    width = prompt_ids.shape[1]
    criteria = StoppingCriteriaList([StopOnStrings(options.stop, codec, width)]) if options.stop else None
    output = model.generate(input_ids=prompt_ids, attention_mask=prompt_mask, generation_config=config,
                            stopping_criteria=criteria)
    texts = []
    for row in output[:, width:].tolist():
        text = codec.decode(_cut_at_stop_ids(row, codec.stop_token_ids))
        texts.append(_cut_at_stop_strings(text, options.stop)[0] if options.stop else text)
    return texts


def generation_rows(batch: dict[str, Any], texts: Sequence[str], options: GenerationOptions) -> list[dict[str, Any]]:
    """One dict per example: prompt, generation, extracted answer and, when the batch has references, the
    reference, its answer and whether they match (``correct``).

    Example:
        >>> batch = {"prompts": ["2 + 2?"], "references": ["#### 4"], "references_decoded": ["#### 4"]}
        >>> generation_rows(batch, ["#### 4"], GenerationOptions(answer_pattern=GSM8K_ANSWER))
        [{'prompt': '2 + 2?', 'generation': '#### 4', 'answer': '4', 'reference': '#### 4', 'reference_answer': '4',
          'correct': True}]
    """
    pattern = options.answer_pattern
    rows = []
    references = batch.get("references") or [None] * len(texts)
    decoded = batch.get("references_decoded") or references
    for prompt, text, reference, reference_decoded in zip(batch["prompts"], texts, references, decoded):
        row: dict[str, Any] = {"prompt": prompt, "generation": text, "answer": extract_answer(text, pattern)}
        if reference is not None:
            expected = reference_decoded if reference_decoded is not None else reference
            reference_answer = extract_answer(expected, pattern)
            row.update(reference=reference,
                       reference_answer=(reference_answer if reference_answer is not None
                                         else normalize_answer(expected)),
                       correct=is_exact_match(text, expected, pattern))
        rows.append(row)
    return rows
