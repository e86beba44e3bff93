"""What every task shares: the backbone, optional adapters, injected optimizer/scheduler, FSDP2 sharding."""
from __future__ import annotations

import dataclasses
from typing import Any

import lightning as L
import torch
from lightning.pytorch.cli import LRSchedulerCallable, OptimizerCallable
from torch import nn
from typing_extensions import override

from lit_lowrank.adapters import LoRAConfig, inject_lora, lora_modules
from lit_lowrank.backbones import Backbone
from lit_lowrank.backbones.checkpointing import enable_gradient_checkpointing
from lit_lowrank.callbacks.skipped_steps import SkippedStepsGuard
from lit_lowrank.optim.factory import build_optimizer, build_scheduler, check_optimizer_fits_model
from lit_lowrank.optim.sharding import is_sharded
from lit_lowrank.tasks.frozen_base import FROZEN_BASE_KEY, check_frozen_base, drop_frozen_base
from lit_lowrank.tasks.rng_state import collect_rng_states, restore_rng_states

#: ``LoRAConfig(target_modules="default")`` in a task means: the backbone's own default targets.
DEFAULT_TARGETS = "default"


class LowRankTask(L.LightningModule):
    """Base class of the tasks: ``backbone -> adapters -> task -> optimizer``, each swappable from YAML.

    ``tokenizer`` and ``preprocess`` are the backbone's; the data modules of :mod:`lit_lowrank.data` take them from
    the task in ``setup`` (see :mod:`lit_lowrank.data.from_model`), so the data is tokenised and transformed as the
    model expects.

    Args:
        backbone: the model and its companions, e.g. from :func:`lit_lowrank.backbones.transformers_backbone`.
        lora: adapters to inject; ``None`` trains the whole backbone (full fine-tuning or pre-training).
            ``target_modules: default`` picks the backbone's usual targets.
        optimizer: optimizer factory; module-aware optimizers (LoRAPro, LoRAPreAdamW, LoRAPreMuon) get the
            model, others its trainable parameters.
        scheduler: optional learning-rate scheduler factory, stepped every optimizer step.
        gradient_checkpointing: recompute activations in backward instead of storing them (less memory, about a
            third more compute), non-reentrant; see
            :func:`lit_lowrank.backbones.checkpointing.enable_gradient_checkpointing`.
        checkpoint_trainable_only: Lightning checkpoints keep only what training changes (adapters,
            ``modules_to_save``, normalisation statistics), with the optimizer and RNG states; the frozen base is
            rebuilt from the config on resume and ``load_from_checkpoint``, and checked against a fingerprint saved
            with the checkpoint. ``None`` (default): on when the model has adapters and is not sharded (FSDP2).
    """

    #: Head modules kept fully trainable next to the adapters unless ``lora.modules_to_save`` says otherwise.
    head_names: list[str] = []

    def __init__(
        self,
        backbone: Backbone,
        lora: LoRAConfig | None = None,
        optimizer: OptimizerCallable = torch.optim.AdamW,
        scheduler: LRSchedulerCallable | None = None,
        gradient_checkpointing: bool = False,
        checkpoint_trainable_only: bool | None = None,
    ) -> None:
        super().__init__()
        # Under LightningCLI the hyper-parameters are the parsed config (so load_from_checkpoint can rebuild
        # everything); used directly from Python, the objects themselves are not worth pickling.
        self.save_hyperparameters(ignore=[] if _built_by_cli() else ["backbone", "lora", "optimizer", "scheduler"])
        # from_pretrained returns modules in eval mode; Lightning keeps each module's mode, so set it here.
        self.model = backbone.model.train()
        self.tokenizer = backbone.tokenizer
        self.preprocess = backbone.preprocess
        self.optimizer_factory = optimizer
        self.scheduler_factory = scheduler
        self.lora = lora
        if lora is not None:
            inject_lora(self.model, self._resolve_lora(lora, backbone))
        self.checkpoint_trainable_only = checkpoint_trainable_only
        self._frozen_fingerprints: dict = {}  # computed once per run: the base does not change
        if gradient_checkpointing:
            enable_gradient_checkpointing(self.model)
        check_optimizer_fits_model(optimizer, self.model)  # fail at construction, not after loading the data

    def _resolve_lora(self, lora: LoRAConfig, backbone: Backbone) -> LoRAConfig:
        changes: dict[str, Any] = {}
        if lora.target_modules == DEFAULT_TARGETS:
            changes["target_modules"] = backbone.lora_targets
        if lora.modules_to_save is None:
            heads = [name for name in self.head_names if _has_module(self.model, name)]
            changes["modules_to_save"] = heads or None
        return dataclasses.replace(lora, **changes) if changes else lora

    @override
    def configure_model(self) -> None:
        """Shard with FSDP2 (``fully_shard``) when the strategy provides a device mesh (ModelParallelStrategy):
        every repeated block first, then the root. Frozen base weights and trainable adapters share a unit;
        FSDP2 allows mixed ``requires_grad`` because it shards parameters individually (DTensors)."""
        mesh = self.device_mesh
        if mesh is not None and self.checkpoint_trainable_only:
            raise ValueError("checkpoint_trainable_only: true is not supported with a sharded strategy (FSDP2) yet. "
                             "HINT: leave it unset (null): sharded runs then save full checkpoints.")
        if mesh is None or is_sharded(self.model):
            return
        from torch.distributed.fsdp import fully_shard

        mesh = mesh["data_parallel"] if mesh.mesh_dim_names and "data_parallel" in mesh.mesh_dim_names else mesh
        for block in repeated_blocks(self.model):
            fully_shard(block, mesh=mesh)
        fully_shard(self.model, mesh=mesh)

    @override
    def configure_optimizers(self):
        optimizer = build_optimizer(self.optimizer_factory, self.model)
        if self.scheduler_factory is None:
            return optimizer
        # Ties WarmupCosineLR's total_steps to the run; without a Trainer (benchmarks call this directly) it stays.
        run_steps = self.trainer.estimated_stepping_batches if self._trainer is not None else None
        scheduler = build_scheduler(self.scheduler_factory, optimizer, run_steps)
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}

    @override
    def configure_callbacks(self) -> list[L.Callback]:
        """A :class:`~lit_lowrank.callbacks.SkippedStepsGuard` (stop after 10 consecutive steps that skipped a
        non-finite gradient) unless the Trainer has one: list your own under ``trainer.callbacks`` to change N."""
        if self._trainer is not None and any(isinstance(c, SkippedStepsGuard) for c in self.trainer.callbacks):
            return []
        return [SkippedStepsGuard()]

    @override
    def configure_gradient_clipping(self, optimizer, gradient_clip_val=None, gradient_clip_algorithm=None) -> None:
        """Clip as the Trainer says, except for optimizers that rewrite gradients inside ``step`` (LoRA-Pro):
        they expose ``max_grad_norm`` and get the threshold, so the rewritten gradients are clipped, not the raw."""
        if gradient_clip_val and hasattr(optimizer, "max_grad_norm"):
            if gradient_clip_algorithm not in (None, "norm"):
                raise ValueError(f"{type(optimizer).__name__} clips by norm after rewriting the gradients; "
                                 f"gradient_clip_algorithm={gradient_clip_algorithm!r} is not supported. "
                                 "HINT: use 'norm'.")
            optimizer.max_grad_norm = float(gradient_clip_val)
            return
        self.clip_gradients(optimizer, gradient_clip_val=gradient_clip_val,
                            gradient_clip_algorithm=gradient_clip_algorithm)

    @override
    def on_save_checkpoint(self, checkpoint: dict) -> None:
        # Dropout (and main-process augmentation) draws continue from here in the uninterrupted run.
        checkpoint["rng_states"] = collect_rng_states()
        if self._saves_trainable_only():
            drop_frozen_base(self, checkpoint, self._frozen_fingerprints)

    @override
    def on_load_checkpoint(self, checkpoint: dict) -> None:
        # Not restored yet: building the optimizers and Lightning's own steps before training would draw from them.
        self._resume_rng_states = checkpoint.get("rng_states")
        if is_sharded(self.model) and checkpoint.get(FROZEN_BASE_KEY):
            raise ValueError("a trainable-only checkpoint cannot be loaded into a sharded (FSDP2) model yet. HINT: "
                             "resume it without the sharded strategy, or re-save it with "
                             "checkpoint_trainable_only: false.")
        # load_state_dict (called next by Lightning) then accepts exactly these keys as missing.
        self._frozen_keys_not_saved = check_frozen_base(self, checkpoint)

    @override
    def load_state_dict(self, state_dict, strict: bool = True, assign: bool = False):
        """``nn.Module.load_state_dict``, except that right after ``on_load_checkpoint`` of a trainable-only checkpoint
        the frozen base keys it left out (and only those) may be missing."""
        expected_missing = self.__dict__.pop("_frozen_keys_not_saved", None)
        if not expected_missing:
            return super().load_state_dict(state_dict, strict=strict, assign=assign)
        result = super().load_state_dict(state_dict, strict=False, assign=assign)
        missing = [key for key in result.missing_keys if key not in expected_missing]
        if strict and (missing or result.unexpected_keys):
            raise RuntimeError(f"Error(s) in loading state_dict for {type(self).__name__}: missing keys {missing}, "
                               f"unexpected keys {result.unexpected_keys}")
        return result._replace(missing_keys=missing)

    def _saves_trainable_only(self) -> bool:
        if self.checkpoint_trainable_only is not None:
            return self.checkpoint_trainable_only
        return next(lora_modules(self.model), None) is not None and not is_sharded(self.model)

    @override
    def on_train_start(self) -> None:
        """Resuming (``fit(ckpt_path=...)``): set the RNG states saved with the checkpoint, after everything only the
        resumed run does (optimizer setup; the sanity check, under ``isolate_rng`` anyway) and before the first batch
        is fetched. Our loaders draw worker seeds from their own generators, so from here on the draws are the
        uninterrupted run's."""
        states, self._resume_rng_states = getattr(self, "_resume_rng_states", None), None
        if states is not None and self.trainer.ckpt_path:  # not after load_from_checkpoint then a fresh fit
            restore_rng_states(states)

    def _batch_size(self, batch: dict) -> int:
        first = next(v for v in batch.values() if isinstance(v, torch.Tensor))
        return first.shape[0]


def repeated_blocks(model: nn.Module) -> list[nn.Module]:
    """Items of every ``nn.ModuleList`` of same-typed modules (transformer layers, ViT/CLIP blocks)."""
    blocks = []
    for module in model.modules():
        if isinstance(module, nn.ModuleList) and len(module) > 1 and len({type(m) for m in module}) == 1:
            blocks.extend(m for m in module if any(True for _ in m.parameters()))
    return blocks


def _has_module(model: nn.Module, name: str) -> bool:
    try:
        model.get_submodule(name)
    except AttributeError:
        return False
    return True


def _built_by_cli() -> bool:
    """True while LightningCLI instantiates the module (it then supplies the parsed config as hparams)."""
    from lit_lowrank.cli.lightning_private import given_hyperparameters  # Lightning's private APIs live there

    return given_hyperparameters() is not None
