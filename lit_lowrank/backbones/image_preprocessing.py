"""What a vision backbone expects of its images, and the transforms its own library builds for them."""
from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence
from typing import Any

from torch import nn

LIBRARIES = ("timm", "open_clip")


@dataclasses.dataclass(frozen=True)
class ImagePreprocessing:
    """The image size, normalisation and resizing a vision model was trained with, and the transforms built from
    them by the model's own library: ``timm.data.create_transform`` for timm, ``open_clip.image_transform`` for
    open_clip. The backbone factories fill it in; the image data modules use it unless told otherwise.

    Attributes:
        library: ``"timm"`` or ``"open_clip"``: whose transforms :meth:`transform` builds.
        input_size: ``(height, width)`` of the model's input.
        mean: per-channel normalisation mean.
        std: per-channel normalisation standard deviation.
        interpolation: resize interpolation (``"bicubic"``, ``"bilinear"``, ...).
        crop_pct: timm's evaluation crop: resize to ``size / crop_pct``, then centre-crop ``size`` (open_clip: 1).
        crop_mode: timm's crop mode (``"center"``, ``"squash"``, ``"border"``).
        resize_mode: open_clip's evaluation resize (``"shortest"``, ``"longest"``, ``"squash"``).
        fixed_size: the model takes ``input_size`` only (a ViT's fixed patch grid), not any size.
        model_name: what messages call the model.

    Example:
        >>> pre = ImagePreprocessing("timm", (32, 32), (0.5, 0.5, 0.5), (0.5, 0.5, 0.5), crop_pct=0.9)
        >>> [type(step).__name__ for step in pre.transform().transforms]
        ['Resize', 'CenterCrop', 'MaybeToTensor', 'Normalize']
        >>> pre.transform().transforms[0].size  # 32 / 0.9, as timm resizes before its centre crop
        35
    """

    library: str
    input_size: tuple[int, int]
    mean: tuple[float, ...]
    std: tuple[float, ...]
    interpolation: str = "bicubic"
    crop_pct: float = 1.0
    crop_mode: str = "center"
    resize_mode: str = "shortest"
    fixed_size: bool = False
    model_name: str = "the model"

    def __post_init__(self) -> None:
        if self.library not in LIBRARIES:
            raise ValueError(f"library must be one of {LIBRARIES}, got {self.library!r}")

    @classmethod
    def timm_default(cls) -> ImagePreprocessing:
        """timm's defaults without a model: 224 x 224, ImageNet statistics, bicubic, ``crop_pct`` 0.875."""
        from timm.data import resolve_data_config

        # timm needs something to resolve from; everything not given falls back to its defaults
        config = resolve_data_config({"input_size": (3, 224, 224)})
        return cls.from_timm_config(config, model_name="timm's defaults")

    @classmethod
    def open_clip_default(cls) -> ImagePreprocessing:
        """open_clip's defaults without a model: 224 x 224, OpenAI CLIP's statistics, bicubic."""
        from open_clip.transform import PreprocessCfg

        return cls.from_open_clip_config(dataclasses.asdict(PreprocessCfg()), model_name="open_clip's defaults",
                                         fixed_size=False)

    @classmethod
    def from_timm_config(cls, data_config: dict[str, Any], model: nn.Module | None = None,
                         model_name: str = "the model") -> ImagePreprocessing:
        """From a ``timm.data.resolve_data_config`` dict; ``model`` tells whether it takes other sizes."""
        return cls("timm", tuple(data_config["input_size"][-2:]), tuple(data_config["mean"]),
                   tuple(data_config["std"]), data_config.get("interpolation", "bicubic"),
                   float(data_config.get("crop_pct") or 1.0), data_config.get("crop_mode") or "center",
                   fixed_size=model is not None and _timm_fixed_size(model), model_name=model_name)

    @classmethod
    def from_open_clip_config(cls, config: dict[str, Any], model_name: str = "the model",
                              fixed_size: bool = True) -> ImagePreprocessing:
        """From an open_clip preprocess config (``open_clip.get_model_preprocess_cfg``; ``PreprocessCfg`` fills
        what it leaves out). open_clip's image towers (ViT patch grids, attention pools) take one size only."""
        from open_clip.transform import PreprocessCfg

        known = {field.name for field in dataclasses.fields(PreprocessCfg)}
        cfg = PreprocessCfg(**{key: value for key, value in config.items() if key in known})
        return cls("open_clip", tuple(cfg.input_size[-2:]), tuple(cfg.mean), tuple(cfg.std), cfg.interpolation,
                   resize_mode=cfg.resize_mode, fixed_size=fixed_size, model_name=model_name)

    @property
    def data_config(self) -> dict[str, Any]:
        """The same in the form of ``timm.data.resolve_data_config``."""
        return {"input_size": (3, *self.input_size), "interpolation": self.interpolation, "mean": self.mean,
                "std": self.std, "crop_pct": self.crop_pct, "crop_mode": self.crop_mode}

    def replace(self, image_size: int | None = None, mean: Sequence[float] | None = None,
                std: Sequence[float] | None = None, interpolation: str | None = None,
                crop_pct: float | None = None) -> ImagePreprocessing:
        """A copy with the values given (not None) replaced; ``image_size`` makes a square input."""
        changes: dict[str, Any] = {}
        if image_size is not None:
            changes["input_size"] = (int(image_size), int(image_size))
        for name, value in (("mean", mean), ("std", std)):
            if value is not None:
                changes[name] = tuple(float(v) for v in value)
        if interpolation is not None:
            changes["interpolation"] = interpolation
        if crop_pct is not None:
            changes["crop_pct"] = float(crop_pct)
        return dataclasses.replace(self, **changes) if changes else self

    def transform(self, augment: dict[str, Any] | None = None) -> Callable:
        """PIL image -> normalised tensor, built by the model's library: the evaluation transform, or with
        ``augment`` (a dict, possibly empty) the library's training transform with those options (timm: keywords
        of ``timm.data.create_transform`` such as ``auto_augment`` or ``re_prob``; open_clip: fields of its
        ``AugmentationCfg``)."""
        if self.library == "timm":
            from timm.data import create_transform

            return create_transform(**self.data_config, is_training=augment is not None, **(augment or {}))
        import open_clip
        from open_clip.transform import AugmentationCfg

        unknown = sorted(set(augment or {}) - {field.name for field in dataclasses.fields(AugmentationCfg)})
        if unknown:
            raise ValueError(f"{unknown} are not options of open_clip's training transform (its AugmentationCfg "
                             f"has {[field.name for field in dataclasses.fields(AugmentationCfg)]}). HINT: leave "
                             "them out for an open_clip backbone; auto_augment is timm's (open_clip reaches timm's "
                             "transform with use_timm: true, without auto_augment)")
        return open_clip.image_transform(self.input_size, is_train=augment is not None, mean=self.mean, std=self.std,
                                         resize_mode=self.resize_mode, interpolation=self.interpolation,
                                         aug_cfg=AugmentationCfg(**augment) if augment is not None else None)


def _timm_fixed_size(model: nn.Module) -> bool:
    """timm marks models with a fixed input size in their pretrained config; a ViT built with
    ``dynamic_img_size=True`` (or ``dynamic_img_pad``) takes other sizes all the same."""
    pretrained_cfg = getattr(model, "pretrained_cfg", None) or {}
    patch_embed = getattr(model, "patch_embed", None)
    return bool(pretrained_cfg.get("fixed_input_size", False)) and getattr(patch_embed, "strict_img_size", True)
