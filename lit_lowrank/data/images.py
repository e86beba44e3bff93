"""Image classification data: scikit-learn digits and ImageFolder trees (image-text pairs: :mod:`.image_text`).

Both take the image size and normalisation of the model's backbone (see :mod:`lit_lowrank.data.from_model`);
ImageFolder builds its transforms with the backbone's own library (timm or open_clip).
"""
from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch.utils.data import Dataset
from torchvision.datasets.folder import IMG_EXTENSIONS, find_classes, make_dataset

from lit_lowrank.data.corpus import stable_fraction
from lit_lowrank.data.image_loaders import (
    CLIP_MEAN,
    CLIP_STD,
    IMAGENET_MEAN,
    IMAGENET_STD,
    ClassificationLoaders,
    ImageSamples,
    Triple,
    check_normalisation,
)
from lit_lowrank.data.image_text import ImageTextDataModule

__all__ = ["CLIP_MEAN", "CLIP_STD", "DIGIT_NAMES", "DigitsDataModule", "IMAGENET_MEAN", "IMAGENET_STD",
           "ImageFolderDataModule", "ImageTextDataModule"]

DIGIT_NAMES = ["zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine"]

#: DigitsDataModule's image size without a model to take one from.
DIGITS_SIZE = 32


class GreyToNormalisedRGB:
    """Collate ``(image[1, h, w] in [0, 1], label)`` pairs: resize bilinearly, copy to 3 channels, normalise.

    A plain object rather than a DataModule method, so worker processes can pickle it on any platform.
    """

    def __init__(self, image_size: int | tuple[int, int], mean: Sequence[float], std: Sequence[float]) -> None:
        self.image_size = (image_size, image_size) if isinstance(image_size, int) else tuple(image_size)
        self.mean, self.std = torch.tensor(mean).view(1, 3, 1, 1), torch.tensor(std).view(1, 3, 1, 1)

    def __call__(self, items: list[tuple[torch.Tensor, torch.Tensor]]) -> dict[str, torch.Tensor]:
        images = torch.stack([image for image, _ in items])
        images = F.interpolate(images, size=self.image_size, mode="bilinear", align_corners=False)
        return {"images": (images.expand(-1, 3, -1, -1) - self.mean) / self.std,
                "labels": torch.stack([label for _, label in items])}


