"""Sequence classification data: CSV/JSONL files, or the embedded docstring task, tokenised per batch."""
from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch

from lit_lowrank.data.common import (
    LazyTokenizer,
    ListDataset,
    SeededDataModule,
    SplitLoaders,
    column,
    label_ids,
    label_vocabulary,
    read_table,
)
from lit_lowrank.data.corpus import DEFAULT_PACKAGES, docstring_classification, stable_fraction

Example = tuple[str, int]

#: The cap that :class:`DocstringClassificationDataModule` passes for ``cap_per_class=None``: far above the
#: largest package's paragraph count (~750, tkinter).
UNCAPPED = 10**9


class TokenizeCollator:
    """Tokenise a list of ``(text, label)`` into one batch padded to its longest text (picklable for workers)."""

    def __init__(self, tokenizer: Any, max_length: int) -> None:
        self.tokenizer, self.max_length = tokenizer, max_length

    def __call__(self, examples: list[Example]) -> dict[str, torch.Tensor]:
        texts, labels = zip(*examples)
        batch = dict(self.tokenizer(list(texts), padding="longest", truncation=True, max_length=self.max_length,
                                    return_tensors="pt"))
        batch["labels"] = torch.tensor(labels, dtype=torch.long)
        return batch


class _ClassificationDataModule(SplitLoaders, LazyTokenizer, SeededDataModule):
    """Loaders and tokenizer shared by the text classification DataModules (subclasses fill ``self.splits``)."""

    def __init__(self, tokenizer: str | None, max_length: int, batch_size: int, num_workers: int, seed: int) -> None:
        super().__init__(batch_size, num_workers, seed)
        if max_length < 2:
            raise ValueError(f"max_length must be >= 2 tokens, got {max_length}")
        self.tokenizer_name, self.max_length = tokenizer, max_length
        self._tokenizer: Any = None
        self.splits: dict[str, list[Example]] = {}

    @property
    def num_classes(self) -> int:
        return len(self.class_names)

    @property
    def vocab_size(self) -> int:
        """Token ids are below this: the tokenizer's vocabulary, added tokens included (the tasks check the model)."""
        return len(self.tokenizer)

    def _split_loader(self, split: str, shuffle: bool = False):
        return self._loader(ListDataset(self._split(split)), shuffle, TokenizeCollator(self.tokenizer, self.max_length))

    def _split(self, split: str) -> list[Example]:
        if not self.splits:
            self._require(None, f"{split} split")
        if split not in self.splits:
            raise RuntimeError(f"{type(self).__name__} has no {split} split (predict uses the test split too). "
                               "HINT: set data.init_args.test_file")
        return self.splits[split]

    def predict_inputs(self) -> list[str]:
        """The text of each predict example, in loader order (for :class:`~lit_lowrank.callbacks.PredictionWriter`)."""
        return [text for text, _ in self._split("test")]


