"""Chats -> token ids with labels: the tokenizer's chat template or a plain one, responses supervised, prompts not.

**Plain template** (used when the tokenizer has no chat template, or with ``template="plain"``)::

    [BOS]{system}\\n\\n### Instruction:\\n{user}\\n\\n### Response:\\n{assistant}[EOS]

(BOS only when the tokenizer has one; EOS is the tokenizer's EOS token, its SEP token when it has none; further
turns repeat the instruction/response part.) The system part appears only when there is a system message.

**Labels** are -100 on every prompt, system and user token (and on padding, see the collators) and equal the token
on every assistant turn's tokens: its content and EOS with the plain template; with a chat template, everything
the template renders for the turn after its generation prompt (content and end-of-turn marker). Each part is
tokenised on its own, so the prompt of a training sequence is exactly the prompt given to ``generate``.

**Truncation** to ``max_length`` keeps the response where possible: the prompt loses its oldest tokens first
(a leading BOS stays); only when the last response alone leaves less than a quarter of ``max_length`` for the
prompt is the response cut too, at its end (dropping its EOS, so that a cut answer does not teach the model to
stop there).
"""
from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from lit_lowrank.data.codec import TokenCodec
from lit_lowrank.data.instruction_rows import InstructionExample, Message
from lit_lowrank.data.prompts import Prompt

IGNORE_INDEX = -100
PLAIN_SYSTEM = "{content}\n\n"
PLAIN_USER = "### Instruction:\n{content}\n\n### Response:\n"
#: Share of ``max_length`` the prompt keeps when the response alone is too long.
MIN_PROMPT_SHARE = 0.25

Pieces = list[tuple[list[int], bool]]  # (model ids, supervised?)


@dataclass(frozen=True)
class EncodedExample:
    """A training sequence and the prompt to generate from.

    Attributes:
        input_ids: the whole chat, truncated to ``max_length``.
        labels: ``input_ids`` on supervised tokens, -100 elsewhere.
        prompt: the prompt before the last response (cut to ``max_length`` from the left), with the reference.
        truncated: ``""``, ``"prompt"`` (prompt tokens were dropped) or ``"response"`` (the response was cut too).
    """

    input_ids: list[int]
    labels: list[int]
    prompt: Prompt
    truncated: str = ""


def uses_chat_template(tokenizer: Any, template: str) -> bool:
    """Whether ``template`` (``auto``, ``chat`` or ``plain``) means the tokenizer's chat template."""
    if template not in ("auto", "chat", "plain"):
        raise ValueError(f"template must be 'auto', 'chat' or 'plain', got {template!r}")
    has_template = bool(getattr(tokenizer, "chat_template", None))
    if template == "chat" and not has_template:
        raise ValueError(f"template='chat' but the tokenizer {getattr(tokenizer, 'name_or_path', '')!r} has no chat "
                         "template. HINT: use template='auto' or 'plain' (the documented plain template)")
    return has_template and template != "plain"


def end_of_turn_token_ids(tokenizer: Any) -> list[int]:
    """Special tokens a chat template puts after an assistant's content (e.g. ``<|im_end|>``): generation stops
    there."""
    probe = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "ok"}]
    before = tokenizer.apply_chat_template(probe[:1], tokenize=False, add_generation_prompt=True)
    after = tokenizer.apply_chat_template(probe, tokenize=False)
    tail = after[len(before):] if after.startswith(before) else after
    ids = tokenizer(tail, add_special_tokens=False)["input_ids"]
    special = set(tokenizer.all_special_ids)
    return [i for i in ids if i in special][:1]


