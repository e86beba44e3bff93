"""Sequence classification with encoders (BERT, MiniLM) or decoders: cross-entropy, accuracy and macro-F1."""
from __future__ import annotations

import torch
from lightning.pytorch.cli import LRSchedulerCallable, OptimizerCallable
from torchmetrics import MetricCollection
from torchmetrics.classification import MulticlassAccuracy, MulticlassF1Score
from typing_extensions import override

from lit_lowrank.adapters import LoRAConfig
from lit_lowrank.backbones import Backbone
from lit_lowrank.tasks.base import LowRankTask
from lit_lowrank.tasks.checks import attached_datamodule, check_num_classes, check_vocabulary
from lit_lowrank.tasks.predictions import WritesPredictions


class SequenceClassificationTask(WritesPredictions, LowRankTask):
    """Classify token sequences with a transformers ``AutoModelForSequenceClassification``.

    With adapters, the classification head (``classifier`` / ``score``) is trained fully unless
    ``lora.modules_to_save`` names something else, as PEFT does for sequence classification.

    ``setup`` checks the head's ``num_labels`` against the DataModule's ``num_classes`` and the tokenizer's
    vocabulary against the embedding. ``predict`` writes one row per example (text, predicted class name, label)
    to ``<log dir>/predictions.csv`` through :class:`~lit_lowrank.callbacks.PredictionWriter`.

    Args:
        backbone: a sequence-classification model whose ``config.num_labels`` matches the data.
        lora: adapters to inject; ``None`` fine-tunes every parameter.
        optimizer: optimizer factory (AdamW, LoRAPro, LoRAPreAdamW, ...).
        scheduler: optional learning-rate scheduler factory.
        gradient_checkpointing: recompute activations in backward to save memory (see :class:`LowRankTask`).
        checkpoint_trainable_only: checkpoints without the frozen base; ``None``: on with adapters (see
            :class:`LowRankTask`).

    Example:
        >>> from lit_lowrank.backbones import transformers_backbone
        >>> bb = transformers_backbone(config=dict(model_type="bert", hidden_size=16, intermediate_size=32,
        ...     num_hidden_layers=1, num_attention_heads=2, vocab_size=50), tokenizer=False,
        ...     auto_class="AutoModelForSequenceClassification", model_kwargs=dict(num_labels=3))
        >>> task = SequenceClassificationTask(bb, lora=LoRAConfig(r=2, target_modules="default"))
        >>> sorted({n.split(".")[0] for n, p in task.model.named_parameters() if p.requires_grad and "lora" not in n})
        ['classifier']
    """

    head_names = ["classifier", "score"]

    def __init__(
        self,
        backbone: Backbone,
        lora: LoRAConfig | None = None,
        optimizer: OptimizerCallable = torch.optim.AdamW,
        scheduler: LRSchedulerCallable | None = None,
        gradient_checkpointing: bool = False,
        checkpoint_trainable_only: bool | None = None,
    ) -> None:
        super().__init__(backbone, lora, optimizer, scheduler, gradient_checkpointing=gradient_checkpointing,
                         checkpoint_trainable_only=checkpoint_trainable_only)
        self.num_labels = self.model.config.num_labels
        metrics = MetricCollection({
            "acc": MulticlassAccuracy(self.num_labels, average="micro"),
            "f1": MulticlassF1Score(self.num_labels, average="macro"),
        })
        self.val_metrics = metrics.clone(prefix="val/")
        self.test_metrics = metrics.clone(prefix="test/")

    @override
    def setup(self, stage: str) -> None:
        super().setup(stage)
        datamodule = attached_datamodule(self)
        check_num_classes(self.num_labels, datamodule, "model.init_args.backbone.init_args.model_kwargs.num_labels")
        check_vocabulary(self.model, datamodule)

    @override
    def forward(self, batch: dict):
        return self.model(**batch)

    @override
    def training_step(self, batch: dict, batch_idx: int) -> torch.Tensor:
        output = self(batch)
        self.log("train/loss", output.loss, prog_bar=True, batch_size=len(batch["labels"]))
        return output.loss

    def _evaluate(self, batch: dict, stage: str, metrics: MetricCollection) -> None:
        output = self(batch)
        metrics.update(output.logits, batch["labels"])
        self.log(f"{stage}/loss", output.loss, batch_size=len(batch["labels"]), sync_dist=True)
        self.log_dict(metrics, prog_bar=stage == "val")

    @override
    def validation_step(self, batch: dict, batch_idx: int) -> None:
        self._evaluate(batch, "val", self.val_metrics)

    @override
    def test_step(self, batch: dict, batch_idx: int) -> None:
        self._evaluate(batch, "test", self.test_metrics)

    @override
    def predict_step(self, batch: dict, batch_idx: int) -> torch.Tensor:
        batch = {k: v for k, v in batch.items() if k != "labels"}
        return self.model(**batch).logits.argmax(-1)
