"""Whether two tokenizers turn text into the same ids: what tells them apart, and what to call them in messages.

Compared by what decides the ids a model reads (the vocabulary, the special tokens' ids, the chat template and, for
open_clip, the context length), never by object identity: a tokenizer loaded twice from one folder is the same.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any

#: Special tokens of a transformers tokenizer whose ids are compared.
SPECIAL_TOKENS = ("bos", "eos", "unk", "sep", "pad", "cls", "mask")


def tokenizer_name(tokenizer: Any) -> str:
    """A short name for messages: the hub name or folder it was loaded from, or what kind it is.

    Example:
        >>> from lit_lowrank.data import ByteTokenizer
        >>> tokenizer_name(ByteTokenizer())
        "'bytes'"
    """
    from lit_lowrank.backbones.hf import BUNDLED

    inner = getattr(tokenizer, "tokenizer", None)  # open_clip's HFTokenizer wraps a transformers one
    path = getattr(tokenizer, "name_or_path", None) or getattr(inner, "name_or_path", None)
    if path:
        for name, folder in BUNDLED.items():
            if "/" in name and _same_path(path, folder):
                return repr(name)
        return repr(str(path))
    kind = type(tokenizer).__name__
    return {"SimpleTokenizer": "open_clip's CLIP BPE tokenizer"}.get(kind, kind)


def tokenizer_differences(first: Any, second: Any) -> list[str]:
    """What makes the two tokenizers give different ids (empty when they give the same).

    Example:
        >>> from lit_lowrank.data import ByteTokenizer
        >>> tokenizer_differences(ByteTokenizer(), ByteTokenizer())
        []
    """
    a, b = _facts(first), _facts(second)
    if a["kind"] != b["kind"]:
        return [f"a {a['kind']} vs a {b['kind']}"]
    problems = []
    if a["vocabulary"] != b["vocabulary"]:
        problems.append(_vocabulary_difference(a["vocabulary"], b["vocabulary"]))
    special = [f"{name} {a['special'].get(name)} vs {b['special'].get(name)}"
               for name in sorted(set(a["special"]) | set(b["special"]))
               if a["special"].get(name) != b["special"].get(name)]
    if special:
        problems.append(f"special token ids differ ({', '.join(special[:4])})")
    if a["chat_template"] != b["chat_template"]:
        problems.append("chat templates differ" if a["chat_template"] and b["chat_template"] else
                        f"chat template: {'one' if a['chat_template'] else 'none'} vs "
                        f"{'one' if b['chat_template'] else 'none'}")
    if a["context_length"] != b["context_length"]:
        problems.append(f"context length {a['context_length']} vs {b['context_length']}")
    return problems


def _facts(tokenizer: Any) -> dict[str, Any]:
    kind = type(tokenizer).__name__
    if kind == "ByteTokenizer":
        return {"kind": "byte tokenizer", "vocabulary": {}, "special": {}, "chat_template": None,
                "context_length": None}
    context_length = getattr(tokenizer, "context_length", None)  # open_clip's tokenizers pad to it
    if hasattr(tokenizer, "encoder") and hasattr(tokenizer, "sot_token_id"):  # open_clip's SimpleTokenizer
        return {"kind": "CLIP BPE tokenizer", "vocabulary": tokenizer.encoder, "chat_template": None,
                "special": {"sot": tokenizer.sot_token_id, "eot": tokenizer.eot_token_id},
                "context_length": context_length}
    inner = tokenizer.tokenizer if hasattr(tokenizer, "tokenizer") and context_length is not None else tokenizer
    if hasattr(inner, "get_vocab"):
        special = {name: getattr(inner, f"{name}_token_id", None) for name in SPECIAL_TOKENS}
        special["all special tokens"] = sorted(getattr(inner, "all_special_ids", None) or [])
        return {"kind": "transformers tokenizer", "vocabulary": inner.get_vocab(), "special": special,
                "chat_template": getattr(inner, "chat_template", None), "context_length": context_length}
    return {"kind": kind, "vocabulary": {"object": id(tokenizer)}, "special": {}, "chat_template": None,
            "context_length": context_length}


def _vocabulary_difference(a: dict[str, int], b: dict[str, int]) -> str:
    if len(a) != len(b):
        return f"vocabulary {len(a)} vs {len(b)} tokens"
    differing = sorted(token for token in set(a) | set(b) if a.get(token) != b.get(token))
    return f"vocabulary of {len(a)} tokens each, {len(differing)} with other ids (e.g. {differing[:3]})"


def _same_path(path: str, folder: Any) -> bool:
    try:
        return Path(path).resolve() == Path(folder()).resolve()
    except (ImportError, OSError):
        return False