class ChatFormatter:
    """Turns an :class:`~lit_lowrank.data.instruction_rows.InstructionExample` into an :class:`EncodedExample`
    (see the module docstring for the template, the labels and the truncation).

    Example:
        >>> from lit_lowrank.data.common import load_tokenizer
        >>> from lit_lowrank.data.instruction_rows import InstructionExample, Message
        >>> codec = TokenCodec(load_tokenizer("sentence-transformers/all-MiniLM-L6-v2"))
        >>> chat = InstructionExample((Message("user", "Capital of France?"), Message("assistant", "Paris")), "x:1")
        >>> encoded = ChatFormatter(codec, max_length=64).encode(chat)
        >>> codec.decode(encoded.input_ids, skip_special_tokens=False)
        '# # # instruction : capital of france? # # # response : paris [SEP]'
        >>> codec.decode([t for t, label in zip(encoded.input_ids, encoded.labels) if label != -100], False)
        'paris [SEP]'
    """

    def __init__(self, codec: TokenCodec, max_length: int, template: str = "auto") -> None:
        if max_length < 4:
            raise ValueError(f"max_length must be >= 4 tokens, got {max_length}")
        self.codec, self.max_length = codec, max_length
        self.chat = uses_chat_template(codec.tokenizer, template)
        bos = getattr(codec.tokenizer, "bos_token_id", None)
        self.bos = [] if self.chat or bos is None else codec.to_model_ids([bos])

    def pieces(self, messages: Sequence[Message], add_generation_prompt: bool = False) -> Pieces:
        """The chat as (ids, supervised) parts; ``add_generation_prompt`` ends a prompt-only chat with the header
        the model answers after."""
        return self._template_pieces(messages, add_generation_prompt) if self.chat else self._plain_pieces(messages)

    def _plain_pieces(self, messages: Sequence[Message]) -> Pieces:
        pieces: Pieces = [(list(self.bos), False)] if self.bos else []
        for message in messages:
            if message.role == "assistant":
                pieces.append((self.codec.encode(message.content) + [self.codec.eos_token_id], True))
            else:
                form = PLAIN_SYSTEM if message.role == "system" else PLAIN_USER
                pieces.append((self.codec.encode(form.format(content=message.content)), False))
        return pieces

    def _template_pieces(self, messages: Sequence[Message], add_generation_prompt: bool) -> Pieces:
        tokenizer = self.codec.tokenizer

        def render(part: Sequence[Message], generation_prompt: bool) -> str:
            return tokenizer.apply_chat_template([m.as_dict() for m in part], tokenize=False,
                                                 add_generation_prompt=generation_prompt)

        texts: list[tuple[str, bool]] = []
        done = ""
        for k, message in enumerate(messages):
            if message.role != "assistant":
                continue
            before, after = render(messages[:k], True), render(messages[: k + 1], False)
            if not (before.startswith(done) and after.startswith(before)):
                raise ValueError("the tokenizer's chat template renders a chat differently from its beginning "
                                 "(a turn changes once a later turn is added), so prompt and response tokens cannot "
                                 "be told apart. HINT: set template='plain'")
            texts += [(before[len(done):], False), (after[len(before):], True)]
            done = after
        end = render(messages, add_generation_prompt and messages[-1].role != "assistant")
        if not end.startswith(done):
            raise ValueError("the tokenizer's chat template renders a whole chat differently from its turns one by "
                             "one, so prompt and response tokens cannot be told apart. HINT: set template='plain'")
        if len(end) > len(done):
            texts.append((end[len(done):], False))
        return [(self.codec.encode(text), supervised) for text, supervised in texts if text]

    def prompt(self, example: InstructionExample) -> Prompt:
        """The prompt to generate the last response from (or to answer a prompt-only chat), with its reference."""
        if example.response is None:
            pieces = self.pieces(example.messages, add_generation_prompt=True)
            return Prompt(self._cut_prompt([t for ids, _ in pieces for t in ids]), example.prompt_text)
        return self._prompt_of(example, self.pieces(example.messages))

    def _prompt_of(self, example: InstructionExample, pieces: Pieces) -> Prompt:
        last = max(i for i, (_, supervised) in enumerate(pieces) if supervised)
        ids = self._cut_prompt([t for part, _ in pieces[:last] for t in part])
        return Prompt(ids, example.prompt_text, example.response, self.codec.decode(pieces[last][0]).strip())

    def _cut_prompt(self, ids: list[int]) -> list[int]:
        """The last ``max_length`` tokens (the question and the answer header), after a leading BOS."""
        if len(ids) <= self.max_length:
            return ids
        head = len(self.bos) if ids[: len(self.bos)] == self.bos else 0
        return ids[:head] + ids[len(ids) - self.max_length + head:]

    def encode(self, example: InstructionExample) -> EncodedExample:
        """Ids and labels of a chat that ends with its response, truncated as the module docstring says."""
        pieces = self.pieces(example.messages)
        last = max(i for i, (_, supervised) in enumerate(pieces) if supervised)
        prompt_ids = [t for ids, _ in pieces[:last] for t in ids]
        prompt_labels = [t if supervised else IGNORE_INDEX for ids, supervised in pieces[:last] for t in ids]
        tail = [t for ids, _ in pieces[last + 1:] for t in ids]  # a template's text after the last turn
        response, response_labels = pieces[last][0] + tail, pieces[last][0] + [IGNORE_INDEX] * len(tail)
        truncated = ""
        if len(prompt_ids) + len(response) > self.max_length:
            prompt_ids, prompt_labels, response, response_labels, truncated = self._truncate(
                prompt_ids, prompt_labels, response, response_labels)
        return EncodedExample(prompt_ids + response, prompt_labels + response_labels, self._prompt_of(example, pieces),
                              truncated)

    def _truncate(self, prompt_ids: list[int], prompt_labels: list[int], response: list[int],
                  response_labels: list[int]) -> tuple[list[int], list[int], list[int], list[int], str]:
        head = len(self.bos) if prompt_ids[: len(self.bos)] == self.bos else 0
        least = min(len(prompt_ids), max(int(self.max_length * MIN_PROMPT_SHARE), head + 1))
        keep = max(self.max_length - len(response), least)
        cut = len(prompt_ids) - keep  # oldest prompt tokens to drop, after the head
        prompt_ids = prompt_ids[:head] + prompt_ids[head + cut:]
        prompt_labels = prompt_labels[:head] + prompt_labels[head + cut:]
        room = self.max_length - len(prompt_ids)
        if room >= len(response):
            return prompt_ids, prompt_labels, response, response_labels, "prompt"
        return prompt_ids, prompt_labels, response[:room], response_labels[:room], "response"


def truncation_note(encoded: Sequence[EncodedExample], split: str, max_length: int) -> str | None:
    """One line saying how many examples of a split were truncated, or None."""
    prompts = sum(e.truncated == "prompt" for e in encoded)
    responses = sum(e.truncated == "response" for e in encoded)
    if not prompts and not responses:
        return None
    return (f"{prompts + responses} of {len(encoded)} {split} examples are longer than max_length={max_length}: "
            f"{prompts} lost their oldest prompt tokens, {responses} had their response cut too. HINT: raise "
            "max_length to keep them whole")
