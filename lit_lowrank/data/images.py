"""Image classification and image-text data: scikit-learn digits, ImageFolder trees, CSVs of image + caption."""
from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch.utils.data import Dataset
from torchvision import transforms
from torchvision.datasets.folder import IMG_EXTENSIONS, default_loader, find_classes, make_dataset

from lit_lowrank.data.common import SeededDataModule, column, label_ids, label_vocabulary, read_table
from lit_lowrank.data.corpus import stable_fraction

#: timm's default normalisation (ImageNet statistics).
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
#: OpenAI CLIP's normalisation (most open_clip models use it).
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)

DIGIT_NAMES = ["zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine"]

Triple = tuple[float, float, float]


def eval_transform(image_size: int, mean: Sequence[float], std: Sequence[float]) -> transforms.Compose:
    """Resize the short side to ``image_size``, centre-crop a square, scale to [0, 1], normalise."""
    return transforms.Compose([
        transforms.Resize(image_size, interpolation=transforms.InterpolationMode.BICUBIC),
        transforms.CenterCrop(image_size),
        transforms.ToTensor(),
        transforms.Normalize(mean, std),
    ])


def _check_normalisation(mean: Sequence[float], std: Sequence[float]) -> None:
    if len(mean) != 3 or len(std) != 3 or min(std) <= 0:
        raise ValueError(f"mean and std are three per-channel values (std > 0), got mean={mean}, std={std}")


class _Samples(Dataset):
    """(path, label) pairs as ``{"images", "labels"}`` items, images loaded as RGB and transformed."""

    def __init__(self, samples: list[tuple[str, int]], transform: Any) -> None:
        self.samples, self.transform = samples, transform

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, index: int) -> dict[str, Any]:
        path, label = self.samples[index]
        return {"images": self.transform(default_loader(path)), "labels": label}


class GreyToNormalisedRGB:
    """Collate ``(image[1, h, w] in [0, 1], label)`` pairs: resize bilinearly, copy to 3 channels, normalise.

    A plain object rather than a DataModule method, so worker processes can pickle it on any platform.
    """

    def __init__(self, image_size: int, mean: Sequence[float], std: Sequence[float]) -> None:
        self.image_size = image_size
        self.mean, self.std = torch.tensor(mean).view(1, 3, 1, 1), torch.tensor(std).view(1, 3, 1, 1)

    def __call__(self, items: list[tuple[torch.Tensor, torch.Tensor]]) -> dict[str, torch.Tensor]:
        images = torch.stack([image for image, _ in items])
        images = F.interpolate(images, size=(self.image_size, self.image_size), mode="bilinear", align_corners=False)
        return {"images": (images.expand(-1, 3, -1, -1) - self.mean) / self.std,
                "labels": torch.stack([label for _, label in items])}


class _ClassificationLoaders(SeededDataModule):
    """train/val/test/predict loaders over ``self.datasets`` (filled by ``setup``)."""

    datasets: dict[str, Dataset]
    collate: Any = None  # the loaders' collate_fn (None: PyTorch's default)

    @property
    def num_classes(self) -> int:
        return len(self.class_names)

    def _split_loader(self, split: str, shuffle: bool = False):
        return self._loader(self._split(split), shuffle, self.collate)

    def _split(self, split: str) -> Dataset:
        if not self.datasets:
            self._require(None, f"{split} split")
        if split not in self.datasets:
            key = {"validation": "val"}.get(split, split)
            raise RuntimeError(f"{type(self).__name__} has no {split} split (predict uses the test split too). "
                               f"HINT: set data.init_args.{key}_dir (ImageFolder) or {key}_file (image-text pairs)")
        return self.datasets[split]

    def train_dataloader(self):
        return self._split_loader("train", shuffle=True)

    def val_dataloader(self):
        return self._split_loader("validation")

    def test_dataloader(self):
        return self._split_loader("test")

    def predict_dataloader(self):
        """The test split: there is no separate predict folder/file. Labels stay in the batches, so the
        prediction file can show them next to the predictions; ``predict_step`` does not use them."""
        return self._split_loader("test")

    def predict_inputs(self) -> list[str]:
        """What each predict example is, in loader order: its image path, or its position when it has none."""
        dataset = self._split("test")
        if isinstance(dataset, _Samples):
            return [path for path, _ in dataset.samples]
        if isinstance(dataset, _ImageText):
            return list(dataset.paths)
        return [str(i) for i in range(len(dataset))]


