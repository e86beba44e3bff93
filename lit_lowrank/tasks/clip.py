"""CLIP (open_clip): zero-shot classification from class names, few-shot tuning of both towers, contrastive pairs."""
from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from lightning.pytorch.cli import LRSchedulerCallable, OptimizerCallable
from torchmetrics.classification import MulticlassAccuracy
from typing_extensions import override

from lit_lowrank.adapters import LoRAConfig
from lit_lowrank.backbones import Backbone
from lit_lowrank.tasks.base import LowRankTask
from lit_lowrank.tasks.checks import attached_datamodule
from lit_lowrank.tasks.predictions import WritesPredictions


class CLIPTask(WritesPredictions, LowRankTask):
    """Classify images against text prompts built from class names, as CLIP-LoRA does.

    The classifier is the normalised text embedding of each class (averaged over ``templates``). In training
    it is recomputed every step, so adapters in the text tower learn too; in evaluation it is computed once per
    epoch. Batches with ``"texts"`` and no ``"labels"`` (image-caption pairs) train with CLIP's symmetric
    contrastive loss instead. ``python cli.py validate`` without adapters gives zero-shot accuracy; ``predict``
    writes one row per image to ``<log dir>/predictions.csv`` (:class:`~lit_lowrank.callbacks.PredictionWriter`).

    Args:
        backbone: an open_clip model with its tokenizer.
        class_names: names used in the prompts; by default the datamodule's ``class_names``.
        templates: prompt templates containing ``{}``.
        lora: adapters to inject (both towers with the default targets); ``None`` fine-tunes everything.
        optimizer: optimizer factory.
        scheduler: optional learning-rate scheduler factory.
        gradient_checkpointing: recompute activations in backward to save memory (see :class:`LowRankTask`).
        checkpoint_trainable_only: checkpoints without the frozen base; ``None``: on with adapters (see
            :class:`LowRankTask`).

    Example:
        >>> from lit_lowrank.backbones import open_clip_backbone
        >>> bb = open_clip_backbone(embed_dim=8, vision_cfg=dict(image_size=16, patch_size=8, width=16, layers=1,
        ...     head_width=8), text_cfg=dict(context_length=8, width=16, heads=2, layers=1))
        >>> task = CLIPTask(bb, class_names=["cat", "dog"], lora=LoRAConfig(r=2, target_modules="default"))
        >>> task.logits(torch.randn(3, 3, 16, 16), task.text_classifier()).shape
        torch.Size([3, 2])
    """

    def __init__(
        self,
        backbone: Backbone,
        class_names: list[str] | None = None,
        templates: Sequence[str] = ("a photo of a {}.",),
        lora: LoRAConfig | None = None,
        optimizer: OptimizerCallable = torch.optim.AdamW,
        scheduler: LRSchedulerCallable | None = None,
        gradient_checkpointing: bool = False,
        checkpoint_trainable_only: bool | None = None,
    ) -> None:
        super().__init__(backbone, lora, optimizer, scheduler, gradient_checkpointing=gradient_checkpointing,
                         checkpoint_trainable_only=checkpoint_trainable_only)
        if any("{}" not in t for t in templates):
            raise ValueError(f"every prompt template needs a '{{}}' for the class name, got {list(templates)}")
        self.templates = list(templates)
        self.class_names = list(class_names) if class_names else None
        self._eval_classifier: torch.Tensor | None = None
        self.val_acc: MulticlassAccuracy | None = None
        self.test_acc: MulticlassAccuracy | None = None
        if self.class_names:
            self._build_metrics()

    @override
    def setup(self, stage: str) -> None:
        super().setup(stage)
        data_names = getattr(attached_datamodule(self), "class_names", None)
        if self.class_names and data_names and len(data_names) != len(self.class_names):
            raise ValueError(f"model.init_args.class_names has {len(self.class_names)} names but the data has "
                             f"{len(data_names)} classes ({list(data_names)[:10]}). HINT: drop "
                             "model.init_args.class_names (the data's are used), or list one name per data class")
        if self.class_names is None:
            names = getattr(getattr(self.trainer, "datamodule", None), "class_names", None)
            if not names:
                raise ValueError("CLIPTask needs class names: set model.class_names or use a datamodule with "
                                 "class_names")
            self.class_names = list(names)
            self._build_metrics()

    def _build_metrics(self) -> None:
        self.val_acc = MulticlassAccuracy(len(self.class_names), average="micro")
        self.test_acc = MulticlassAccuracy(len(self.class_names), average="micro")

    def prompt_tokens(self) -> torch.Tensor:
        prompts = [template.format(name) for name in self.class_names for template in self.templates]
        return self.tokenizer(prompts).to(self.device)

    def text_classifier(self) -> torch.Tensor:
        """(classes x dim) normalised text embeddings averaged over templates."""
        features = F.normalize(self.model.encode_text(self.prompt_tokens()), dim=-1)
        features = features.view(len(self.class_names), len(self.templates), -1).mean(dim=1)
        return F.normalize(features, dim=-1)

    def logits(self, images: torch.Tensor, classifier: torch.Tensor) -> torch.Tensor:
        image_features = F.normalize(self.model.encode_image(images), dim=-1)
        return self.model.logit_scale.exp() * image_features @ classifier.T.to(image_features.dtype)

    @override
    def training_step(self, batch: dict, batch_idx: int) -> torch.Tensor:
        if "labels" in batch:
            loss = F.cross_entropy(self.logits(batch["images"], self.text_classifier()), batch["labels"])
        else:
            loss = self._contrastive_loss(batch["images"], batch["texts"])
        self.log("train/loss", loss, prog_bar=True, batch_size=len(batch["images"]))
        return loss

    def _contrastive_loss(self, images: torch.Tensor, texts: torch.Tensor) -> torch.Tensor:
        text_features = F.normalize(self.model.encode_text(texts), dim=-1)
        logits = self.logits(images, text_features)
        targets = torch.arange(len(images), device=logits.device)
        return (F.cross_entropy(logits, targets) + F.cross_entropy(logits.T, targets)) / 2

    def _start_eval(self) -> None:
        with torch.no_grad():
            self._eval_classifier = self.text_classifier()

    @override
    def on_validation_epoch_start(self) -> None:
        self._start_eval()

    @override
    def on_test_epoch_start(self) -> None:
        self._start_eval()

    def _evaluate(self, batch: dict, stage: str, metric: MulticlassAccuracy) -> None:
        logits = self.logits(batch["images"], self._eval_classifier)
        metric.update(logits, batch["labels"])
        self.log(f"{stage}/loss", F.cross_entropy(logits, batch["labels"]), batch_size=len(batch["images"]),
                 sync_dist=True)
        self.log(f"{stage}/acc", metric, prog_bar=stage == "val")

    @override
    def validation_step(self, batch: dict, batch_idx: int) -> None:
        self._evaluate(batch, "val", self.val_acc)

    @override
    def test_step(self, batch: dict, batch_idx: int) -> None:
        self._evaluate(batch, "test", self.test_acc)

    @override
    def predict_step(self, batch: dict, batch_idx: int) -> torch.Tensor:
        if self._eval_classifier is None:
            self._start_eval()
        return self.logits(batch["images"], self._eval_classifier).argmax(-1)
