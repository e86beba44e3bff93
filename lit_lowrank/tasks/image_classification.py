"""Image classification with timm backbones: cross-entropy, top-1 and top-5 accuracy."""
from __future__ import annotations

import torch
import torch.nn.functional as F
from lightning.pytorch.cli import LRSchedulerCallable, OptimizerCallable
from torchmetrics import MetricCollection
from torchmetrics.classification import MulticlassAccuracy
from typing_extensions import override

from lit_lowrank.adapters import LoRAConfig
from lit_lowrank.backbones import Backbone
from lit_lowrank.tasks.base import LowRankTask
from lit_lowrank.tasks.checks import attached_datamodule, check_num_classes
from lit_lowrank.tasks.predictions import WritesPredictions


class ImageClassificationTask(WritesPredictions, LowRankTask):
    """Classify ``{"images", "labels"}`` batches with a timm model; logs top-1 and top-5 accuracy.

    With adapters, timm's classifier (``model.default_cfg["classifier"]``, usually ``head``) is trained fully
    unless ``lora.modules_to_save`` says otherwise.

    ``setup`` checks the head's ``num_classes`` against the DataModule's. ``predict`` writes one row per image
    (path, predicted class name, label) to ``<log dir>/predictions.csv``
    (:class:`~lit_lowrank.callbacks.PredictionWriter`).

    Args:
        backbone: a timm model with ``num_classes`` matching the data.
        lora: adapters to inject; ``None`` fine-tunes every parameter.
        optimizer: optimizer factory.
        scheduler: optional learning-rate scheduler factory.
        label_smoothing: cross-entropy label smoothing.
        gradient_checkpointing: recompute activations in backward to save memory (see :class:`LowRankTask`).
        checkpoint_trainable_only: checkpoints without the frozen base; ``None``: on with adapters (see
            :class:`LowRankTask`).

    Example:
        >>> from lit_lowrank.backbones import timm_backbone
        >>> bb = timm_backbone("vit_tiny_patch16_224", img_size=16, patch_size=8, embed_dim=16, depth=1, num_heads=2,
        ...                    num_classes=3)
        >>> task = ImageClassificationTask(bb, lora=LoRAConfig(r=2, target_modules="default"))
        >>> task.head_names, task({"images": torch.randn(2, 3, 16, 16)}).shape
        (['head'], torch.Size([2, 3]))
    """

    def __init__(
        self,
        backbone: Backbone,
        lora: LoRAConfig | None = None,
        optimizer: OptimizerCallable = torch.optim.AdamW,
        scheduler: LRSchedulerCallable | None = None,
        label_smoothing: float = 0.0,
        gradient_checkpointing: bool = False,
        checkpoint_trainable_only: bool | None = None,
    ) -> None:
        head = getattr(backbone.model, "default_cfg", {}).get("classifier", "head")
        self.head_names = [head] if isinstance(head, str) else list(head)
        super().__init__(backbone, lora, optimizer, scheduler, gradient_checkpointing=gradient_checkpointing,
                         checkpoint_trainable_only=checkpoint_trainable_only)
        self.label_smoothing = label_smoothing
        self.num_classes = self.model.num_classes
        top_k = min(5, self.num_classes)
        metrics = MetricCollection({
            "top1": MulticlassAccuracy(self.num_classes, top_k=1, average="micro"),
            f"top{top_k}": MulticlassAccuracy(self.num_classes, top_k=top_k, average="micro"),
        })
        self.val_metrics = metrics.clone(prefix="val/")
        self.test_metrics = metrics.clone(prefix="test/")

    @override
    def setup(self, stage: str) -> None:
        super().setup(stage)
        check_num_classes(self.num_classes, attached_datamodule(self), "model.init_args.backbone.init_args.num_classes")

    @override
    def forward(self, batch: dict) -> torch.Tensor:
        return self.model(batch["images"])

    @override
    def training_step(self, batch: dict, batch_idx: int) -> torch.Tensor:
        loss = F.cross_entropy(self(batch), batch["labels"], label_smoothing=self.label_smoothing)
        self.log("train/loss", loss, prog_bar=True, batch_size=len(batch["labels"]))
        return loss

    def _evaluate(self, batch: dict, stage: str, metrics: MetricCollection) -> None:
        logits = self(batch)
        metrics.update(logits, batch["labels"])
        self.log(f"{stage}/loss", F.cross_entropy(logits, batch["labels"]), batch_size=len(batch["labels"]),
                 sync_dist=True)
        self.log_dict(metrics, prog_bar=stage == "val")

    @override
    def validation_step(self, batch: dict, batch_idx: int) -> None:
        self._evaluate(batch, "val", self.val_metrics)

    @override
    def test_step(self, batch: dict, batch_idx: int) -> None:
        self._evaluate(batch, "test", self.test_metrics)

    @override
    def predict_step(self, batch: dict, batch_idx: int) -> torch.Tensor:
        return self(batch).argmax(-1)
