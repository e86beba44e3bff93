"""Export the adapters in PEFT's format at the end of fit and whenever the best checkpoint changes, and optionally
the merged model (adapters folded in) at the end of fit."""
from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import lightning as L
from lightning.pytorch.callbacks import Callback
from typing_extensions import override

from lit_lowrank.adapters import is_peft_loadable, save_adapter
from lit_lowrank.adapters.peft_io import check_adapter_folder, find_injection_root
from lit_lowrank.export import MODEL_FILE, check_export_folder, export_merged

log = logging.getLogger(__name__)


class AdapterExport(Callback):
    """Write ``<dirpath>/best`` (with each new best checkpoint) and ``<dirpath>/final`` (end of fit).

    Each is ``adapter_config.json`` + ``adapter_model.safetensors``, loadable with ``peft.PeftModel.from_pretrained``
    (Linear/Conv1D adapters) or :func:`lit_lowrank.load_adapter`; :meth:`format_label` says which. The config
    names the backbone actually loaded and PEFT's task type, so ``peft.AutoPeftModelFor...`` can rebuild the model.
    Under FSDP2 every rank takes part in gathering the full adapter tensors and global rank 0 writes them.
    Each folder is replaced all or nothing (see :func:`lit_lowrank.save_adapter`): a failed write, e.g. a full disk,
    leaves the previous ``best`` loadable. A target folder holding files of another kind is refused when fit
    starts, before any training.

    Args:
        dirpath: output folder; default ``<trainer.log_dir>/adapter``.
        base_model_name_or_path: written for backbones that do not record their source (built from a config,
            timm, open_clip). A transformers model loaded with ``from_pretrained`` writes where it was loaded
            from; a different value here is reported and ignored.
        merged: also write ``<dirpath>/merged`` at the end of fit: the model with the adapters folded in, as a plain
            model of its library (see :func:`lit_lowrank.export_merged`; transformers: ``from_pretrained`` it, with
            the task's tokenizer; timm / open_clip: ``model.safetensors``). Quantized bases are dequantized.

    Example:
        >>> AdapterExport("adapters/", merged=True).exported
        {}
    """

    def __init__(self, dirpath: str | None = None, base_model_name_or_path: str | None = None,
                 merged: bool = False) -> None:
        self.dirpath = dirpath
        self.base_model_name_or_path = base_model_name_or_path
        self.merged = merged
        self._best_path: str | None = None
        self.exported: dict[str, Path] = {}

    def _root(self, trainer: L.Trainer) -> Path:
        return Path(self.dirpath or Path(trainer.log_dir or trainer.default_root_dir) / "adapter")

    def export(self, trainer: L.Trainer, pl_module: L.LightningModule, name: str) -> Path:
        target = self._root(trainer) / name
        save_adapter(pl_module, target, base_model_name_or_path=self.base_model_name_or_path)
        self.exported[name] = target
        if trainer.is_global_zero:
            log.info("adapter (%s) exported to %s", name, target)
        return target

    def export_merged(self, trainer: L.Trainer, pl_module: L.LightningModule) -> Path:
        target = self._root(trainer) / "merged"
        tokenizer = getattr(pl_module, "tokenizer", None)
        export_merged(pl_module, target, tokenizer=tokenizer if hasattr(tokenizer, "save_pretrained") else None)
        self.exported["merged"] = target
        if trainer.is_global_zero:
            log.info("merged model exported to %s", target)
        return target

    def format_label(self, name: str) -> str:
        """How the export ``name`` ("best", "final", "merged") loads, for run summaries."""
        if name == "merged":
            if (self.exported[name] / MODEL_FILE).is_file() and not (self.exported[name] / "config.json").is_file():
                return "merged state dict: model.load_state_dict(safetensors.torch.load_file(...))"
            return "merged model: transformers AutoModelFor....from_pretrained"
        if is_peft_loadable(self.exported[name]):
            return "PEFT format"
        return "lit_lowrank format: attention adapters, load with lit_lowrank.load_adapter"

    def _has_adapters(self, pl_module: L.LightningModule) -> bool:
        try:
            find_injection_root(pl_module)
        except ValueError:
            return False
        return True

    @override
    def on_fit_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        # Found now rather than when the first export is written, possibly hours into training.
        if self._has_adapters(pl_module):
            for name in ("best", "final"):
                check_adapter_folder(self._root(trainer) / name)
        if self.merged:
            check_export_folder(self._root(trainer) / "merged")

    @override
    def on_save_checkpoint(self, trainer: L.Trainer, pl_module: L.LightningModule, checkpoint: dict[str, Any]) -> None:
        # ModelCheckpoint updates best_model_path before it saves, so a change here marks a new best.
        best = getattr(trainer.checkpoint_callback, "best_model_path", None)
        if best and best != self._best_path and self._has_adapters(pl_module):
            self._best_path = best
            self.export(trainer, pl_module, "best")

    @override
    def on_fit_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if self._has_adapters(pl_module):
            self.export(trainer, pl_module, "final")
        if self.merged:
            self.export_merged(trainer, pl_module)

    @override
    def state_dict(self) -> dict[str, Any]:
        return {"best_path": self._best_path}

    @override
    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self._best_path = state_dict.get("best_path")
