"""Token blocks for causal language modelling: local text files, the embedded Python corpora, or a HF dataset."""
from __future__ import annotations

import fnmatch
import glob
import itertools
import math
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from lightning.pytorch.utilities import rank_zero_warn
from torch.utils.data import Dataset

from lit_lowrank.data.byte_tokenizer import BYTES, ByteTokenizer
from lit_lowrank.data.codec import TokenCodec
from lit_lowrank.data.common import LazyTokenizer, ListDataset, SeededDataModule
from lit_lowrank.data.corpus import (
    CORPUS_VALIDATION_FRACTION,
    python_source_corpus,
    python_text_corpus,
    source_split_key,
    stable_fraction,
)
from lit_lowrank.data.hf_datasets import DatasetUnavailableError, load_hf_splits  # noqa: F401 (re-exported)
from lit_lowrank.data.prompts import Prompt, PromptCollator
from lit_lowrank.data.user_files import BadRow, listing, read_utf8_text, utf8_hint

#: ``source`` value that selects the embedded corpus (pydoc topics + standard-library docstrings).
EMBEDDED = "python"

#: ``source`` value that selects the standard library's source code plus the embedded corpus, split by file.
STDLIB_SOURCE = "python-source"

#: File patterns read from a folder given as ``source``.
TEXT_PATTERNS = ("*.txt", "*.md")


class TokenBlocks(Dataset):
    """Rows of a ``[num_blocks, block_size]`` LongTensor as ``{"input_ids", "labels"}`` (labels = input_ids)."""

    def __init__(self, blocks: torch.Tensor) -> None:
        self.blocks = blocks

    def __len__(self) -> int:
        return self.blocks.shape[0]

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        return {"input_ids": self.blocks[index], "labels": self.blocks[index]}


def read_text_documents(source: str | Sequence[str]) -> list[tuple[str, str]]:
    """(id, text) of every file named by ``source``: files, folders (``*.txt`` and ``*.md``, recursively) or globs.

    Ids are paths relative to the folder given (a file's own name when given directly), so the split they
    decide does not depend on where the data lives. Files are read as UTF-8, in sorted order per entry: a
    byte-order mark is dropped, a line that is not UTF-8 is left out with a warning listing it as
    ``file:line: reason``, and a file that is not UTF-8 as a whole raises
    :class:`~lit_lowrank.data.user_files.NotUtf8Error`.
    """
    entries = [source] if isinstance(source, (str, Path)) else list(source)
    documents: list[tuple[str, str]] = []
    skipped: list[tuple[Path, BadRow]] = []
    for entry in map(str, entries):
        path = Path(entry).expanduser()
        if path.is_dir():
            files = sorted({f for pattern in TEXT_PATTERNS for f in path.rglob(pattern) if f.is_file()})
            found = [(f.relative_to(path).as_posix(), f) for f in files]
        elif path.is_file():
            found = [(path.name, path)]
        else:
            found = [(Path(f).as_posix(), Path(f)) for f in sorted(glob.glob(entry, recursive=True))
                     if os.path.isfile(f)]
        if not found:
            raise FileNotFoundError(
                f"text source {entry!r} matches no file (a folder is searched for {' and '.join(TEXT_PATTERNS)}; "
                f"working directory: {Path.cwd()}). HINT: give a file, a folder, a glob such as 'data/**/*.txt', "
                f"or source={EMBEDDED!r} for the embedded corpus")
        for doc_id, file in found:
            text, bad = read_utf8_text(file)
            documents.append((doc_id, text))
            skipped += [(file, b) for b in bad]
    if skipped:
        rank_zero_warn(f"{len(skipped)} line(s) of {source} are not UTF-8 and left out:"
                       f"{listing([b for _, b in skipped])}\n{utf8_hint(skipped[0][0])}")
    return documents


def read_hf_documents(name: str, config: str | None, text_field: str, data_files: Any = None,
                      splits: dict[str, str] | None = None) -> dict[str, list[tuple[str, str]]]:
    """(id, text) rows of each split of a Hugging Face dataset, via the ``datasets`` library (see
    :func:`~lit_lowrank.data.hf_datasets.load_hf_splits` for ``data_files`` and ``splits``)."""
    hint = ("use local files instead: source='path/to/folder_or_file.txt' (plain text; a folder is searched for "
            f"*.txt and *.md), or source={EMBEDDED!r} for the embedded corpus")
    splits_loaded = load_hf_splits(name, config, data_files, splits, hint)
    documents = {}
    for split, rows in splits_loaded.items():
        if text_field not in rows.column_names:
            raise KeyError(f"the {split!r} split of {name!r} has no column {text_field!r} (its columns: "
                           f"{rows.column_names}). HINT: set text_field= to one of those")
        documents[split] = [(f"hf:{split}:{i}", text) for i, text in enumerate(rows[text_field]) if text]
    return documents