class DigitsDataModule(ClassificationLoaders):
    """scikit-learn's 1,797 handwritten digits (8x8, 10 classes, offline) as normalised 3-channel images.

    Pixels (0..16) are scaled to [0, 1], upsampled bilinearly to ``image_size`` per batch (so memory stays
    small at 224), copied to 3 channels and normalised with ``mean``/``std``: by default the input size and
    normalisation of the model's backbone (see :mod:`lit_lowrank.data.from_model`); without a model 32 x 32 and
    timm's defaults (ImageNet statistics). An ``image_size`` the model cannot take stops ``setup``. Batches are
    ``{"images": FloatTensor[B, 3, S, S], "labels": LongTensor[B]}``. ``class_names`` are the English words
    ``"zero"`` .. ``"nine"`` (label id = the digit), which read naturally in CLIP prompts.

    The split is fixed and stratified, independent of ``seed``: within each class, images are ordered by
    ``stable_fraction("digits:<index>")``; the first 15% (rounded) are the test set, the next 15% validation,
    the rest training: 1,259 / 269 / 269 images. ``train_per_class`` keeps that many training images per
    class, chosen with ``seed`` (few-shot runs over several seeds see different shots, the same test set).

    Args:
        image_size: output height and width; by default the backbone's input size.
        train_per_class: keep only this many training images per class (few-shot); all when ``None``.
        mean: per-channel normalisation mean; by default the backbone's.
        std: per-channel normalisation standard deviation; by default the backbone's.
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
        image_size: int | None = None,
        train_per_class: int | None = None,
        mean: Triple | None = None,
        std: Triple | None = None,
        batch_size: int = 64,
        num_workers: int = 0,
        seed: int = 0,
    ) -> None:
        super().__init__(batch_size, num_workers, seed)
        check_normalisation(mean, std)
        if train_per_class is not None and train_per_class < 1:
            raise ValueError(f"train_per_class must be >= 1 (or None for all), got {train_per_class}")
        self.save_hyperparameters()
        self.image_size, self.train_per_class = image_size, train_per_class
        self.mean = tuple(mean) if mean is not None else None
        self.std = tuple(std) if std is not None else None
        self.class_names = list(DIGIT_NAMES)
        self.datasets: dict[str, Dataset] = {}
        self.indices: dict[str, torch.Tensor] = {}

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
        from lit_lowrank.backbones.image_preprocessing import ImagePreprocessing

        fallback = ImagePreprocessing.timm_default().replace(DIGITS_SIZE)
        size = self.choose_preprocessing(fallback, self.image_size, self.mean, self.std)
        self.collate = GreyToNormalisedRGB(size.input_size, size.mean, size.std)
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

class ImageFolderDataModule(ClassificationLoaders):
    """Images in class folders (``root/<class>/<image>``, as torchvision's ImageFolder), transformed as the model's
    backbone expects.

    Class names are the sub-folders of ``train_dir``, sorted (torchvision's rule), known before ``setup``; the
    validation and test folders are read with the same class-to-id map (a class missing there is fine, an
    unknown one is an error). Without ``val_dir``, the training images with
    ``stable_fraction(<class>/<file>) < val_fraction`` are held out. Batches are
    ``{"images": FloatTensor[B, 3, S, S], "labels": LongTensor[B]}`` (with mixup or cutmix, training labels are
    soft: ``FloatTensor[B, num_classes]``, which the tasks' cross-entropy takes as they are).

    Transforms are built in ``setup`` by the backbone's own library from its preprocessing (see
    :mod:`lit_lowrank.data.from_model`): timm's ``create_transform`` from its data config (input size, mean and
    std, interpolation, ``crop_pct``), or open_clip's ``image_transform``. The values given here replace the
    backbone's; an ``image_size`` the model cannot take stops ``setup``. Without a model: timm's defaults (224,
    ImageNet statistics, bicubic, ``crop_pct`` 0.875). Training augmentation is the library's own: ``augment``
    gives timm's standard training transform (random resized crop, horizontal flip, colour jitter), to which
    ``auto_augment`` adds RandAugment/AutoAugment and ``random_erasing`` random erasing; ``mixup_alpha`` and
    ``cutmix_alpha`` apply ``timm.data.Mixup`` to training batches (an odd-sized last batch stays unmixed: Mixup
    pairs images; the task's ``label_smoothing`` still applies).

    Args:
        train_dir: folder of class folders for training.
        val_dir: same layout, for validation; by default ``val_fraction`` of ``train_dir``.
        test_dir: same layout, for testing; ``predict`` runs on it too (there is no separate predict folder).
        image_size: input height and width; by default the backbone's.
        mean: per-channel normalisation mean; by default the backbone's.
        std: per-channel normalisation standard deviation; by default the backbone's.
        augment: the library's training transform for training images (else they get the evaluation transform).
        val_fraction: share of ``train_dir`` held out when there is no ``val_dir``.
        batch_size: images per batch.
        num_workers: DataLoader worker processes.
        seed: seeds the training order.
        interpolation: resize interpolation (``bicubic``, ``bilinear``, ...); by default the backbone's.
        crop_pct: evaluation resize to ``image_size / crop_pct`` before the centre crop; by default the backbone's.
        auto_augment: timm's auto-augment policy, e.g. ``rand-m9-mstd0.5-inc1`` (RandAugment) or ``original``
            (AutoAugment); needs ``augment``.
        random_erasing: probability of timm's random erasing per training image; needs ``augment``.
        mixup_alpha: timm's mixup on training batches when above 0.
        cutmix_alpha: timm's cutmix on training batches when above 0 (alternating with mixup when both are set).
        augment_kwargs: further options of the library's training transform (timm: keywords of
            ``timm.data.create_transform`` such as ``scale``, ``color_jitter`` or ``hflip``; open_clip: its
            ``AugmentationCfg``); needs ``augment``.

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
        >>> dm.preprocessing.model_name, dm.preprocessing.crop_pct  # no model: timm's defaults
        ("timm's defaults", 0.875)
    """

    def __init__(
        self,
        train_dir: str,
        val_dir: str | None = None,
        test_dir: str | None = None,
        image_size: int | None = None,
        mean: Triple | None = None,
        std: Triple | None = None,
        augment: bool = False,
        val_fraction: float = 0.1,
        batch_size: int = 32,
        num_workers: int = 0,
        seed: int = 0,
        interpolation: str | None = None,
        crop_pct: float | None = None,
        auto_augment: str | None = None,
        random_erasing: float = 0.0,
        mixup_alpha: float = 0.0,
        cutmix_alpha: float = 0.0,
        augment_kwargs: dict[str, Any] | None = None,
    ) -> None:
        super().__init__(batch_size, num_workers, seed)
        check_normalisation(mean, std)
        if val_dir is None and not 0.0 < val_fraction < 1.0:
            raise ValueError(f"val_fraction must be in (0, 1) when there is no val_dir, got {val_fraction}")
        needs_augment = [name for name, value in (("auto_augment", auto_augment), ("random_erasing", random_erasing),
                                                  ("augment_kwargs", augment_kwargs)) if value]
        if needs_augment and not augment:
            raise ValueError(f"{needs_augment} change the training transform, which augment: false leaves out. "
                             "HINT: set data.init_args.augment: true")
        if min(mixup_alpha, cutmix_alpha, random_erasing) < 0:
            raise ValueError("mixup_alpha, cutmix_alpha and random_erasing must be >= 0")
        self.save_hyperparameters()
        self.dirs = {"train": train_dir, "validation": val_dir, "test": test_dir}
        self.image_size, self.augment, self.val_fraction = image_size, augment, val_fraction
        self.mean = tuple(mean) if mean is not None else None
        self.std = tuple(std) if std is not None else None
        self.interpolation, self.crop_pct = interpolation, crop_pct
        self.auto_augment, self.random_erasing = auto_augment, random_erasing
        self.mixup_alpha, self.cutmix_alpha = mixup_alpha, cutmix_alpha
        self.augment_kwargs = dict(augment_kwargs or {})
        self._class_names: list[str] | None = None
        self.datasets: dict[str, Dataset] = {}
        self.mixup: Any = None

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

    def augmentation(self, library: str) -> dict[str, Any] | None:
        """Options of the library's training transform; None without ``augment`` (the evaluation transform)."""
        if not self.augment:
            return None
        options = dict(self.augment_kwargs)
        if self.auto_augment:
            options["auto_augment"] = self.auto_augment
        if self.random_erasing:
            options["re_prob"] = self.random_erasing
            if library == "open_clip":
                options.setdefault("use_timm", True)  # open_clip erases through timm's transform only
        return options

    def setup(self, stage: str | None = None) -> None:
        from lit_lowrank.backbones.image_preprocessing import ImagePreprocessing

        preprocessing = self.choose_preprocessing(ImagePreprocessing.timm_default(), self.image_size, self.mean,
                                                  self.std, interpolation=self.interpolation, crop_pct=self.crop_pct)
        evaluate = preprocessing.transform()
        augmentation = self.augmentation(preprocessing.library)
        transforms = {"train": evaluate if augmentation is None else preprocessing.transform(augmentation)}
        if self.mixup_alpha or self.cutmix_alpha:
            from timm.data import Mixup

            # label_smoothing=0: the task's own label_smoothing applies to the mixed targets
            self.mixup = Mixup(mixup_alpha=self.mixup_alpha, cutmix_alpha=self.cutmix_alpha, label_smoothing=0.0,
                               num_classes=self.num_classes)
        if not self.datasets:
            self.datasets = {split: ImageSamples(items, None) for split, items in self._split_samples().items()}
        for split, dataset in self.datasets.items():  # also when set up before: the model may have changed
            dataset.transform = transforms.get(split, evaluate)

    def _split_samples(self) -> dict[str, list[tuple[str, int]]]:
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
        return samples

    def on_after_batch_transfer(self, batch: dict[str, Any], dataloader_idx: int) -> dict[str, Any]:
        """Mix training batches (``mixup_alpha``/``cutmix_alpha``); everything else passes unchanged."""
        trainer = self.trainer
        if (self.mixup is not None and trainer is not None and trainer.training
                and len(batch["labels"]) % 2 == 0):
            batch["images"], batch["labels"] = self.mixup(batch["images"], batch["labels"])
        return batch