class DigitsDataModule(_ClassificationLoaders):
    """scikit-learn's 1,797 handwritten digits (8x8, 10 classes, offline) as normalised 3-channel images.

    Pixels (0..16) are scaled to [0, 1], upsampled bilinearly to ``image_size`` per batch (so memory stays
    small at 224), copied to 3 channels and normalised with ``mean``/``std``. Batches are
    ``{"images": FloatTensor[B, 3, S, S], "labels": LongTensor[B]}``. ``class_names`` are the English words
    ``"zero"`` .. ``"nine"`` (label id = the digit), which read naturally in CLIP prompts.

    The split is fixed and stratified, independent of ``seed``: within each class, images are ordered by
    ``stable_fraction("digits:<index>")``; the first 15% (rounded) are the test set, the next 15% validation,
    the rest training: 1,259 / 269 / 269 images. ``train_per_class`` keeps that many training images per
    class, chosen with ``seed`` (few-shot runs over several seeds see different shots, the same test set).

    Args:
        image_size: output height and width.
        train_per_class: keep only this many training images per class (few-shot); all when ``None``.
        mean: per-channel normalisation mean (ImageNet by default, as timm models expect).
        std: per-channel normalisation standard deviation.
        batch_size: images per batch.
        num_workers: DataLoader worker processes.
        seed: seeds the few-shot choice and the training order.

    Example:
        >>> dm = DigitsDataModule(image_size=16, train_per_class=2, batch_size=64)
        >>> dm.setup("fit")
        >>> batch = next(iter(dm.train_dataloader()))
        >>> batch["images"].shape, batch["labels"].bincount().tolist(), dm.class_names[:2]
        (torch.Size([20, 3, 16, 16]), [2, 2, 2, 2, 2, 2, 2, 2, 2, 2], ['zero', 'one'])
    """

    def __init__(
        self,
        image_size: int = 32,
        train_per_class: int | None = None,
        mean: Triple = IMAGENET_MEAN,
        std: Triple = IMAGENET_STD,
        batch_size: int = 64,
        num_workers: int = 0,
        seed: int = 0,
    ) -> None:
        super().__init__(batch_size, num_workers, seed)
        _check_normalisation(mean, std)
        if train_per_class is not None and train_per_class < 1:
            raise ValueError(f"train_per_class must be >= 1 (or None for all), got {train_per_class}")
        self.save_hyperparameters()
        self.image_size, self.train_per_class = image_size, train_per_class
        self.mean, self.std = tuple(mean), tuple(std)
        self.class_names = list(DIGIT_NAMES)
        self.datasets: dict[str, Dataset] = {}
        self.indices: dict[str, torch.Tensor] = {}
        self.collate = GreyToNormalisedRGB(image_size, self.mean, self.std)

    @staticmethod
    def split_indices(
        labels: Sequence[int], val_fraction: float = 0.15, test_fraction: float = 0.15
    ) -> dict[str, list[int]]:
        """The fixed stratified split described in the class docstring (indices into the 1,797 images)."""
        splits: dict[str, list[int]] = {"train": [], "validation": [], "test": []}
        for label in sorted(set(labels)):
            members = sorted((i for i, y in enumerate(labels) if y == label),
                             key=lambda i: stable_fraction(f"digits:{i}"))
            n_test, n_val = round(test_fraction * len(members)), round(val_fraction * len(members))
            splits["test"] += members[:n_test]
            splits["validation"] += members[n_test:n_test + n_val]
            splits["train"] += members[n_test + n_val:]
        return {split: sorted(indices) for split, indices in splits.items()}

    def setup(self, stage: str | None = None) -> None:
        if self.datasets:
            return
        from sklearn.datasets import load_digits

        digits = load_digits()
        images = torch.tensor(digits.images, dtype=torch.float32).unsqueeze(1) / 16.0
        labels = torch.tensor(digits.target, dtype=torch.long)
        indices = {split: torch.tensor(idx) for split, idx in self.split_indices(labels.tolist()).items()}
        if self.train_per_class is not None:
            generator = torch.Generator().manual_seed(self.seed)
            train, keep = indices["train"], []
            for label in range(len(self.class_names)):
                members = train[labels[train] == label]
                if self.train_per_class > len(members):
                    raise ValueError(f"train_per_class={self.train_per_class} but class {label} has only "
                                     f"{len(members)} training images")
                keep.append(members[torch.randperm(len(members), generator=generator)[: self.train_per_class]])
            indices["train"] = torch.cat(keep).sort().values
        self.indices = indices
        self.datasets = {split: torch.utils.data.TensorDataset(images[idx], labels[idx])
                         for split, idx in indices.items()}

    def predict_inputs(self) -> list[str]:
        """Each predict (test) image as ``digits[<i>]``, its index in scikit-learn's ``load_digits()``."""
        self._split("test")  # says what is missing
        return [f"digits[{i}]" for i in self.indices["test"].tolist()]