class TextClassificationDataModule(_ClassificationDataModule):
    """Text classification from ``.csv``, ``.tsv`` or ``.jsonl`` files, tokenised per batch with dynamic padding.

    Batches are the tokenizer's output (``input_ids``, ``attention_mask``, and ``token_type_ids`` when it gives
    them), padded to the longest text of the batch and truncated at ``max_length``, plus ``labels: LongTensor[B]``.

    Label ids (see :func:`~lit_lowrank.data.common.label_vocabulary`): ``class_names`` when given, else the
    labels found in all the files given, in ascending numeric order when they are all integers (``0..K-1`` keep
    their ids; ``"3"`` and ``3`` are the same label), in ascending string order otherwise.
    ``class_names``/``num_classes`` are known before ``setup`` (they read the files' label column).

    Args:
        train_file: training examples, ``.csv``, ``.tsv`` or ``.jsonl`` (one JSON object per line).
        val_file: validation examples; by default ``val_fraction`` of ``train_file``, chosen by a stable hash of
            each row's position and text.
        test_file: test examples; ``predict`` runs on them too (there is no separate predict file).
        text_field: column holding the text.
        label_field: column holding the label (a string or an integer).
        class_names: every class, in label-id order; by default found in the files as described above.
        val_fraction: share of ``train_file`` held out when there is no ``val_file``.
        tokenizer: ``None`` (default): the tokenizer of the model's backbone (without a model, or when the backbone
            has none: the bundled MiniLM). A transformers tokenizer, hub name or local folder, given here must give
            the backbone tokenizer's ids (see :class:`~lit_lowrank.data.common.LazyTokenizer`).
        max_length: longest tokenised text; longer ones are truncated.
        batch_size: examples per batch.
        num_workers: DataLoader worker processes.
        seed: seeds the training order.

    Example:
        >>> import tempfile, os
        >>> path = os.path.join(tempfile.mkdtemp(), "train.csv")
        >>> _ = open(path, "w").write("text,label\\n" + "a good film,pos\\na bad film,neg\\n" * 10)
        >>> dm = TextClassificationDataModule(path, batch_size=4)
        >>> dm.class_names, dm.num_classes
        (['neg', 'pos'], 2)
        >>> dm.setup("fit")
        >>> batch = next(iter(dm.train_dataloader()))
        >>> sorted(batch), batch["labels"].dtype
        (['attention_mask', 'input_ids', 'labels', 'token_type_ids'], torch.int64)
    """

    def __init__(
        self,
        train_file: str,
        val_file: str | None = None,
        test_file: str | None = None,
        text_field: str = "text",
        label_field: str = "label",
        class_names: list[str] | None = None,
        val_fraction: float = 0.1,
        tokenizer: str | None = None,
        max_length: int = 128,
        batch_size: int = 32,
        num_workers: int = 0,
        seed: int = 0,
    ) -> None:
        super().__init__(tokenizer, max_length, batch_size, num_workers, seed)
        if val_file is None and not 0.0 < val_fraction < 1.0:
            raise ValueError(f"val_fraction must be in (0, 1) when there is no val_file, got {val_fraction}")
        self.save_hyperparameters()
        self.files = {"train": train_file, "validation": val_file, "test": test_file}
        self.text_field, self.label_field = text_field, label_field
        self.val_fraction = val_fraction
        self._class_names = list(class_names) if class_names else None

    def _read(self, split: str) -> tuple[list[str], list[Any]]:
        path = self.files[split]
        rows, columns = read_table(path)
        texts = [str(t) for t in column(rows, columns, self.text_field, path, "text_field")]
        return texts, column(rows, columns, self.label_field, path, "label_field")

    @property
    def class_names(self) -> list[str]:
        """Class name of each label id (read from the files' label column when not given)."""
        if self._class_names is None:
            values = [v for split, path in self.files.items() if path for v in self._read(split)[1]]
            self._class_names = label_vocabulary(values)
        return self._class_names

    def setup(self, stage: str | None = None) -> None:
        self.follow_model_tokenizer(tokenized=False)  # text is tokenised per batch
        if self.splits:
            return
        for split, path in self.files.items():
            if path:
                texts, labels = self._read(split)
                self.splits[split] = list(zip(texts, label_ids(labels, self.class_names, repr(path))))
        if self.files["validation"] is None:
            train = self.splits["train"]
            held_out = [stable_fraction(f"{i}:{text}") < self.val_fraction for i, (text, _) in enumerate(train)]
            self.splits["train"] = [ex for ex, out in zip(train, held_out) if not out]
            self.splits["validation"] = [ex for ex, out in zip(train, held_out) if out]
            if not self.splits["validation"] or not self.splits["train"]:
                raise ValueError(f"{self.files['train']!r} has too few rows ({len(train)}) to hold out "
                                 f"val_fraction={self.val_fraction}. HINT: give a val_file")


