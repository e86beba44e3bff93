"""Instruction tuning data for causal LMs: prompt/response pairs or chats, responses supervised, prompts masked."""
from __future__ import annotations

import dataclasses
import json
from collections.abc import Sequence
from typing import Any, Literal

from lightning.pytorch.utilities import rank_zero_warn

from lit_lowrank.data.chat_format import (
    ChatFormatter,
    EncodedExample,
    end_of_turn_token_ids,
    truncation_note,
    uses_chat_template,
)
from lit_lowrank.data.codec import TokenCodec, load_kept_token_ids
from lit_lowrank.data.common import LazyTokenizer, ListDataset, SeededDataModule
from lit_lowrank.data.corpus import DEFAULT_PACKAGES, docstring_classification, stable_fraction
from lit_lowrank.data.hf_datasets import load_hf_splits
from lit_lowrank.data.instruction_batches import EvaluationCollator, PackedCollator, SupervisedCollator, pack
from lit_lowrank.data.instruction_rows import (
    BadRow,
    Fields,
    InstructionExample,
    Message,
    check_fields_exist,
    read_rows,
    split_bad_rows,
)
from lit_lowrank.data.prompts import Prompt, PromptCollator
from lit_lowrank.data.user_files import listing

SPLITS = ("train", "validation", "test", "predict")

HF_HINT = "use local files instead (train_file=..., .jsonl or .csv)"


