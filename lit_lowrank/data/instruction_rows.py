"""Instruction examples from JSONL/CSV rows or a Hugging Face dataset, with every unusable row kept as a
:class:`BadRow` (file and line, and what is wrong) instead of being dropped silently.

A row is either a prompt/response pair (``{"prompt": ..., "response": ...}``) or a chat in the OpenAI form
(``{"messages": [{"role": "user", "content": ...}, {"role": "assistant", "content": ...}]}``; in a CSV file the
``messages`` cell holds that list as JSON). A row with the messages field is read as a chat.
"""
from __future__ import annotations

import json
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from lit_lowrank.data.user_files import BadRow, Utf8Tally, csv_rows, jsonl_lines

ROLES = ("system", "user", "assistant")


@dataclass(frozen=True)
class Message:
    """One chat turn: ``role`` is ``system``, ``user`` or ``assistant``."""

    role: str
    content: str

    def as_dict(self) -> dict[str, str]:
        return {"role": self.role, "content": self.content}


@dataclass(frozen=True)
class InstructionExample:
    """A chat to learn from or to answer, and where it came from (``file:line``).

    The last assistant message is the response; a chat that ends with a user message is a prompt only
    (predict files).

    Example:
        >>> ex = InstructionExample((Message("user", "2+2?"), Message("assistant", "#### 4")), "data.jsonl:1")
        >>> ex.response, ex.prompt_text
        ('#### 4', '2+2?')
    """

    messages: tuple[Message, ...]
    location: str

    @property
    def response(self) -> str | None:
        return self.messages[-1].content if self.messages[-1].role == "assistant" else None

    @property
    def prompt_text(self) -> str:
        """The last user message: what a person asked."""
        return next(m.content for m in reversed(self.messages) if m.role == "user")


@dataclass(frozen=True)
class Fields:
    """Names of the row fields, the system prompt to add, and whether every row needs a response."""

    prompt: str = "prompt"
    response: str = "response"
    messages: str = "messages"
    system_prompt: str | None = None
    require_response: bool = True