class ImageFolderDataModule(_ClassificationLoaders):
    """Images in class folders (``root/<class>/<image>``, as torchvision's ImageFolder), resized and normalised.

    Class names are the sub-folders of ``train_dir``, sorted (torchvision's rule), known before ``setup``; the
    validation and test folders are read with the same class-to-id map (a class missing there is fine, an
    unknown one is an error). Without ``val_dir``, the training images with
    ``stable_fraction(<class>/<file>) < val_fraction`` are held out. Batches are
    ``{"images": FloatTensor[B, 3, S, S], "labels": LongTensor[B]}``.

    Args:
        train_dir: folder of class folders for training.
        val_dir: same layout, for validation; by default ``val_fraction`` of ``train_dir``.
        test_dir: same layout, for testing; ``predict`` runs on it too (there is no separate predict folder).
        image_size: images are resized (short side) and centre-cropped to this square.
        mean: per-channel normalisation mean (ImageNet by default, as timm models expect).
        std: per-channel normalisation standard deviation.
        augment: random resized crops and horizontal flips for training images.
        val_fraction: share of ``train_dir`` held out when there is no ``val_dir``.
        batch_size: images per batch.
        num_workers: DataLoader worker processes.
        seed: seeds the training order.

    Example:
        >>> import tempfile, os
        >>> from PIL import Image
        >>> root = tempfile.mkdtemp()
        >>> for name in ("cat", "dog"):
        ...     os.makedirs(os.path.join(root, name))
        ...     for i in range(5):
        ...         Image.new("RGB", (12, 10)).save(os.path.join(root, name, f"{i}.png"))
        >>> dm = ImageFolderDataModule(root, image_size=8, val_fraction=0.3, batch_size=4)
        >>> dm.class_names
        ['cat', 'dog']
        >>> dm.setup("fit")
        >>> next(iter(dm.train_dataloader()))["images"].shape
        torch.Size([4, 3, 8, 8])
    """

    def __init__(
        self,
        train_dir: str,
        val_dir: str | None = None,
        test_dir: str | None = None,
        image_size: int = 224,
        mean: Triple = IMAGENET_MEAN,
        std: Triple = IMAGENET_STD,
        augment: bool = False,
        val_fraction: float = 0.1,
        batch_size: int = 32,
        num_workers: int = 0,
        seed: int = 0,
    ) -> None:
        super().__init__(batch_size, num_workers, seed)
        _check_normalisation(mean, std)
        if val_dir is None and not 0.0 < val_fraction < 1.0:
            raise ValueError(f"val_fraction must be in (0, 1) when there is no val_dir, got {val_fraction}")
        self.save_hyperparameters()
        self.dirs = {"train": train_dir, "validation": val_dir, "test": test_dir}
        self.image_size, self.augment, self.val_fraction = image_size, augment, val_fraction
        self.mean, self.std = tuple(mean), tuple(std)
        self._class_names: list[str] | None = None
        self.datasets: dict[str, Dataset] = {}

    @property
    def class_names(self) -> list[str]:
        """Sub-folder names of ``train_dir``, sorted; label id = position."""
        if self._class_names is None:
            root = Path(self.dirs["train"])
            if not root.is_dir():
                raise FileNotFoundError(f"train_dir {str(root)!r} is not a folder (working directory: {Path.cwd()})")
            self._class_names = find_classes(str(root))[0]
        return self._class_names

    def _samples(self, split: str) -> list[tuple[str, int]]:
        root = Path(self.dirs[split])
        if not root.is_dir():
            raise FileNotFoundError(f"{split} folder {str(root)!r} does not exist (working directory: {Path.cwd()})")
        unknown = sorted({p.name for p in root.iterdir() if p.is_dir()} - set(self.class_names))
        if unknown:
            raise ValueError(f"{split} folder {str(root)!r} has class folders {unknown} that train_dir does not have "
                             f"(its classes: {self.class_names})")
        mapping = {name: i for i, name in enumerate(self.class_names)}
        return make_dataset(str(root), mapping, extensions=IMG_EXTENSIONS, allow_empty=split != "train")

    def setup(self, stage: str | None = None) -> None:
        if self.datasets:
            return
        evaluate = eval_transform(self.image_size, self.mean, self.std)
        train_transform = evaluate
        if self.augment:
            train_transform = transforms.Compose([
                transforms.RandomResizedCrop(self.image_size, interpolation=transforms.InterpolationMode.BICUBIC),
                transforms.RandomHorizontalFlip(),
                transforms.ToTensor(),
                transforms.Normalize(self.mean, self.std),
            ])
        samples = {split: self._samples(split) for split, folder in self.dirs.items() if folder}
        if self.dirs["validation"] is None:
            root = Path(self.dirs["train"])
            held_out = [stable_fraction(Path(path).relative_to(root).as_posix()) < self.val_fraction
                        for path, _ in samples["train"]]
            samples["validation"] = [s for s, out in zip(samples["train"], held_out) if out]
            samples["train"] = [s for s, out in zip(samples["train"], held_out) if not out]
            if not samples["validation"] or not samples["train"]:
                raise ValueError(f"train_dir has too few images ({len(held_out)}) to hold out "
                                 f"val_fraction={self.val_fraction}. HINT: give val_dir")
        self.datasets = {split: _Samples(items, train_transform if split == "train" else evaluate)
                         for split, items in samples.items()}