class InstructionDataModule(LazyTokenizer, SeededDataModule):
    """Supervised fine-tuning data: prompt/response pairs or chats from JSONL/CSV files or a HF dataset.

    Each example is formatted with the tokenizer's chat template when it has one, else with the plain template
    ``### Instruction:\\n{prompt}\\n\\n### Response:\\n{response}<EOS>`` (see :mod:`lit_lowrank.data.chat_format`
    for both, the exact labels and truncation). Labels are -100 on every prompt, system, user and padding token;
    the response tokens and the EOS after them are supervised. Sequences longer than ``max_length`` lose their
    oldest prompt tokens first; the response is cut only when it alone leaves less than a quarter of
    ``max_length`` for the prompt. Batches are padded to their longest example.

    Training batches: ``input_ids``, ``attention_mask``, ``labels`` (with ``packing``: several examples per row,
    ``position_ids`` and a 4D block-diagonal ``attention_mask``, see
    :class:`~lit_lowrank.data.instruction_batches.PackedCollator`). Validation/test batches add
    ``prompt_input_ids``/``prompt_attention_mask`` (left-padded prompts) and the lists ``prompts``,
    ``references`` and ``references_decoded``, which :class:`~lit_lowrank.tasks.CausalLMTask` uses to generate
    and score answers. ``predict`` batches hold only the prompt fields: of ``predict_file`` (responses optional
    there) or of the test split.

    Bad rows (unparsable JSON, bytes that are not UTF-8, a missing or non-text field, an empty response, a
    malformed chat) are never dropped silently: with ``bad_rows="warn"`` they are skipped with a warning that
    counts them and lists each as ``file:line: what is wrong``; with ``"error"`` they stop ``setup``.
    ``self.bad_rows`` keeps them all. A byte-order mark (Excel's "CSV UTF-8") is ignored; a file that is not
    UTF-8 as a whole (UTF-16, or most rows Latin-1) stops ``setup`` with an error saying how to convert it.

    Args:
        train_file: training examples: ``.jsonl`` (one JSON object per line), ``.csv`` or ``.tsv``.
        val_file: validation examples; by default ``val_fraction`` of ``train_file``, chosen by a stable hash of
            each example's text (so duplicates share a split).
        test_file: test examples (``test``, and ``predict`` without ``predict_file``).
        predict_file: prompts to answer in ``predict``; a response, when given, is the reference.
        prompt_field: field holding the prompt (the user message).
        response_field: field holding the response to learn.
        messages_field: field holding a chat, ``[{"role": "system"|"user"|"assistant", "content": ...}, ...]``
            (as a JSON string in CSV files); a row with it is read as a chat, its assistant turns are supervised
            and its last message must be the assistant's.
        system_prompt: system message put first in every example that has none; empty for none.
        template: ``auto`` (the tokenizer's chat template when it has one, else the plain template), ``chat``
            (require the tokenizer's) or ``plain``.
        hf_dataset: a Hugging Face dataset name, a local dataset folder, or ``json``/``csv``/``parquet`` with
            ``hf_data_files`` (used instead of the files); needs the ``datasets`` package, and for a hub name the
            hub or a local cache. Rows are read as from files: a null field counts as missing (Arrow gives every
            row every column), so pairs and chats mix.
        hf_config: the dataset's configuration name (e.g. ``main`` for ``openai/gsm8k``).
        hf_data_files: local data files of ``hf_dataset`` (a path, a list, or ``{split: path}``), as
            ``datasets.load_dataset(data_files=...)`` takes them.
        hf_splits: our split -> the dataset's split, which may be sliced (``{train: "train[:90%]", validation:
            "train[90%:]"}``); by default ``train``/``validation``/``test`` where they exist.
        val_fraction: share of the training examples held out when there is no validation file or split.
        tokenizer: ``None`` (default): the tokenizer of the model's backbone (without a model, or when the backbone
            has none: the bundled MiniLM). A transformers tokenizer, hub name or local folder, given here must give
            the backbone tokenizer's ids (see :class:`~lit_lowrank.data.common.LazyTokenizer`).
        vocabulary: the compacted vocabulary of a model pre-trained with ``TextBlocksDataModule(max_vocab=...)``:
            its checkpoint (the vocabulary is saved in it) or a ``.json`` list of token ids; ``None`` when the
            model reads the tokenizer's own ids.
        max_length: longest tokenised example (prompt and response).
        packing: pack several training examples into each row of ``max_length`` tokens (fewer pad tokens).
        bad_rows: ``warn`` (skip them, with a warning listing them) or ``error``.
        batch_size: examples (with ``packing``: rows) per batch.
        num_workers: DataLoader worker processes.
        seed: seeds the training order.

    Example:
        >>> import tempfile, os, json
        >>> path = os.path.join(tempfile.mkdtemp(), "train.jsonl")
        >>> rows = [{"prompt": f"What is {i} plus 1?", "response": f"#### {i + 1}"} for i in range(20)]
        >>> _ = open(path, "w").write("\\n".join(json.dumps(r) for r in rows))
        >>> dm = InstructionDataModule(path, batch_size=4, max_length=32)
        >>> dm.setup("fit")
        >>> batch = next(iter(dm.train_dataloader()))
        >>> sorted(batch), batch["input_ids"].shape[0]
        (['attention_mask', 'input_ids', 'labels'], 4)
        >>> first = dm.examples["train"][0]
        >>> dm.codec.decode(first.input_ids)  # MiniLM's WordPiece lower-cases and spaces out punctuation
        '# # # instruction : what is 0 plus 1? # # # response : # # # # 1'
        >>> dm.codec.decode([t for t, label in zip(first.input_ids, first.labels) if label != -100], False)
        '# # # # 1 [SEP]'
    """

    def __init__(
        self,
        train_file: str | None = None,
        val_file: str | None = None,
        test_file: str | None = None,
        predict_file: str | None = None,
        prompt_field: str = "prompt",
        response_field: str = "response",
        messages_field: str = "messages",
        # `str`, not Optional[str]: jsonargparse reads Optional[str] values as YAML, where text starting with '#' (a
        # markdown heading) is a comment, i.e. None.
        system_prompt: str = "",
        template: Literal["auto", "chat", "plain"] = "auto",
        hf_dataset: str | None = None,
        hf_config: str | None = None,
        hf_data_files: str | list[str] | dict[str, str | list[str]] | None = None,
        hf_splits: dict[str, str] | None = None,
        val_fraction: float = 0.1,
        tokenizer: str | None = None,
        vocabulary: str | None = None,
        max_length: int = 512,
        packing: bool = False,
        bad_rows: Literal["warn", "error"] = "warn",
        batch_size: int = 8,
        num_workers: int = 0,
        seed: int = 0,
    ) -> None:
        super().__init__(batch_size, num_workers, seed)
        if bad_rows not in ("warn", "error"):
            raise ValueError(f"bad_rows must be 'warn' or 'error', got {bad_rows!r}")
        if not 0.0 < val_fraction < 1.0:
            raise ValueError(f"val_fraction must be in (0, 1), got {val_fraction}")
        if max_length < 4:
            raise ValueError(f"max_length must be >= 4 tokens, got {max_length}")
        unknown = sorted(set(hf_splits or {}) - set(SPLITS))
        if unknown:
            raise ValueError(f"hf_splits maps our splits {list(SPLITS)} to the dataset's; {unknown} is not one of ours")
        self.save_hyperparameters()
        self.files = {"train": train_file, "validation": val_file, "test": test_file, "predict": predict_file}
        self.fields = Fields(prompt_field, response_field, messages_field, system_prompt or None)
        self.template, self.vocabulary = template, vocabulary
        self.hf_dataset, self.hf_config, self.hf_splits = hf_dataset, hf_config, hf_splits
        self.hf_data_files = hf_data_files
        self.val_fraction, self.tokenizer_name = val_fraction, tokenizer
        self.max_length, self.packing, self.bad_rows_policy = max_length, packing, bad_rows
        self._tokenizer: Any = None
        self._codec: TokenCodec | None = None
        self.examples: dict[str, list[EncodedExample]] = {}
        self.predict_prompts: list[Prompt] | None = None
        self.bad_rows: list[BadRow] = []

    @property
    def codec(self) -> TokenCodec:
        """Text <-> model ids (through ``vocabulary`` when given); generation stops at its ``stop_token_ids``."""
        if self._codec is None:
            tok = self.tokenizer
            kept = load_kept_token_ids(self.vocabulary) if self.vocabulary else None
            extra = end_of_turn_token_ids(tok) if uses_chat_template(tok, self.template) else []
            self._codec = TokenCodec(tok, kept, extra)
        return self._codec

    @property
    def vocab_size(self) -> int:
        """Token ids are below this (the tasks check it against the model's embedding)."""
        return self.codec.vocab_size

    def prepare_data(self) -> None:
        if self.hf_dataset:
            self._load_hf()  # download once, on one process

    def setup(self, stage: str | None = None) -> None:
        if self.follow_model_tokenizer(tokenized=bool(self.examples) or self.predict_prompts is not None):
            self._codec = None
        if self.examples or self.predict_prompts is not None:
            return
        raw = self.read_examples()
        if "validation" not in raw and "train" in raw:
            train = raw["train"]
            held_out = [stable_fraction(json.dumps([m.as_dict() for m in ex.messages])) < self.val_fraction
                        for ex in train]
            raw["train"] = [ex for ex, out in zip(train, held_out) if not out]
            raw["validation"] = [ex for ex, out in zip(train, held_out) if out]
            if not raw["train"] or not raw["validation"]:
                raise ValueError(f"the training data has too few examples ({len(train)}) to hold out "
                                 f"val_fraction={self.val_fraction}. HINT: give a val_file")
        formatter = ChatFormatter(self.codec, self.max_length, self.template)
        for split, examples in raw.items():
            if split == "predict":
                self.predict_prompts = [formatter.prompt(ex) for ex in examples]
                continue
            self.examples[split] = [formatter.encode(ex) for ex in examples]
            note = truncation_note(self.examples[split], split, self.max_length)
            if note:
                rank_zero_warn(note)
        if self.predict_prompts is None and "test" in self.examples:
            self.predict_prompts = [e.prompt for e in self.examples["test"]]

    def read_examples(self) -> dict[str, list[InstructionExample]]:
        """The examples of each split given (bad rows reported, see the class docstring)."""
        sources = self._load_hf() if self.hf_dataset else {
            split: (path, list(read_rows(path))) for split, path in self.files.items() if path}
        if not sources:
            raise ValueError("InstructionDataModule has no data: no train_file, val_file, test_file, predict_file or "
                             "hf_dataset. HINT: set data.init_args.train_file (a .jsonl or .csv file)")
        examples: dict[str, list[InstructionExample]] = {}
        for split, (name, rows) in sources.items():
            check_fields_exist(rows, self.fields, name)
            fields = self.fields if split != "predict" else dataclasses.replace(self.fields, require_response=False)
            examples[split], bad = split_bad_rows(rows, fields)
            self._report(bad, len(rows), name)
            if not examples[split]:
                raise ValueError(f"{name} has no usable example ({len(rows)} rows, {len(bad)} bad). HINT: see the "
                                 "bad rows listed above, or check prompt_field/response_field/messages_field")
        return examples

    def _report(self, bad: Sequence[BadRow], total: int, name: str) -> None:
        if not bad:
            return
        self.bad_rows.extend(bad)
        message = f"{len(bad)} of {total} rows of {name} are not usable examples:{listing(bad)}\n"
        fix = "fix or remove them" + (" (save the file as UTF-8 for those that are not)"
                                      if any(b.reason.startswith("not UTF-8") for b in bad) else "")
        if self.bad_rows_policy == "error":
            raise ValueError(message + f"HINT: {fix}, or set bad_rows='warn' to skip them")
        rank_zero_warn(message + f"They are skipped ({total - len(bad)} examples kept). HINT: {fix}, "
                                 "or set bad_rows='error' to stop at them")

    def _load_hf(self) -> dict[str, tuple]:
        wanted = self.hf_splits
        if not wanted:  # the standard splits the dataset has
            loaded = load_hf_splits(self.hf_dataset, self.hf_config, self.hf_data_files, hint=HF_HINT)
            wanted = {split: split for split in ("train", "validation", "test") if split in loaded}
            if not wanted:
                raise KeyError(f"{self.hf_dataset!r} has none of the splits train, validation, test (it has "
                               f"{sorted(loaded)}). HINT: map ours to its splits with hf_splits")
            loaded = {split: loaded[split] for split in wanted}
        else:
            loaded = load_hf_splits(self.hf_dataset, self.hf_config, self.hf_data_files, wanted, HF_HINT)
        return {ours: (f"{self.hf_dataset}/{theirs}",
                       [(f"{self.hf_dataset}/{theirs} row {i}", dict(row)) for i, row in enumerate(loaded[ours])])
                for ours, theirs in wanted.items()}

    def _split(self, split: str) -> list[EncodedExample]:
        if not self.examples and self.predict_prompts is None:
            self._require(None, f"{split} split")
        if split not in self.examples:
            option = {"train": "train_file", "validation": "val_file", "test": "test_file (or predict_file)"}[split]
            raise RuntimeError(f"{type(self).__name__} has no {split} split. HINT: set data.init_args.{option}")
        return self.examples[split]

    def train_dataloader(self):
        train = self._split("train")
        if self.packing:
            return self._loader(ListDataset(pack(train, self.max_length)), True,
                                PackedCollator(self.codec.pad_token_id))
        return self._loader(ListDataset(train), True, SupervisedCollator(self.codec.pad_token_id))

    def val_dataloader(self):
        return self._loader(ListDataset(self._split("validation")),
                            collate_fn=EvaluationCollator(self.codec.pad_token_id))

    def test_dataloader(self):
        return self._loader(ListDataset(self._split("test")), collate_fn=EvaluationCollator(self.codec.pad_token_id))

    def predict_dataloader(self):
        """Prompts of ``predict_file``, else of the test split."""
        if self.predict_prompts is None:
            self._split("test")  # says what is missing: setup, or a file to predict on
        return self._loader(ListDataset(self.predict_prompts), collate_fn=PromptCollator(self.codec.pad_token_id))


