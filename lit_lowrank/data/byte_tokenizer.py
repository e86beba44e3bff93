"""A byte-level tokenizer: token id = UTF-8 byte value (0..255), plus one end-of-text token (256).

It needs no files and no download, never meets an unknown character, and keeps a model's vocabulary at 257 rows,
so a small model pre-trained from scratch spends its parameters on the transformer blocks rather than on the
embedding (as in real LLMs, where the block matrices hold most of the weights).

It implements the part of the transformers tokenizer interface that the data modules, :class:`TokenCodec` and
the tasks use: ``__call__`` (batched or single text), ``decode``, ``__len__`` and the special-token ids.
"""
from __future__ import annotations

from collections.abc import Sequence

import torch

#: ``tokenizer`` value of :class:`~lit_lowrank.data.TextBlocksDataModule` that selects :class:`ByteTokenizer`.
BYTES = "bytes"


class ByteTokenizer:
    """UTF-8 bytes as token ids 0..255; ``eos_token_id`` 256 ends (and separates) documents.

    There is no padding, unknown, BOS or SEP token: every text has bytes, and padding is masked out anyway
    (:class:`~lit_lowrank.data.TokenCodec` pads with EOS when a tokenizer has no pad token).

    Example:
        >>> tok = ByteTokenizer()
        >>> tok("hé", add_special_tokens=False)["input_ids"], len(tok)
        ([104, 195, 169], 257)
        >>> tok.decode([104, 195, 169, 256]), tok.decode([104, 256], skip_special_tokens=False)
        ('hé', 'h<|endoftext|>')
    """

    eos_token = "<|endoftext|>"
    eos_token_id = 256
    pad_token_id = None
    unk_token_id = None
    sep_token_id = None
    bos_token_id = None
    name_or_path = BYTES

    def __len__(self) -> int:
        return 257

    @property
    def vocab_size(self) -> int:
        return len(self)

    def __call__(self, text: str | Sequence[str], add_special_tokens: bool = False, **_: object
                 ) -> dict[str, list[int] | list[list[int]]]:
        """``{"input_ids": ids}`` of one text, or a list of id lists for a list of texts. ``add_special_tokens``
        appends EOS; the other keyword arguments of a transformers tokenizer (attention masks...) are ignored."""
        tail = [self.eos_token_id] if add_special_tokens else []
        if isinstance(text, str):
            return {"input_ids": list(text.encode("utf-8")) + tail}
        return {"input_ids": [list(item.encode("utf-8")) + tail for item in text]}

    def encode(self, text: str, add_special_tokens: bool = False) -> list[int]:
        return self(text, add_special_tokens=add_special_tokens)["input_ids"]

    def decode(self, token_ids: Sequence[int] | torch.Tensor, skip_special_tokens: bool = True) -> str:
        """Text of the ids; a byte sequence cut inside a character decodes to U+FFFD (as a generation may stop)."""
        ids = token_ids.tolist() if isinstance(token_ids, torch.Tensor) else [int(i) for i in token_ids]
        pieces, run = [], bytearray()
        for token in ids:
            if token < 256:
                run.append(token)
                continue
            pieces.append(run.decode("utf-8", errors="replace"))
            run = bytearray()
            if not skip_special_tokens:
                pieces.append(self.eos_token)
        pieces.append(run.decode("utf-8", errors="replace"))
        return "".join(pieces)

    def stream(self, texts: Sequence[str]) -> torch.Tensor:
        """Every text's bytes followed by EOS, as one LongTensor: the fast path of
        :class:`~lit_lowrank.data.TextBlocksDataModule` (a 13 MB corpus in well under a second, where lists
        of Python ints would take seconds and gigabytes)."""
        eos = torch.tensor([self.eos_token_id], dtype=torch.long)
        parts = []
        for text in texts:
            data = text.encode("utf-8")
            if data:
                parts.append(torch.frombuffer(bytearray(data), dtype=torch.uint8).long())
            parts.append(eos)
        return torch.cat(parts) if parts else torch.empty(0, dtype=torch.long)
