"""What a data module takes from the model it feeds: its backbone's tokenizer and image preprocessing.

The backbone is the source of truth for what belongs to the model. A data module finds the model in ``setup``,
before it tokenises or builds transforms: the Trainer's LightningModule (Lightning sets ``datamodule.trainer``
before ``prepare_data`` and ``setup``, under the CLI and in a plain ``Trainer.fit(task, datamodule=dm)`` alike,
on every DDP rank), or one given with :meth:`FollowsModel.use_model`. A model is anything with the attributes
``tokenizer`` and ``preprocess``: a task (:class:`~lit_lowrank.tasks.base.LowRankTask`) or a
:class:`~lit_lowrank.backbones.Backbone`. Nothing here loads a model, so ``--print_config`` stays cheap.
"""
from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

from lightning.pytorch.utilities import rank_zero_warn

from lit_lowrank.data.tokenizer_match import tokenizer_differences, tokenizer_name
from lit_lowrank.errors import ConfigurationError

if TYPE_CHECKING:  # the backbones package imports transformers, timm and open_clip: only when needed
    from lit_lowrank.backbones.image_preprocessing import ImagePreprocessing

TOKENIZER_OPTION = "data.init_args.tokenizer"
BACKBONE_TOKENIZER = "model.init_args.backbone.init_args.tokenizer"


class FollowsModel:
    """Mixin for data modules: the model whose backbone decides the tokenizer and the image preprocessing.

    Example:
        >>> from torch import nn
        >>> from lit_lowrank.backbones import Backbone
        >>> from lit_lowrank.data import ByteTokenizer, TextBlocksDataModule
        >>> dm = TextBlocksDataModule("python").use_model(Backbone(nn.Linear(1, 1), [], tokenizer=ByteTokenizer()))
        >>> type(dm.tokenizer).__name__  # the backbone's, although the data module names none
        'ByteTokenizer'
    """

    _given_model: Any = None

    def use_model(self, model: Any) -> FollowsModel:
        """Take the tokenizer and image preprocessing from ``model`` (a task or a
        :class:`~lit_lowrank.backbones.Backbone`) instead of the Trainer's LightningModule, e.g. to call ``setup``
        before any Trainer exists. Returns the data module."""
        self._given_model = model
        return self

    def attached_model(self) -> Any | None:
        """The model given to :meth:`use_model`, else the Trainer's LightningModule, else None (standalone)."""
        if self._given_model is not None:
            return self._given_model
        trainer = getattr(self, "trainer", None)
        return getattr(trainer, "lightning_module", None) if trainer is not None else None


def choose_tokenizer(model: Any | None, requested: str | None, load: Callable[[str], Any],
                     fallback: Callable[[], Any], option: str = TOKENIZER_OPTION) -> Any:
    """The tokenizer a data module uses: the model's backbone's when ``requested`` is None; the requested one when
    it gives the same ids as the backbone's (or the backbone has none); ``fallback()`` when neither names one and
    the model is not a pretrained one that would read other ids. A disagreement stops."""
    own = getattr(model, "tokenizer", None) if model is not None else None
    if requested is None:
        if own is not None:
            return own
        chosen = fallback()
        _check_not_foreign_to_pretrained(model, chosen, option)
        return chosen
    chosen = load(requested)
    if own is not None:
        problems = tokenizer_differences(chosen, own)
        if problems:
            raise ConfigurationError(
                f"{option}={requested!r} is not the tokenizer of the model's backbone ({tokenizer_name(own)}): "
                f"{'; '.join(problems)}. The model reads its own tokenizer's ids. HINT: leave {option} unset (null): "
                f"the backbone's tokenizer is then used; or build the backbone with this one "
                f"({BACKBONE_TOKENIZER}: {requested!r}, for a transformers backbone)")
    return chosen


def _check_not_foreign_to_pretrained(model: Any | None, chosen: Any, option: str) -> None:
    """A transformers model loaded from pretrained weights reads its own tokenizer's ids: the fallback is fine only
    when it is that tokenizer (the bundled MiniLM for MiniLM)."""
    source = getattr(getattr(getattr(model, "model", None), "config", None), "name_or_path", None)
    if not source or _loaded_from(chosen, source):
        return
    raise ConfigurationError(
        f"the model was loaded pretrained from {source!r}, but its backbone has no tokenizer (tokenizer: false) and "
        f"{option} is not set: the data would be tokenised with the fallback {tokenizer_name(chosen)}, whose ids "
        f"mean nothing to it. HINT: drop `tokenizer: false` from {BACKBONE_TOKENIZER.rsplit('.', 1)[0]} (the "
        f"model's own tokenizer is then used), or set {option}: {source!r}")


def _loaded_from(tokenizer: Any, source: str) -> bool:
    path = getattr(tokenizer, "name_or_path", None)
    if not path:
        return False
    if path == source:
        return True
    try:
        return Path(path).resolve() == Path(source).resolve()
    except OSError:
        return False


def choose_image_preprocessing(model: Any | None, fallback: ImagePreprocessing, image_size: int | None = None,
                               mean: Any = None, std: Any = None, **overrides: Any) -> ImagePreprocessing:
    """The model's backbone's image preprocessing (``fallback`` without one), with the values given replaced.

    An ``image_size`` the model cannot take stops, naming ``data.init_args.image_size`` and the model's size;
    a ``mean``/``std`` other than the backbone's is used as told, with a warning."""
    from lit_lowrank.backbones.image_preprocessing import ImagePreprocessing

    own = getattr(model, "preprocess", None) if model is not None else None
    base = own if isinstance(own, ImagePreprocessing) else fallback
    height, width = base.input_size
    if image_size is not None and base.fixed_size and (image_size, image_size) != (height, width):
        raise ConfigurationError(
            f"data.init_args.image_size={image_size}, but {base.model_name} takes {height}x{width} images only (its "
            f"patch grid is fixed). HINT: leave data.init_args.image_size unset: the backbone's size {height} is then "
            f"used; or build the model for {image_size} (timm: model.init_args.backbone.init_args.img_size: "
            f"{image_size}; a custom open_clip CLIP: vision_cfg.image_size)")
    chosen = base.replace(image_size, mean, std, **overrides)
    if own is base and (chosen.mean, chosen.std) != (base.mean, base.std):
        rank_zero_warn(f"data.init_args.mean/std {chosen.mean}/{chosen.std} differ from the normalisation "
                       f"{base.model_name} was trained with ({base.mean}/{base.std}): using the data module's, as "
                       "told. HINT: leave data.init_args.mean and std unset to use the backbone's")
    return chosen