def read_rows(path: str | Path) -> Iterator[tuple[str, dict[str, Any] | BadRow]]:
    """``(location, row)`` of every non-blank row of a ``.jsonl``/``.csv``/``.tsv`` file; a row that cannot be
    parsed, or is not UTF-8, comes as a :class:`BadRow`. Locations are ``file:line`` (the first line of a
    multi-line CSV row). A byte-order mark is ignored; a file that is not UTF-8 as a whole raises
    :class:`~lit_lowrank.data.user_files.NotUtf8Error` (see :mod:`lit_lowrank.data.user_files`)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"data file {str(path)!r} does not exist (working directory: {Path.cwd()})")
    suffix = path.suffix.lower()
    if suffix in (".jsonl", ".ndjson"):
        for number, line in jsonl_lines(path, Utf8Tally(path)):
            where = f"{path}:{number}"
            if isinstance(line, BadRow):
                yield where, line
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as error:
                yield where, BadRow(where, f"not valid JSON ({error.msg} at column {error.colno})")
                continue
            yield where, (row if isinstance(row, dict)
                          else BadRow(where, f"a JSON {type(row).__name__}, not an object"))
    elif suffix in (".csv", ".tsv"):
        rows = csv_rows(path, Utf8Tally(path))
        _, header = next(rows)
        if not header:
            return
        for number, cells in rows:
            where = f"{path}:{number}"
            if isinstance(cells, BadRow):
                yield where, cells
            elif len(cells) != len(header):
                yield where, BadRow(where, f"has {len(cells)} cells, the header has {len(header)}")
            else:
                yield where, dict(zip(header, cells))
    else:
        raise ValueError(f"cannot read {str(path)!r}: expected a .jsonl, .csv or .tsv file")


def to_example(row: dict[str, Any], where: str, fields: Fields) -> InstructionExample | BadRow:
    """The example a row holds, or why it holds none.

    A row whose messages field is missing, null or empty text is a prompt/response pair: a Hugging Face dataset
    (Arrow) gives every row every column, null where a row has none, and a CSV file an empty cell.

    Example:
        >>> to_example({"prompt": "Add 2 and 2.", "response": ""}, "train.jsonl:3", Fields())
        BadRow(location='train.jsonl:3', reason="'response' is empty")
        >>> to_example({"prompt": "Hi", "response": "Hello"}, "a.csv:2", Fields(system_prompt="Be brief.")).messages
        (Message(role='system', content='Be brief.'), Message(role='user', content='Hi'),
         Message(role='assistant', content='Hello'))
    """
    if not _absent(row.get(fields.messages)):
        messages = _chat_messages(row[fields.messages], fields)
    elif fields.messages in row and _absent(row.get(fields.prompt)):
        messages = f"neither {fields.prompt!r} nor {fields.messages!r} has a value"
    else:
        messages = _pair_messages(row, fields)
    if isinstance(messages, str):
        return BadRow(where, messages)
    if fields.system_prompt and messages[0].role != "system":
        messages = [Message("system", fields.system_prompt), *messages]
    return InstructionExample(tuple(messages), where)


def _absent(value: Any) -> bool:
    return value is None or (isinstance(value, str) and not value.strip())


def _text(value: Any, name: str, may_be_empty: bool = True) -> str | None:
    """None when ``value`` is usable text, else the reason it is not."""
    if not isinstance(value, str):
        return f"{name} is {_kind(value)}, expected text"
    if not may_be_empty and not value.strip():
        return f"{name} is empty"
    return None


def _kind(value: Any) -> str:
    return "missing (null)" if value is None else f"{repr(value)[:40]} ({type(value).__name__})"


def _pair_messages(row: dict[str, Any], fields: Fields) -> list[Message] | str:
    if fields.prompt not in row:
        return f"no {fields.prompt!r} field (its fields: {sorted(row)[:10]})"
    problem = _text(row[fields.prompt], repr(fields.prompt))
    if problem:
        return problem
    messages = [Message("user", row[fields.prompt])]
    if fields.response not in row or row[fields.response] is None:
        return f"no {fields.response!r} value" if fields.require_response else messages
    problem = _text(row[fields.response], repr(fields.response), may_be_empty=False)
    return problem or [*messages, Message("assistant", row[fields.response])]


def _chat_messages(value: Any, fields: Fields) -> list[Message] | str:
    name = repr(fields.messages)
    if isinstance(value, str):  # a CSV cell
        try:
            value = json.loads(value)
        except json.JSONDecodeError:
            return f"{name} is text that is not a JSON list of messages"
    if not isinstance(value, list) or not value:
        return f"{name} is {_kind(value) if value != [] else 'an empty list'}, expected a list of messages"
    messages = []
    for i, item in enumerate(value):
        if not isinstance(item, dict) or item.get("role") not in ROLES:
            return f"{name}[{i}] is not a message with a role in {ROLES} (got {str(item)[:60]!r})"
        problem = _text(item.get("content"), f"{name}[{i}] content", may_be_empty=item["role"] != "assistant")
        if problem:
            return problem
        messages.append(Message(item["role"], item["content"]))
    turns = [m.role for m in messages if m.role != "system"]
    if not turns or turns[0] != "user":
        return (f"{name} must start with a user message (after any system message), got roles "
                f"{[m.role for m in messages]}")
    if fields.require_response and messages[-1].role != "assistant":
        return f"{name} ends with a {messages[-1].role} message: there is no response to learn"
    return messages


def split_bad_rows(rows: Sequence[tuple[str, dict[str, Any] | BadRow]], fields: Fields
                   ) -> tuple[list[InstructionExample], list[BadRow]]:
    """Examples and bad rows of parsed rows."""
    examples, bad = [], []
    for where, row in rows:
        result = row if isinstance(row, BadRow) else to_example(row, where, fields)
        (bad if isinstance(result, BadRow) else examples).append(result)
    return examples, bad


def check_fields_exist(rows: Sequence[tuple[str, Any]], fields: Fields, source: str) -> None:
    """Raise when no row of ``source`` has the prompt or the messages field: the field names are wrong, not the
    rows (better one clear error than every row reported bad)."""
    parsed = [row for _, row in rows if isinstance(row, dict)]
    if parsed and not any(fields.prompt in row or fields.messages in row for row in parsed):
        columns = sorted({key for row in parsed[:100] for key in row})
        raise KeyError(f"no row of {source} has a {fields.prompt!r} or {fields.messages!r} field (its fields: "
                       f"{columns[:20]}). HINT: set prompt_field=/response_field= (or messages_field=) to those names")
