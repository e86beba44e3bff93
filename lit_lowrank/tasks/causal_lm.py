"""Causal language modelling (pre-training or fine-tuning): next-token loss and perplexity."""
from __future__ import annotations

import math
from typing import Optional

import torch
from lightning.pytorch.cli import LRSchedulerCallable, OptimizerCallable
from torchmetrics import MeanMetric

from lit_lowrank.adapters import LoRAConfig
from lit_lowrank.backbones import Backbone
from lit_lowrank.tasks.base import LowRankTask
from lit_lowrank.tasks.checks import attached_datamodule, check_vocabulary


class CausalLMTask(LowRankTask):
    """Next-token prediction with a transformers causal LM; logs loss and token-weighted perplexity.

    Batches are ``{"input_ids", "labels"}`` (and optionally ``attention_mask``); labels equal to -100 are ignored.

    Args:
        backbone: a causal LM, e.g. ``transformers_backbone(config={...})`` for pre-training from scratch.
        lora: adapters to inject; ``None`` trains every parameter.
        optimizer: optimizer factory (AdamW, LoRAPro, LoRAPreAdamW, LoRAPreMuon, ...).
        scheduler: optional learning-rate scheduler factory.

    Example:
        >>> from lit_lowrank.backbones import transformers_backbone
        >>> task = CausalLMTask(transformers_backbone(config=dict(model_type="llama", hidden_size=16,
        ...     intermediate_size=32, num_hidden_layers=1, num_attention_heads=2, vocab_size=50), tokenizer=False))
        >>> ids = torch.randint(0, 50, (2, 8))
        >>> loss = task.training_step({"input_ids": ids, "labels": ids}, 0)
        >>> 3.0 < float(loss.detach()) < 5.0  # about log(50) for an untrained model
        True
    """

    def __init__(
        self,
        backbone: Backbone,
        lora: Optional[LoRAConfig] = None,
        optimizer: OptimizerCallable = torch.optim.AdamW,
        scheduler: Optional[LRSchedulerCallable] = None,
    ) -> None:
        super().__init__(backbone, lora, optimizer, scheduler)
        self.val_loss = MeanMetric()
        self.test_loss = MeanMetric()

    def setup(self, stage: str) -> None:
        super().setup(stage)
        check_vocabulary(self.model, attached_datamodule(self))  # before a bare IndexError in the embedding

    def forward(self, batch: dict) -> torch.Tensor:
        """Mean next-token cross-entropy of the batch."""
        return self.model(input_ids=batch["input_ids"], labels=batch["labels"],
                          attention_mask=batch.get("attention_mask")).loss

    def training_step(self, batch: dict, batch_idx: int) -> torch.Tensor:
        loss = self(batch)
        self.log("train/loss", loss, prog_bar=True, batch_size=self._batch_size(batch))
        return loss

    def _evaluate(self, batch: dict, metric: MeanMetric) -> None:
        # Weight by predicted tokens so the epoch value is the corpus-level mean (perplexity = exp of it).
        tokens = (batch["labels"][:, 1:] != -100).sum()
        metric.update(self(batch).detach(), weight=tokens)

    def validation_step(self, batch: dict, batch_idx: int) -> None:
        self._evaluate(batch, self.val_loss)

    def test_step(self, batch: dict, batch_idx: int) -> None:
        self._evaluate(batch, self.test_loss)

    def on_validation_epoch_end(self) -> None:
        self._log_epoch("val", self.val_loss)

    def on_test_epoch_end(self) -> None:
        self._log_epoch("test", self.test_loss)

    def _log_epoch(self, stage: str, metric: MeanMetric) -> None:
        loss = metric.compute()  # already reduced over ranks by torchmetrics; sync_dist only averages equal values
        metric.reset()
        self.log(f"{stage}/loss", loss, prog_bar=stage == "val", sync_dist=True)
        self.log(f"{stage}/ppl", torch.exp(loss.clamp(max=math.log(1e9))), prog_bar=stage == "val", sync_dist=True)
