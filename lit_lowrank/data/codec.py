"""Text <-> the token ids a model reads, including a model pre-trained on a compacted vocabulary.

:class:`~lit_lowrank.data.TextBlocksDataModule` with ``max_vocab`` renumbers the most frequent tokenizer ids
``1..max_vocab-1`` (0 stands for all others), so the model it pre-trains reads those ids, not the tokenizer's.
A :class:`TokenCodec` holds that numbering (``kept_token_ids``) next to the tokenizer: it encodes text into model
ids and decodes model ids (say, a generation) back into text. Without ``kept_token_ids`` model ids are tokenizer ids.
"""
from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch


class TokenCodec:
    """A tokenizer plus the model's numbering of its ids (see the module docstring).

    Args:
        tokenizer: a transformers tokenizer.
        kept_token_ids: tokenizer id of each model id (``kept_token_ids[0]`` stands for every dropped token);
            ``None`` when the model reads the tokenizer's ids.
        extra_stop_token_ids: tokenizer ids besides EOS at which generation stops (a chat template's end of turn).

    Example:
        >>> from lit_lowrank.data.common import load_tokenizer
        >>> tok = load_tokenizer("sentence-transformers/all-MiniLM-L6-v2")
        >>> kept = [tok.unk_token_id] + tok.convert_tokens_to_ids(["the", "cat", "sat", "[SEP]"])
        >>> codec = TokenCodec(tok, kept)
        >>> codec.encode("the cat sat on the mat"), codec.eos_token_id, codec.vocab_size
        ([1, 2, 3, 0, 1, 0], 4, 5)
        >>> codec.decode([1, 2, 3, 4, 2])
        'the cat sat cat'
    """

    def __init__(self, tokenizer: Any, kept_token_ids: Sequence[int] | None = None,
                 extra_stop_token_ids: Sequence[int] = ()) -> None:
        self.tokenizer = tokenizer
        self.kept_token_ids = (None if kept_token_ids is None
                               else torch.as_tensor(list(kept_token_ids), dtype=torch.long))
        self._to_model: torch.Tensor | None = None
        if self.kept_token_ids is not None:
            size = max(len(tokenizer), int(self.kept_token_ids.max()) + 1)
            self._to_model = torch.zeros(size, dtype=torch.long)
            self._to_model[self.kept_token_ids[1:]] = torch.arange(1, len(self.kept_token_ids))
        eos = tokenizer.eos_token_id if tokenizer.eos_token_id is not None else tokenizer.sep_token_id
        if eos is None:
            raise ValueError(f"the tokenizer {type(tokenizer).__name__} has neither an EOS nor a SEP token, so a "
                             "response cannot be ended. HINT: use a tokenizer with an EOS token, or add one "
                             "(tokenizer.add_special_tokens({'eos_token': '</s>'}) and resize the model's embeddings)")
        self.eos_token_id = self._model_id(eos, "its EOS token")
        pad = tokenizer.pad_token_id
        # Padding is masked out, so any id works; the model-space EOS keeps it inside a small vocabulary.
        self.pad_token_id = self.eos_token_id if pad is None or self._to_model is not None else pad
        self.stop_token_ids = sorted({self.eos_token_id,
                                      *(self._model_id(t, "its end-of-turn token") for t in extra_stop_token_ids)})

    def _model_id(self, token_id: int, what: str) -> int:
        if self._to_model is None:
            return int(token_id)
        model_id = int(self._to_model[token_id]) if token_id < len(self._to_model) else 0
        if model_id == 0 and token_id != int(self.kept_token_ids[0]):
            raise ValueError(f"the model's compacted vocabulary ({len(self.kept_token_ids)} ids) has no id for "
                             f"{what} (tokenizer id {token_id}), so generations could never end. HINT: pre-train with "
                             "a vocabulary that keeps it (TextBlocksDataModule puts EOS/SEP between documents)")
        return model_id

    @property
    def vocab_size(self) -> int:
        """Model ids are below this."""
        return len(self.kept_token_ids) if self.kept_token_ids is not None else len(self.tokenizer)

    def to_model_ids(self, token_ids: Sequence[int]) -> list[int]:
        """Tokenizer ids -> model ids (tokens outside a compacted vocabulary become 0)."""
        if self._to_model is None:
            return list(token_ids)
        ids = torch.as_tensor(list(token_ids), dtype=torch.long).clamp(max=len(self._to_model) - 1)
        return self._to_model[ids].tolist()

    def encode(self, text: str) -> list[int]:
        """Model ids of ``text``, without the special tokens a tokenizer adds around a sequence."""
        ids = self.tokenizer(text, add_special_tokens=False, return_attention_mask=False,
                             return_token_type_ids=False, verbose=False)["input_ids"]
        return self.to_model_ids(ids)

    def decode(self, model_ids: Sequence[int], skip_special_tokens: bool = True) -> str:
        """Text of model ids (special tokens, such as EOS, left out unless asked for)."""
        ids = [int(i) for i in model_ids]
        if self.kept_token_ids is not None:
            ids = self.kept_token_ids[torch.as_tensor(ids, dtype=torch.long)].tolist() if ids else []
        return self.tokenizer.decode(ids, skip_special_tokens=skip_special_tokens)


def load_kept_token_ids(path: str) -> list[int]:
    """``kept_token_ids`` of a compacted vocabulary from a ``.json`` list, or from a Lightning checkpoint of a run
    whose :class:`~lit_lowrank.data.TextBlocksDataModule` had ``max_vocab`` (its state is saved with the checkpoint).

    Example:
        >>> import tempfile, os
        >>> path = os.path.join(tempfile.mkdtemp(), "vocabulary.json")
        >>> _ = open(path, "w").write("[100, 1996, 102]")
        >>> load_kept_token_ids(path)
        [100, 1996, 102]
    """
    file = Path(path)
    if not file.is_file():
        raise FileNotFoundError(f"vocabulary file {path!r} does not exist (working directory: {Path.cwd()}). "
                                "HINT: give the checkpoint of the pre-training run (its TextBlocksDataModule had "
                                "max_vocab) or a .json list of token ids; run the pre-training recipe first")
    if file.suffix == ".json":
        ids = json.loads(file.read_text(encoding="utf-8-sig"))  # a list typed in Notepad may start with a BOM
    else:
        checkpoint = torch.load(file, map_location="cpu", weights_only=True)
        found = [v["kept_token_ids"] for v in checkpoint.values() if isinstance(v, dict) and "kept_token_ids" in v]
        if not found:
            raise ValueError(f"the checkpoint {path!r} holds no compacted vocabulary (no data module state with "
                             "'kept_token_ids'). HINT: its run did not use TextBlocksDataModule(max_vocab=...); drop "
                             "`vocabulary` and let the data use the tokenizer's own ids")
        ids = found[0]
    ids = [int(i) for i in ids]
    if len(ids) < 2:
        raise ValueError(f"{path!r} lists {len(ids)} token ids; a compacted vocabulary has at least two")
    return ids