class TextBlocksDataModule(LazyTokenizer, SeededDataModule):
    """Fixed-length token blocks for causal language modelling, from local text or the embedded Python corpus.

    Every document is tokenised once in ``setup`` (no special tokens), followed by the tokenizer's EOS token
    (or SEP when it has no EOS) as a document separator; each split's documents are concatenated and cut into
    ``block_size`` blocks (the last partial block is dropped). Batches are
    ``{"input_ids": LongTensor[B, T], "labels": LongTensor[B, T]}`` with ``labels == input_ids`` (the model shifts).

    Validation split, fixed: ``val_source`` when given; else the documents with
    ``stable_fraction(id) < val_fraction`` (ids are relative file paths, ``pydoc:<topic>``/``stdlib:<path>`` for
    the embedded corpus, where the default 0.05 gives :func:`python_text_corpus`'s own split). When that leaves
    either side without a whole block (say, a single file), the last ``val_fraction`` of the token stream is
    held out instead.

    On CPython 3.11 the embedded corpus is ~577k MiniLM tokens (4,295 training and 213 validation blocks of
    128); building it takes ~5 s (once per process) and tokenising it ~1 s on one CPU core.

    ``source="python-source"`` adds the standard library's own ``.py`` files (about 12 MB of code, test folders
    and site-packages left out; see :func:`~lit_lowrank.data.corpus.python_source_corpus`) to the embedded
    corpus, and splits by file: a document is held out when ``stable_fraction(<its file's path relative to the
    stdlib folder>) < val_fraction`` (a pydoc topic: of its id), so a file's code and its docstrings are never on
    both sides. With ``tokenizer="bytes"`` (UTF-8 bytes, 257 ids) that is ~13.7M tokens (51,188 training and
    2,056 validation blocks of 256 on CPython 3.11), built and tokenised in ~7 s: a code-and-prose corpus for
    pre-training a small model whose parameters sit in its transformer blocks, not in its embedding.

    ``test`` reads ``test_source`` (cut into blocks like the validation text); without one it evaluates the
    validation blocks and warns that they are not a separate held-out split. ``predict`` generates continuations
    (with :class:`~lit_lowrank.tasks.CausalLMTask`) of ``predict_prompts``, or of the first quarter of every
    validation block, whose remaining three quarters are the reference.

    Args:
        source: ``"python"`` for the embedded corpus (pydoc topics + standard-library docstrings),
            ``"python-source"`` for the standard library's source code plus that corpus (split by file, see above),
            or text files, folders (``*.txt``/``*.md``, recursively) or globs; one or a list. Write ``./python`` for
            a folder called ``python``.
        val_source: files/folders/globs for validation; by default a fixed share of ``source`` (see above).
        tokenizer: ``None`` (default): the tokenizer of the model's backbone (without a model, or when the backbone
            has none: the bundled MiniLM; see :class:`~lit_lowrank.data.common.LazyTokenizer`). Else a transformers
            tokenizer, hub name or local folder, which must give the backbone tokenizer's ids when it has one; or
            ``"bytes"``: UTF-8 bytes as ids 0..255 and EOS 256 between documents
            (:class:`~lit_lowrank.data.ByteTokenizer`; no files, vocabulary 257).
        block_size: tokens per block.
        batch_size: blocks per batch.
        val_fraction: share of documents held out for validation when there is no ``val_source``.
        max_train_blocks: keep only this many training blocks (a seeded random choice), for quick runs.
        max_val_blocks: keep only the first this many validation blocks.
        hf_dataset: a Hugging Face dataset name, a local dataset folder, or ``json``/``csv``/``parquet`` with
            ``hf_data_files`` (used instead of ``source``); needs the ``datasets`` package, and for a hub name a
            reachable hub or a local cache. Its ``validation`` split is used when it has one.
        hf_config: the dataset's configuration name (e.g. ``wikitext-2-raw-v1``).
        hf_data_files: local data files of ``hf_dataset`` (a path, a list, or ``{split: path}``), as
            ``datasets.load_dataset(data_files=...)`` takes them.
        hf_splits: which splits to read as ``train`` and ``validation``, e.g. ``{train: "train[:95%]", validation:
            "train[95%:]"}`` (slices as ``datasets`` writes them); by default the dataset's own.
        text_field: the text column of ``hf_dataset``.
        max_vocab: keep only the ``max_vocab - 1`` most frequent token ids of the training blocks (ties broken by
            id) and renumber them ``1..max_vocab - 1`` by that order; every other id becomes 0. A small model
            pre-trained from scratch then gets a small embedding and output layer instead of the tokenizer's whole
            vocabulary. ``kept_token_ids[i]`` is the tokenizer id of new id ``i`` (0 stands for all dropped ones);
            it is saved with every checkpoint (the data module's state), so that fine-tuning data can use it
            (``InstructionDataModule(vocabulary=<checkpoint>)``).
        exclude: leave out the documents whose id matches one of these ``fnmatch`` patterns, e.g.
            ``stdlib:asyncio/*`` (ids: ``pydoc:<topic>``, ``stdlib:<path>`` (docstrings), ``source:<path>`` (code,
            ``"python-source"``), or file paths relative to the folder given). A pattern that matches no document is
            an error (a typo would otherwise exclude nothing).
        test_source: files/folders/globs for ``test``; without it ``test`` uses the validation blocks.
        predict_prompts: texts whose continuations ``predict`` generates; by default the first quarter of every
            validation block.
        num_workers: DataLoader worker processes.
        seed: seeds the training-block choice and the training order.

    Example:
        >>> import tempfile, os
        >>> folder = tempfile.mkdtemp()
        >>> _ = open(os.path.join(folder, "a.txt"), "w").write("the quick brown fox jumps over the lazy dog. " * 40)
        >>> dm = TextBlocksDataModule(folder, block_size=16, batch_size=4)
        >>> dm.setup("fit")
        >>> batch = next(iter(dm.train_dataloader()))
        >>> batch["input_ids"].shape, bool((batch["labels"] == batch["input_ids"]).all())
        (torch.Size([4, 16]), True)
    """

    def __init__(
        self,
        source: str | list[str] = EMBEDDED,
        val_source: str | list[str] | None = None,
        tokenizer: str | None = None,
        block_size: int = 128,
        batch_size: int = 16,
        val_fraction: float = CORPUS_VALIDATION_FRACTION,
        max_train_blocks: int | None = None,
        max_val_blocks: int | None = None,
        hf_dataset: str | None = None,
        hf_config: str | None = None,
        hf_data_files: str | list[str] | dict[str, str | list[str]] | None = None,
        hf_splits: dict[str, str] | None = None,
        text_field: str = "text",
        max_vocab: int | None = None,
        exclude: list[str] | None = None,
        test_source: str | list[str] | None = None,
        predict_prompts: list[str] | None = None,
        num_workers: int = 0,
        seed: int = 0,
    ) -> None:
        super().__init__(batch_size, num_workers, seed)
        if max_vocab is not None and max_vocab < 2:
            raise ValueError(f"max_vocab must be >= 2 (id 0 collects the dropped tokens), got {max_vocab}")
        if block_size < 2:
            raise ValueError(f"block_size must be >= 2 tokens, got {block_size}")
        if not 0.0 < val_fraction < 1.0:
            raise ValueError(f"val_fraction must be in (0, 1), got {val_fraction}")
        unknown = sorted(set(hf_splits or {}) - {"train", "validation"})
        if unknown:
            raise ValueError(f"hf_splits maps our splits ['train', 'validation'] to the dataset's; {unknown} is not "
                             "one of ours")
        self.save_hyperparameters()
        self.source, self.val_source = source, val_source
        self.tokenizer_name = tokenizer
        self.block_size, self.val_fraction = block_size, val_fraction
        self.max_train_blocks, self.max_val_blocks = max_train_blocks, max_val_blocks
        self.hf_dataset, self.hf_config, self.text_field = hf_dataset, hf_config, text_field
        self.hf_data_files, self.hf_splits = hf_data_files, hf_splits
        self.max_vocab = max_vocab
        self.exclude = list(exclude or [])
        self.test_source, self.predict_prompts = test_source, predict_prompts
        self.kept_token_ids: torch.Tensor | None = None
        self._tokenizer: Any = None
        self._codec: TokenCodec | None = None
        self.train_blocks: torch.Tensor | None = None
        self.val_blocks: torch.Tensor | None = None
        self.test_blocks: torch.Tensor | None = None

    def load_named_tokenizer(self, name: str) -> Any:
        """A :class:`ByteTokenizer` for ``"bytes"``, else the transformers tokenizer called ``name``."""
        return ByteTokenizer() if name == BYTES else super().load_named_tokenizer(name)

    @property
    def vocab_size(self) -> int:
        """Token ids are below this: ``max_vocab`` when set, else the tokenizer's vocabulary (added tokens included)."""
        return self.max_vocab if self.max_vocab is not None else len(self.tokenizer)

    @property
    def codec(self) -> TokenCodec:
        """Encodes text into the ids of the blocks and decodes generated ids (after ``setup`` when ``max_vocab``)."""
        if self._codec is None:
            if self.max_vocab is not None:
                self._require(self.kept_token_ids, "compacted vocabulary")
            self._codec = TokenCodec(self.tokenizer,
                                     None if self.kept_token_ids is None else self.kept_token_ids.tolist())
        return self._codec

    def state_dict(self) -> dict[str, Any]:
        """Saved with every checkpoint: the compacted vocabulary, which the model's ids refer to."""
        return {} if self.kept_token_ids is None else {"kept_token_ids": self.kept_token_ids.tolist()}

    def prepare_data(self) -> None:
        if self.hf_dataset:
            self._read_hf()  # download once, on one process

    def _read_hf(self) -> dict[str, list[tuple[str, str]]]:
        return read_hf_documents(self.hf_dataset, self.hf_config, self.text_field, self.hf_data_files, self.hf_splits)

    def setup(self, stage: str | None = None) -> None:
        if self.follow_model_tokenizer(tokenized=self.train_blocks is not None):
            self._codec = None
        if self.train_blocks is not None:
            return
        train_docs, val_docs, val_given = self._documents()
        train_ids, val_ids = self._tokens(train_docs), self._tokens(val_docs)
        if not val_given and min(len(train_ids), len(val_ids)) < self.block_size:
            stream = torch.cat([train_ids, val_ids])
            cut = len(stream) - max(self.block_size, math.ceil(self.val_fraction * len(stream)))
            train_ids, val_ids = stream[:cut], stream[cut:]
        test_ids = self._tokens([t for _, t in read_text_documents(self.test_source)]) if self.test_source else None
        if self.max_vocab is not None:
            mapping = self._compact(train_ids)
            train_ids, val_ids = mapping[train_ids], mapping[val_ids]
            test_ids = mapping[test_ids] if test_ids is not None else None
        train, val = self._blocks(train_ids, "training"), self._blocks(val_ids, "validation")
        self.test_blocks = self._blocks(test_ids, "test") if test_ids is not None else None
        if self.max_train_blocks is not None and self.max_train_blocks < len(train):
            keep = torch.randperm(len(train),
                                  generator=torch.Generator().manual_seed(self.seed))[: self.max_train_blocks]
            train = train[keep.sort().values]
        if self.max_val_blocks is not None:
            val = val[: self.max_val_blocks]
        self.train_blocks, self.val_blocks = train, val

    def _documents(self) -> tuple[list[str], list[str], bool]:
        """Training texts, validation texts, and whether the validation texts were given (not a share of training)."""
        if self.hf_dataset:
            splits = self._read_hf()
            if "train" not in splits:
                raise KeyError(f"{self.hf_dataset!r} has no 'train' split (it has {sorted(splits)})")
            if "validation" in splits:
                train = self._without_excluded(splits["train"])
                return [t for _, t in train], [t for _, t in splits["validation"]], True
            documents = splits["train"]
        elif isinstance(self.source, str) and self.source == EMBEDDED:
            documents = [(doc.source, doc.text) for doc in python_text_corpus()]
        elif isinstance(self.source, str) and self.source == STDLIB_SOURCE:
            documents = [(doc.source, doc.text) for doc in python_source_corpus()]
        else:
            documents = read_text_documents(self.source)
        documents = self._without_excluded(documents)
        if self.val_source is not None:
            return [t for _, t in documents], [t for _, t in read_text_documents(self.val_source)], True
        # The source corpus splits by file (its code and its docstrings are two documents); others by document.
        split_key = source_split_key if self.source == STDLIB_SOURCE else str
        held_out = [stable_fraction(split_key(doc_id)) < self.val_fraction for doc_id, _ in documents]
        return ([t for (_, t), out in zip(documents, held_out) if not out],
                [t for (_, t), out in zip(documents, held_out) if out], False)

    def _without_excluded(self, documents: list[tuple[str, str]]) -> list[tuple[str, str]]:
        if not self.exclude:
            return documents
        for pattern in self.exclude:
            if not any(fnmatch.fnmatchcase(doc_id, pattern) for doc_id, _ in documents):
                raise ValueError(f"exclude pattern {pattern!r} matches no document (ids look like "
                                 f"{[doc_id for doc_id, _ in documents[:3]]}). HINT: fix the pattern, e.g. "
                                 "'stdlib:asyncio/*' for a standard-library package of the embedded corpus")
        return [(doc_id, text) for doc_id, text in documents
                if not any(fnmatch.fnmatchcase(doc_id, pattern) for pattern in self.exclude)]

    def _tokens(self, texts: list[str]) -> torch.Tensor:
        if not texts:
            return torch.empty(0, dtype=torch.long)
        tok = self.tokenizer
        if isinstance(tok, ByteTokenizer):
            return tok.stream(texts)  # a tensor straight from the bytes: no Python list of millions of ints
        separator = tok.eos_token_id if tok.eos_token_id is not None else tok.sep_token_id
        ids = tok(texts, add_special_tokens=False, return_attention_mask=False, return_token_type_ids=False,
                  verbose=False)["input_ids"]
        tail = [separator] if separator is not None else []
        return torch.tensor(list(itertools.chain.from_iterable(doc + tail for doc in ids)), dtype=torch.long)

    def _compact(self, train_ids: torch.Tensor) -> torch.Tensor:
        """Tokenizer id -> new id: the most frequent training tokens become 1..max_vocab-1 (see ``max_vocab``), the
        rest 0."""
        used = train_ids[: len(train_ids) // self.block_size * self.block_size]  # what the training blocks hold
        counts = torch.bincount(used, minlength=len(self.tokenizer))
        # stable sort of -count: equal counts keep ascending id order, so the choice is deterministic
        order = torch.sort(-counts, stable=True).indices
        kept = order[: self.max_vocab - 1]
        kept = kept[counts[kept] > 0]
        mapping = torch.zeros(len(counts), dtype=torch.long)
        mapping[kept] = torch.arange(1, len(kept) + 1)
        self.kept_token_ids = torch.cat([torch.tensor([self.tokenizer.unk_token_id or 0]), kept])
        return mapping

    def _blocks(self, ids: torch.Tensor, split: str) -> torch.Tensor:
        count = len(ids) // self.block_size
        if count == 0:
            raise ValueError(f"the {split} text has {len(ids)} tokens, fewer than one block of {self.block_size}. "
                             "HINT: add text, or lower block_size")
        return ids[: count * self.block_size].view(count, self.block_size)

    def train_dataloader(self):
        return self._loader(TokenBlocks(self._require(self.train_blocks, "training blocks")), shuffle=True)

    def val_dataloader(self):
        return self._loader(TokenBlocks(self._require(self.val_blocks, "validation blocks")))

    def test_dataloader(self):
        """Blocks of ``test_source``; without one, the validation blocks (with a warning)."""
        if self.test_blocks is None:
            rank_zero_warn("TextBlocksDataModule has no test_source: testing on the validation blocks, which are not "
                           "a separate held-out split. HINT: set data.init_args.test_source to held-out text files")
            return self.val_dataloader()
        return self._loader(TokenBlocks(self.test_blocks))

    def predict_dataloader(self):
        """Prompts to continue: ``predict_prompts``, or the first quarter of each validation block (the rest of
        the block is the reference)."""
        codec = self.codec
        if self.predict_prompts is not None:
            prompts = [Prompt(codec.encode(text), text) for text in self.predict_prompts]
        else:
            cut = max(1, self.block_size // 4)
            prompts = []
            for block in self._require(self.val_blocks, "validation blocks").tolist():
                rest = codec.decode(block[cut:])
                prompts.append(Prompt(block[:cut], codec.decode(block[:cut]), rest, rest))
        return self._loader(ListDataset(prompts), collate_fn=PromptCollator(codec.pad_token_id))
