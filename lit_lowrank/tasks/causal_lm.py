"""Causal language modelling (pre-training or fine-tuning): next-token loss and perplexity, generation, exact match."""
from __future__ import annotations

import math
from typing import Any

import torch
from lightning.pytorch.callbacks import BasePredictionWriter
from lightning.pytorch.cli import LRSchedulerCallable, OptimizerCallable
from lightning.pytorch.trainer.states import TrainerFn
from lightning.pytorch.utilities import rank_zero_only
from lightning.pytorch.utilities.seed import isolate_rng
from torchmetrics import MeanMetric
from typing_extensions import override

from lit_lowrank.adapters import LoRAConfig
from lit_lowrank.backbones import Backbone
from lit_lowrank.callbacks.generation_writer import GenerationWriter
from lit_lowrank.tasks.base import LowRankTask
from lit_lowrank.tasks.checks import attached_datamodule, check_vocabulary
from lit_lowrank.tasks.generation import GenerationOptions, generate_texts, generation_rows
from lit_lowrank.tasks.initial_weights import load_initial_weights


class CausalLMTask(LowRankTask):
    """Next-token prediction with a transformers causal LM; logs loss and token-weighted perplexity, and generates.

    Batches are ``{"input_ids", "labels"}`` (and optionally ``attention_mask`` and ``position_ids``); labels equal
    to -100 are ignored, so on instruction data (:class:`~lit_lowrank.data.InstructionDataModule`) the loss and
    perplexity cover the supervised response tokens only.

    ``predict`` generates from the prompts of the predict data (greedy unless ``temperature > 0``), returns one
    dict per prompt (``prompt``, ``generation``, ``answer``, and ``reference``/``reference_answer``/``correct``
    when the data has a reference) and writes them to ``<log dir>/generations.jsonl`` through
    :class:`~lit_lowrank.callbacks.GenerationWriter`. With ``exact_match``, validation and test also generate an
    answer for every example and log ``val/exact_match`` / ``test/exact_match``: the share of examples whose
    extracted answer equals the reference's (see :mod:`lit_lowrank.tasks.generation`).

    Args:
        backbone: a causal LM, e.g. ``transformers_backbone(config={...})`` for pre-training from scratch.
        lora: adapters to inject; ``None`` trains every parameter.
        optimizer: optimizer factory (AdamW, LoRAPro, LoRAPreAdamW, LoRAPreMuon, ...).
        scheduler: optional learning-rate scheduler factory.
        init_weights: a checkpoint of an earlier run (e.g. pre-training) whose model weights are loaded before
            the adapters are added; every weight must match by name and shape.
        exact_match: generate at validation and test and log the exact-match rate of the extracted answers.
        test_before_fit: when ``fit`` starts (not when it resumes), evaluate the test split with the initial
            weights (new LoRA adapters change nothing yet) and print and log its metrics as ``before_fit/test/...``,
            so that a run reports its test metrics before and after fine-tuning.
        max_new_tokens: most tokens generated per prompt.
        temperature: 0 generates greedily; above 0 samples.
        top_p: nucleus sampling threshold (sampling only).
        stop: strings that end a generation (besides the tokenizer's EOS), matched on the decoded text.
        answer_pattern: regex whose first group is the answer (GSM8K: ``####\\s*(-?[\\d,]*\\.?\\d+)``); empty
            compares whole generations.
        gradient_checkpointing: recompute activations in backward to save memory (see :class:`LowRankTask`).
        checkpoint_trainable_only: checkpoints without the frozen base; ``None``: on with adapters (see
            :class:`LowRankTask`).

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
        lora: LoRAConfig | None = None,
        optimizer: OptimizerCallable = torch.optim.AdamW,
        scheduler: LRSchedulerCallable | None = None,
        init_weights: str | None = None,
        exact_match: bool = False,
        test_before_fit: bool = False,
        max_new_tokens: int = 64,
        temperature: float = 0.0,
        top_p: float = 1.0,
        stop: list[str] | None = None,
        # `str`, not `str | None`: jsonargparse reads a value for `str | None` as YAML, where a pattern starting
        # with '#' (GSM8K's '####...') is a comment, i.e. None.
        answer_pattern: str = "",
        gradient_checkpointing: bool = False,
        checkpoint_trainable_only: bool | None = None,
    ) -> None:
        if init_weights:
            load_initial_weights(backbone.model, init_weights)  # before the adapters wrap its layers
        super().__init__(backbone, lora, optimizer, scheduler, gradient_checkpointing=gradient_checkpointing,
                         checkpoint_trainable_only=checkpoint_trainable_only)
        self.generation = GenerationOptions(max_new_tokens, temperature, top_p, tuple(stop or ()),
                                            answer_pattern or None)
        self.exact_match, self.test_before_fit = exact_match, test_before_fit
        self.val_loss, self.test_loss = MeanMetric(), MeanMetric()
        self.val_exact_match, self.test_exact_match = MeanMetric(), MeanMetric()
        self.before_fit_metrics: dict[str, float] = {}

    @override
    def setup(self, stage: str) -> None:
        super().setup(stage)
        check_vocabulary(self.model, attached_datamodule(self))  # before a bare IndexError in the embedding

    @override
    def forward(self, batch: dict) -> torch.Tensor:
        """Mean next-token cross-entropy of the batch."""
        return self.model(input_ids=batch["input_ids"], labels=batch["labels"],
                          attention_mask=batch.get("attention_mask"), position_ids=batch.get("position_ids")).loss

    @override
    def training_step(self, batch: dict, batch_idx: int) -> torch.Tensor:
        loss = self(batch)
        self.log("train/loss", loss, prog_bar=True, batch_size=self._batch_size(batch))
        return loss

    def _evaluate(self, batch: dict, loss_metric: MeanMetric, match_metric: MeanMetric) -> None:
        # Weight by predicted tokens so the epoch value is the corpus-level mean (perplexity = exp of it).
        tokens = (batch["labels"][:, 1:] != -100).sum()
        loss_metric.update(self(batch).detach(), weight=tokens)
        if self.exact_match:
            if "prompt_input_ids" not in batch:
                raise ValueError("exact_match needs batches with prompts and references, which this data module does "
                                 "not give. HINT: use InstructionDataModule (or a subclass), or set exact_match: false")
            correct = [row["correct"] for row in self.generate_rows(batch)]
            match_metric.update(torch.tensor(correct, dtype=torch.float32, device=self.device))

    @override
    def validation_step(self, batch: dict, batch_idx: int) -> None:
        self._evaluate(batch, self.val_loss, self.val_exact_match)

    @override
    def test_step(self, batch: dict, batch_idx: int) -> None:
        self._evaluate(batch, self.test_loss, self.test_exact_match)

    @override
    def predict_step(self, batch: dict, batch_idx: int) -> list[dict[str, Any]]:
        """One dict per prompt: prompt, generation, answer (and reference, reference_answer, correct)."""
        return self.generate_rows(batch)

    def generate_rows(self, batch: dict) -> list[dict[str, Any]]:
        """Generate from ``batch["prompt_input_ids"]`` and score against the batch's references, if any."""
        if "prompt_input_ids" not in batch:
            raise ValueError("generation needs batches with `prompt_input_ids` (left-padded prompts). HINT: use "
                             "InstructionDataModule or TextBlocksDataModule, whose predict batches have them")
        texts = generate_texts(self.model, batch["prompt_input_ids"], batch["prompt_attention_mask"], self.generation,
                               self._codec())
        return generation_rows(batch, texts, self.generation)

    def _codec(self) -> Any:
        codec = getattr(attached_datamodule(self), "codec", None)
        if codec is not None:
            return codec
        if self.tokenizer is None:
            raise RuntimeError("generating needs a tokenizer to decode the tokens, and there is none: the data module "
                               "has no `codec` and the backbone was built with tokenizer: false. HINT: run with "
                               "InstructionDataModule/TextBlocksDataModule, or give the backbone a tokenizer")
        from lit_lowrank.data.codec import TokenCodec

        self._fallback_codec = getattr(self, "_fallback_codec", None) or TokenCodec(self.tokenizer)
        return self._fallback_codec

    @override
    def on_validation_epoch_end(self) -> None:
        self._log_epoch("val", self.val_loss, self.val_exact_match)

    @override
    def on_test_epoch_end(self) -> None:
        metrics = self._log_epoch("test", self.test_loss, self.test_exact_match)
        before = {k[len("before_fit/"):]: v for k, v in self.before_fit_metrics.items()}
        _print_comparison(before, {k: float(v) for k, v in metrics.items()})

    def _log_epoch(self, stage: str, loss_metric: MeanMetric, match_metric: MeanMetric) -> dict[str, torch.Tensor]:
        loss = loss_metric.compute()  # already reduced over ranks by torchmetrics; sync_dist only averages equal values
        loss_metric.reset()
        metrics = {f"{stage}/loss": loss, f"{stage}/ppl": torch.exp(loss.clamp(max=math.log(1e9)))}
        if match_metric.update_count:
            metrics[f"{stage}/exact_match"] = match_metric.compute()
            match_metric.reset()
        for name, value in metrics.items():
            self.log(name, value, prog_bar=stage == "val", sync_dist=True)
        return metrics

    @override
    def configure_callbacks(self) -> list[Any]:
        """The base task's callbacks, plus a :class:`~lit_lowrank.callbacks.GenerationWriter` in ``predict`` unless the
        Trainer has a prediction writer (one under ``trainer.callbacks`` keeps its own folder and file name)."""
        callbacks = list(super().configure_callbacks() or [])
        trainer = self._trainer
        if trainer is not None and trainer.state.fn == TrainerFn.PREDICTING and not any(
                isinstance(c, BasePredictionWriter) for c in [*trainer.callbacks, *callbacks]):
            callbacks.append(GenerationWriter())
        return callbacks

    @override
    def on_fit_start(self) -> None:
        if self.test_before_fit and not self.trainer.ckpt_path:
            self.before_fit_metrics = self._test_initial_model()

    def _test_initial_model(self) -> dict[str, float]:
        """The test metrics of the weights fit starts from, computed outside Lightning's loops (a test run cannot
        nest inside fit), over ``trainer.limit_test_batches`` of the test split, leaving the RNG streams as they
        were."""
        datamodule = attached_datamodule(self)
        if datamodule is None or not hasattr(datamodule, "test_dataloader"):
            raise ValueError("test_before_fit needs a data module with a test split. HINT: set "
                             "data.init_args.test_file, or test_before_fit: false")
        loader = datamodule.test_dataloader()
        limit = self.trainer.limit_test_batches
        batches = len(loader) if limit is None else int(limit) if isinstance(limit, int) else int(len(loader) * limit)
        modes = {module: module.training for module in self.modules()}
        loss, match = MeanMetric().to(self.device), MeanMetric().to(self.device)
        self.eval()
        try:
            # in the test loop's precision context (autocast under bf16-mixed), so that before and after compare alike
            with isolate_rng(), torch.no_grad(), self.trainer.precision_plugin.test_step_context():
                for index, batch in enumerate(loader):
                    if index >= batches:
                        break
                    self._evaluate(self.trainer.strategy.batch_to_device(batch), loss, match)
        finally:
            for module, training in modes.items():
                module.train(training)
        value = loss.compute()
        metrics = {"before_fit/test/loss": float(value),
                   "before_fit/test/ppl": math.exp(min(float(value), math.log(1e9)))}
        if match.update_count:
            metrics["before_fit/test/exact_match"] = float(match.compute())
        for logger in self.loggers:
            logger.log_metrics(metrics, step=0)
        _print_before(metrics)
        return metrics


@rank_zero_only
def _print_before(metrics: dict[str, float]) -> None:
    lines = ["Test split before fine-tuning (initial weights):"]
    lines += [f"  {name[len('before_fit/'):]:18s}  {value:.4f}" for name, value in sorted(metrics.items())]
    print("\n".join(lines), flush=True)


@rank_zero_only
def _print_comparison(before: dict[str, float], after: dict[str, float]) -> None:
    shared = sorted(set(before) & set(after))
    if shared:
        lines = ["Test split, before fine-tuning -> after:"]
        lines += [f"  {name:18s}  {before[name]:.4f} -> {after[name]:.4f}" for name in shared]
        print("\n".join(lines), flush=True)