#: The question of :class:`DocstringInstructionDataModule` (the paragraph follows it after a blank line).
PACKAGE_QUESTION = "Which standard-library package does this docstring paragraph come from?"


class DocstringInstructionDataModule(InstructionDataModule):
    """The embedded docstring task as instructions, answered in GSM8K's format: *Which standard-library package
    does this docstring paragraph come from?* followed by the paragraph; the response is ``#### <package>``.

    Same paragraphs and fixed splits as :class:`~lit_lowrank.data.DocstringClassificationDataModule` (with the
    defaults 630/135/135 paragraphs, 15 per package in validation and test): chance level 1/9 = 11.1%. Offline and
    deterministic for a given Python version. Batches as in :class:`InstructionDataModule`.

    Args:
        packages: standard-library packages, the possible answers.
        cap_per_class: most paragraphs per package over the three splits.
        min_words: shortest paragraph kept, in words.
        fractions: train, validation and test shares (sum to 1; default 70/15/15), as in
            :class:`~lit_lowrank.data.DocstringClassificationDataModule`: each paragraph's split is fixed by a hash
            of its text, so a larger test share never moves a paragraph from test to train.
        tokenizer: ``None`` (default): the tokenizer of the model's backbone (without a model, or when the backbone
            has none: the bundled MiniLM). A transformers tokenizer, hub name or local folder, given here must give
            the backbone tokenizer's ids (see :class:`~lit_lowrank.data.common.LazyTokenizer`).
        vocabulary: a compacted vocabulary (checkpoint or ``.json``), as in :class:`InstructionDataModule`.
        max_length: longest tokenised example (p90 of the paragraphs is ~60 MiniLM tokens).
        template: ``auto``, ``chat`` or ``plain``, as in :class:`InstructionDataModule`.
        system_prompt: system message put first in every example; empty for none.
        packing: pack several training examples into each row.
        batch_size: examples (with ``packing``: rows) per batch.
        num_workers: DataLoader worker processes.
        seed: seeds the training order (the examples and splits do not depend on it).

    Example:
        >>> dm = DocstringInstructionDataModule(packages=["json", "http"], cap_per_class=20, batch_size=4)
        >>> dm.setup("fit")
        >>> [len(dm.examples[s]) for s in ("train", "validation", "test")]
        [28, 6, 6]
        >>> dm.examples["test"][0].prompt.reference
        '#### http'
    """

    def __init__(
        self,
        packages: Sequence[str] = DEFAULT_PACKAGES,
        cap_per_class: int = 100,
        min_words: int = 8,
        fractions: tuple[float, float, float] = (0.7, 0.15, 0.15),
        tokenizer: str | None = None,
        vocabulary: str | None = None,
        max_length: int = 128,
        template: Literal["auto", "chat", "plain"] = "auto",
        system_prompt: str = "",  # not Optional[str]: see InstructionDataModule
        packing: bool = False,
        batch_size: int = 16,
        num_workers: int = 0,
        seed: int = 0,
    ) -> None:
        super().__init__(system_prompt=system_prompt, template=template, tokenizer=tokenizer, vocabulary=vocabulary,
                         max_length=max_length, packing=packing, batch_size=batch_size, num_workers=num_workers,
                         seed=seed)
        self.save_hyperparameters()
        self.packages = tuple(packages)
        self.cap_per_class, self.min_words, self.fractions = cap_per_class, min_words, tuple(fractions)

    def read_examples(self) -> dict[str, list[InstructionExample]]:
        task = docstring_classification(self.packages, self.cap_per_class, self.min_words, self.fractions)
        system = [Message("system", self.fields.system_prompt)] if self.fields.system_prompt else []
        return {split: [InstructionExample(
                    (*system, Message("user", f"{PACKAGE_QUESTION}\n\n{ex.text}"),
                     Message("assistant", f"#### {self.packages[ex.label]}")), f"stdlib:{ex.source}")
                        for ex in examples]
                for split, examples in task.splits().items()}
