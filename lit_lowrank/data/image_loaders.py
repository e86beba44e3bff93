"""What the image data modules share: normalisation constants, datasets of image files, and loaders whose image
preprocessing comes from the model's backbone (see :mod:`lit_lowrank.data.from_model`)."""
from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

from torch.utils.data import Dataset
from torchvision.datasets.folder import default_loader

from lit_lowrank.data.common import SeededDataModule, SplitLoaders
from lit_lowrank.data.from_model import FollowsModel, choose_image_preprocessing

if TYPE_CHECKING:
    from lit_lowrank.backbones.image_preprocessing import ImagePreprocessing

#: timm's default normalisation (ImageNet statistics).
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
#: OpenAI CLIP's normalisation (most open_clip models use it).
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)

Triple = tuple[float, float, float]


def check_normalisation(mean: Sequence[float] | None, std: Sequence[float] | None) -> None:
    """Raise unless ``mean`` and ``std`` are three per-channel values with ``std > 0`` (None: the backbone's)."""
    if (mean is not None and len(mean) != 3) or (std is not None and (len(std) != 3 or min(std) <= 0)):
        raise ValueError(f"mean and std are three per-channel values (std > 0), got mean={mean}, std={std}")


class ImageSamples(Dataset):
    """(path, label) pairs as ``{"images", "labels"}`` items, images loaded as RGB and transformed."""

    def __init__(self, samples: list[tuple[str, int]], transform: Any) -> None:
        self.samples, self.transform = samples, transform

    @property
    def paths(self) -> list[str]:
        return [path for path, _ in self.samples]

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, index: int) -> dict[str, Any]:
        path, label = self.samples[index]
        return {"images": self.transform(default_loader(path)), "labels": label}


class ClassificationLoaders(SplitLoaders, FollowsModel, SeededDataModule):
    """train/val/test/predict loaders over ``self.datasets`` (filled by ``setup``), and the image preprocessing
    of the model's backbone."""

    datasets: dict[str, Dataset]
    collate: Any = None  # the loaders' collate_fn (None: PyTorch's default)
    #: What ``setup`` used: the backbone's preprocessing with this module's overrides (None before ``setup``).
    preprocessing: ImagePreprocessing | None = None

    @property
    def num_classes(self) -> int:
        return len(self.class_names)

    def choose_preprocessing(self, fallback: ImagePreprocessing, image_size: int | None, mean: Any, std: Any,
                             **overrides: Any) -> ImagePreprocessing:
        """The model's backbone's preprocessing (``fallback`` without a model) with the values given replaced."""
        self.preprocessing = choose_image_preprocessing(self.attached_model(), fallback, image_size, mean, std,
                                                        **overrides)
        return self.preprocessing

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

    def predict_inputs(self) -> list[str]:
        """What each predict example is, in loader order: its image path, or its position when it has none."""
        dataset = self._split("test")
        paths = getattr(dataset, "paths", None)
        return list(paths) if paths is not None else [str(i) for i in range(len(dataset))]
