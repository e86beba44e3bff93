"""Image-caption pairs for CLIP: images through the backbone's open_clip preprocessing, captions through its
tokenizer."""
from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from torch.utils.data import Dataset
from torchvision.datasets.folder import default_loader

from lit_lowrank.data.common import LazyTokenizer, column, label_ids, label_vocabulary, read_table
from lit_lowrank.data.from_model import choose_tokenizer
from lit_lowrank.data.image_loaders import ClassificationLoaders, Triple, check_normalisation


class ImageCaptions(Dataset):
    """Image files with tokenised captions (and labels) as ``{"images", "texts"[, "labels"]}`` items."""

    def __init__(self, paths: list[str], tokens: torch.Tensor, labels: list[int] | None, transform: Any) -> None:
        self.paths, self.tokens, self.labels, self.transform = paths, tokens, labels, transform

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, index: int) -> dict[str, Any]:
        item = {"images": self.transform(default_loader(self.paths[index])), "texts": self.tokens[index]}
        if self.labels is not None:
            item["labels"] = self.labels[index]
        return item


class ImageTextDataModule(LazyTokenizer, ClassificationLoaders):
    """Image-caption pairs from ``.csv``/``.tsv``/``.jsonl`` files, captions tokenised for open_clip.

    Image paths are relative to the folder of the file that lists them (absolute paths work too). Batches are
    ``{"images": FloatTensor[B, 3, S, S], "texts": LongTensor[B, context_length]}`` plus ``"labels":
    LongTensor[B]`` when the files have the ``label_field`` column; label ids then follow
    :func:`~lit_lowrank.data.common.label_vocabulary` (numeric order for integer labels, string order otherwise).
    Captions are tokenised once in ``setup``. open_clip's own training CSVs name the columns ``filepath`` and
    ``title`` and are tab-separated: set ``image_field``/``text_field`` and use a ``.tsv`` name.

    The tokenizer and the image preprocessing are the model's backbone's (see
    :mod:`lit_lowrank.data.from_model`): open_clip's own transforms from its preprocess config, its tokenizer and
    context length. A tokenizer or context length given here that differs from the backbone's stops ``setup``; an
    ``image_size`` the model cannot take too. Without a model, open_clip's defaults: CLIP's BPE tokenizer with 77
    tokens, 224 x 224 images, OpenAI CLIP's statistics.

    Args:
        train_file: training pairs.
        val_file: validation pairs (needed by ``fit``, which validates).
        test_file: test pairs; ``predict`` runs on them too (there is no separate predict file).
        image_field: column with the image path.
        text_field: column with the caption.
        label_field: optional column with a class label; ignored when the files do not have it.
        class_names: every class, in label-id order; by default found in the files' label column.
        tokenizer: ``None`` (default): the backbone's; else an open_clip model name (``ViT-B-32``, ...) whose
            tokenizer to use (``open_clip.get_tokenizer``), which must be the backbone's.
        context_length: tokens per caption (padded or truncated); by default the tokenizer's.
        image_size: images are resized and centre-cropped to this square; by default the backbone's size.
        mean: per-channel normalisation mean; by default the backbone's.
        std: per-channel normalisation standard deviation; by default the backbone's.
        batch_size: pairs per batch.
        num_workers: DataLoader worker processes.
        seed: seeds the training order.
        augment: open_clip's training transform (random resized crops) for the training pairs.

    Example:
        >>> import tempfile, os
        >>> from PIL import Image
        >>> root = tempfile.mkdtemp()
        >>> for i in range(4):
        ...     Image.new("RGB", (9, 9)).save(os.path.join(root, f"{i}.png"))
        >>> _ = open(os.path.join(root, "pairs.csv"), "w").write(
        ...     "image,caption\\n" + "".join(f"{i}.png,a black square number {i}\\n" for i in range(4)))
        >>> dm = ImageTextDataModule(os.path.join(root, "pairs.csv"), context_length=12, image_size=8, batch_size=4)
        >>> dm.setup("test")  # no val_file: fine outside fit
        >>> batch = next(iter(dm.train_dataloader()))
        >>> sorted(batch), batch["images"].shape, batch["texts"].shape
        (['images', 'texts'], torch.Size([4, 3, 8, 8]), torch.Size([4, 12]))
    """

    def __init__(
        self,
        train_file: str,
        val_file: str | None = None,
        test_file: str | None = None,
        image_field: str = "image",
        text_field: str = "caption",
        label_field: str = "label",
        class_names: list[str] | None = None,
        tokenizer: str | None = None,
        context_length: int | None = None,
        image_size: int | None = None,
        mean: Triple | None = None,
        std: Triple | None = None,
        batch_size: int = 32,
        num_workers: int = 0,
        seed: int = 0,
        augment: bool = False,
    ) -> None:
        super().__init__(batch_size, num_workers, seed)
        check_normalisation(mean, std)
        self.save_hyperparameters()
        self.files = {"train": train_file, "validation": val_file, "test": test_file}
        self.image_field, self.text_field, self.label_field = image_field, text_field, label_field
        self.tokenizer_name, self.context_length = tokenizer, context_length
        self.image_size, self.augment = image_size, augment
        self.mean = tuple(mean) if mean is not None else None
        self.std = tuple(std) if std is not None else None
        self._class_names = list(class_names) if class_names else None
        self._tables: dict[str, tuple[list[dict[str, Any]], list[str]]] = {}
        self._tokenizer: Any = None
        self.datasets: dict[str, Dataset] = {}

    def _table(self, split: str) -> tuple[list[dict[str, Any]], list[str]]:
        if split not in self._tables:
            self._tables[split] = read_table(self.files[split])
        return self._tables[split]

    @property
    def has_labels(self) -> bool:
        """Whether the training file has the ``label_field`` column (then batches carry ``"labels"``)."""
        return self.label_field in self._table("train")[1]

    @property
    def class_names(self) -> list[str]:
        """Class name of each label id; empty when the files have no label column."""
        if self._class_names is None:
            values: list[Any] = []
            for split, path in self.files.items():
                if path and self.has_labels:
                    rows, columns = self._table(split)
                    values += column(rows, columns, self.label_field, path, "label_field")
            self._class_names = label_vocabulary(values) if values else []
        return self._class_names

    @property
    def tokenizer(self):
        """The open_clip tokenizer: ``tokenizer(list_of_str) -> LongTensor[N, context_length]``."""
        return super().tokenizer

    def load_named_tokenizer(self, name: str) -> Any:
        """open_clip's tokenizer of the model called ``name``, with ``context_length`` when given."""
        import open_clip

        if not name.startswith("hf-hub:") and open_clip.get_model_config(name) is None:
            # open_clip would quietly fall back to CLIP's tokenizer, hiding a typo
            raise ValueError(f"{name!r} is not an open_clip model name. HINT: choose one of open_clip.list_models() "
                             "(e.g. 'ViT-B-32'), or leave tokenizer unset for the backbone's")
        try:
            return open_clip.get_tokenizer(name, context_length=self.context_length)
        except Exception as error:  # an HF tokenizer (hf-hub: models) that cannot be downloaded
            first_line = (str(error).splitlines() or [""])[0][:200]
            raise OSError(f"could not build the open_clip tokenizer of {name!r}: the model hub is unreachable or "
                          f"does not have it ({type(error).__name__}: {first_line}). HINT: name a model of "
                          "open_clip.list_models(), or leave tokenizer unset for the backbone's") from error

    def _choose_tokenizer(self) -> Any:
        import open_clip

        model = self.attached_model()
        own = getattr(model, "tokenizer", None) if model is not None else None
        own_length = getattr(own, "context_length", None)
        if self.tokenizer_name is None and self.context_length not in (None, own_length) and own is not None:
            raise ValueError(f"data.init_args.context_length={self.context_length}, but the model's text tower takes "
                             f"{own_length} tokens. HINT: leave data.init_args.context_length unset: the backbone's "
                             "tokenizer and context length are then used")
        return choose_tokenizer(model, self.tokenizer_name, self.load_named_tokenizer,
                                lambda: open_clip.tokenizer.SimpleTokenizer(context_length=self.context_length or 77))

    def _pairs(self, split: str, transform: Any) -> ImageCaptions:
        path = self.files[split]
        rows, columns = self._table(split)
        images = column(rows, columns, self.image_field, path, "image_field")
        captions = [str(c) for c in column(rows, columns, self.text_field, path, "text_field")]
        folder = Path(path).parent
        paths = [str(folder / p) for p in images]  # an absolute p stays absolute
        missing = [p for p in paths if not Path(p).is_file()]
        if missing:
            raise FileNotFoundError(f"{len(missing)} image(s) listed in {path!r} do not exist, e.g. {missing[:3]}. "
                                    "HINT: image paths are relative to the folder of the file that lists them")
        labels = None
        if self.has_labels:
            labels = label_ids(column(rows, columns, self.label_field, path, "label_field"), self.class_names,
                               repr(path))
        length = getattr(self.tokenizer, "context_length", None) or self.context_length or 77
        tokens = self.tokenizer(captions) if captions else torch.empty(0, length, dtype=torch.long)
        return ImageCaptions(paths, tokens.long(), labels, transform)

    def setup(self, stage: str | None = None) -> None:
        from lit_lowrank.backbones.image_preprocessing import ImagePreprocessing

        self.follow_model_tokenizer(tokenized=bool(self.datasets))
        preprocessing = self.choose_preprocessing(ImagePreprocessing.open_clip_default(), self.image_size, self.mean,
                                                  self.std)
        evaluate = preprocessing.transform()
        if self.datasets:  # set up before: only the transforms can have changed
            for split, dataset in self.datasets.items():
                dataset.transform = evaluate if split != "train" or not self.augment else preprocessing.transform({})
            return
        if stage in (None, "fit") and not self.files["validation"]:
            raise ValueError("fit validates, so ImageTextDataModule needs val_file=... (pairs for validation)")
        train = preprocessing.transform({}) if self.augment else evaluate
        self.datasets = {split: self._pairs(split, train if split == "train" else evaluate)
                         for split, path in self.files.items() if path}