class DocstringClassificationDataModule(_ClassificationDataModule):
    """The embedded task "which standard-library package does this docstring paragraph come from?".

    Built by :func:`~lit_lowrank.data.corpus.docstring_classification` (offline, deterministic per Python
    version; ~1.5 s the first time). With the defaults: 9 classes, 70/15/15 paragraphs per class in
    train/validation/test (630/135/135), chance level = majority-class rate = 1/9. Label ids follow
    ``packages``; ``class_names`` are the package names, known before ``setup``. Batches as in
    :class:`TextClassificationDataModule`.

    ``cap_per_class=None`` keeps every paragraph, so the classes are as large as their packages' docstrings
    (unbalanced); with ``fractions=(0.35, 0.10, 0.55)`` that is a larger test split (1396 paragraphs on CPython
    3.11, majority-class rate 17%) for benchmarks that need to resolve small accuracy differences.

    Args:
        packages: standard-library packages, one class each, in label-id order.
        cap_per_class: most paragraphs per class over the three splits, shared out by ``fractions``
            (``None``: no cap).
        min_words: shortest paragraph kept, in words.
        fractions: train, validation and test shares of each class's paragraphs (sum to 1). A paragraph's split
            depends on its text and these shares only (see
            :func:`~lit_lowrank.data.corpus.docstring_classification`).
        tokenizer: ``None`` (default): the tokenizer of the model's backbone (without a model, or when the backbone
            has none: the bundled MiniLM). A transformers tokenizer, hub name or local folder, given here must give
            the backbone tokenizer's ids (see :class:`~lit_lowrank.data.common.LazyTokenizer`).
        max_length: longest tokenised paragraph; longer ones are truncated.
        batch_size: examples per batch.
        num_workers: DataLoader worker processes.
        seed: seeds the training order (the dataset itself does not depend on it).

    Example:
        >>> dm = DocstringClassificationDataModule(packages=["json", "http"], cap_per_class=20, batch_size=8)
        >>> dm.class_names
        ['json', 'http']
        >>> dm.setup("fit")
        >>> batch = next(iter(dm.val_dataloader()))
        >>> batch["input_ids"].shape[0], batch["labels"].tolist() == [dm.splits["validation"][i][1] for i in range(6)]
        (6, True)
    """

    def __init__(
        self,
        packages: Sequence[str] = DEFAULT_PACKAGES,
        cap_per_class: int | None = 100,
        min_words: int = 8,
        tokenizer: str | None = None,
        max_length: int = 128,
        batch_size: int = 32,
        num_workers: int = 0,
        seed: int = 0,
        fractions: Sequence[float] = (0.7, 0.15, 0.15),
    ) -> None:
        super().__init__(tokenizer, max_length, batch_size, num_workers, seed)
        if cap_per_class is not None and cap_per_class < 1:
            raise ValueError(f"cap_per_class must be a positive number of paragraphs or None, got {cap_per_class}")
        self.save_hyperparameters()
        self.packages: Sequence[str] = tuple(packages)
        self.cap_per_class, self.min_words = cap_per_class, min_words
        self.fractions: tuple[float, ...] = tuple(float(f) for f in fractions)
        self.fingerprint: str | None = None

    @property
    def class_names(self) -> list[str]:
        """The package names, in label-id order."""
        return list(self.packages)

    def _cap(self) -> int:
        # The builder caps each split at round(cap * share); a cap above any package's paragraph count keeps
        # them all, and a fixed one keeps the builder's cache key the same for every "no cap" module.
        return UNCAPPED if self.cap_per_class is None else self.cap_per_class

    def setup(self, stage: str | None = None) -> None:
        self.follow_model_tokenizer(tokenized=False)  # text is tokenised per batch
        if self.splits:
            return
        task = docstring_classification(self.packages, self._cap(), self.min_words, self.fractions)
        self.fingerprint = task.fingerprint()
        self.splits = {split: [(ex.text, ex.label) for ex in examples] for split, examples in task.splits().items()}