class _ImageText(Dataset):
    def __init__(self, paths: list[str], tokens: torch.Tensor, labels: list[int] | None, transform: Any) -> None:
        self.paths, self.tokens, self.labels, self.transform = paths, tokens, labels, transform

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, index: int) -> dict[str, Any]:
        item = {"images": self.transform(default_loader(self.paths[index])), "texts": self.tokens[index]}
        if self.labels is not None:
            item["labels"] = self.labels[index]
        return item


class ImageTextDataModule(_ClassificationLoaders):
    """Image-caption pairs from ``.csv``/``.tsv``/``.jsonl`` files, captions tokenised for open_clip.

    Image paths are relative to the folder of the file that lists them (absolute paths work too). Batches are
    ``{"images": FloatTensor[B, 3, S, S], "texts": LongTensor[B, context_length]}`` plus ``"labels":
    LongTensor[B]`` when the files have the ``label_field`` column; label ids then follow
    :func:`~lit_lowrank.data.common.label_vocabulary` (numeric order for integer labels, string order otherwise).
    Captions are tokenised once in ``setup``. open_clip's own training CSVs name the columns ``filepath`` and
    ``title`` and are tab-separated: set ``image_field``/``text_field`` and use a ``.tsv`` name.

    Args:
        train_file: training pairs.
        val_file: validation pairs (needed by ``fit``, which validates).
        test_file: test pairs; ``predict`` runs on them too (there is no separate predict file).
        image_field: column with the image path.
        text_field: column with the caption.
        label_field: optional column with a class label; ignored when the files do not have it.
        class_names: every class, in label-id order; by default found in the files' label column.
        tokenizer: an open_clip model name (``ViT-B-32``, ...) whose tokenizer to use (``open_clip.get_tokenizer``);
            by default open_clip's CLIP BPE tokenizer (``SimpleTokenizer``).
        context_length: tokens per caption (padded or truncated); by default 77, or the named model's own.
        image_size: images are resized (short side) and centre-cropped to this square.
        mean: per-channel normalisation mean (OpenAI CLIP's by default).
        std: per-channel normalisation standard deviation.
        batch_size: pairs per batch.
        num_workers: DataLoader worker processes.
        seed: seeds the training order.

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
        image_size: int = 224,
        mean: Triple = CLIP_MEAN,
        std: Triple = CLIP_STD,
        batch_size: int = 32,
        num_workers: int = 0,
        seed: int = 0,
    ) -> None:
        super().__init__(batch_size, num_workers, seed)
        _check_normalisation(mean, std)
        self.save_hyperparameters()
        self.files = {"train": train_file, "validation": val_file, "test": test_file}
        self.image_field, self.text_field, self.label_field = image_field, text_field, label_field
        self.tokenizer_name, self.context_length = tokenizer, context_length
        self.image_size, self.mean, self.std = image_size, tuple(mean), tuple(std)
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
        if self._tokenizer is None:
            import open_clip

            if self.tokenizer_name is None:
                self._tokenizer = open_clip.tokenizer.SimpleTokenizer(context_length=self.context_length or 77)
            else:
                if (not self.tokenizer_name.startswith("hf-hub:")
                        and open_clip.get_model_config(self.tokenizer_name) is None):
                    # open_clip would quietly fall back to CLIP's tokenizer, hiding a typo
                    raise ValueError(f"{self.tokenizer_name!r} is not an open_clip model name. HINT: choose one of "
                                     "open_clip.list_models() (e.g. 'ViT-B-32'), or leave tokenizer unset for "
                                     "CLIP's BPE tokenizer")
                try:
                    self._tokenizer = open_clip.get_tokenizer(self.tokenizer_name, context_length=self.context_length)
                except Exception as error:  # an HF tokenizer (hf-hub: models) that cannot be downloaded
                    first_line = (str(error).splitlines() or [""])[0][:200]
                    raise OSError(f"could not build the open_clip tokenizer of {self.tokenizer_name!r}: the model hub "
                                  f"is unreachable or does not have it ({type(error).__name__}: {first_line}). HINT: "
                                  "name a model of open_clip.list_models(), or leave tokenizer unset for CLIP's BPE "
                                  "tokenizer (offline)") from error
        return self._tokenizer

    def _pairs(self, split: str) -> _ImageText:
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
        tokens = self.tokenizer(captions) if captions else torch.empty(0, self.context_length or 77, dtype=torch.long)
        return _ImageText(paths, tokens.long(), labels, eval_transform(self.image_size, self.mean, self.std))

    def setup(self, stage: str | None = None) -> None:
        if self.datasets:
            return
        if stage in (None, "fit") and not self.files["validation"]:
            raise ValueError("fit validates, so ImageTextDataModule needs val_file=... (pairs for validation)")
        self.datasets = {split: self._pairs(split) for split, path in self.files.items() if path}
