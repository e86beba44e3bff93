"""Inject LoRA adapters into any LightningModule, before its optimizers are configured."""
from __future__ import annotations

import dataclasses
from typing import Any, Optional

import lightning as L
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.utilities import rank_zero_info
from typing_extensions import override

from lit_lowrank.adapters import LoRAConfig, inject_lora, lora_modules
from lit_lowrank.adapters.inject import INJECTION_RECORD


class LoRAAdapters(Callback):
    """Add LoRA adapters to a LightningModule you wrote, without changing its code.

    Injection happens in ``setup`` (before ``configure_optimizers`` and before a checkpoint is restored, so
    resuming finds the adapter weights). A module that already has adapters is left as it is.

    Heads a task adds (``classifier`` / ``score`` of a transformers classifier, timm's ``head``) are freshly
    initialised, so with ``config.modules_to_save=None`` they are trained fully, as PEFT's task types do, and
    the callback says which; ``modules_to_save=[]`` keeps them frozen.

    Args:
        config: which layers to adapt and how (rank, alpha, targets, modules_to_save).
        attribute: dotted name of the submodule to adapt (``"model"``, ``"net.backbone"``); ``None`` adapts
            the LightningModule itself.

    Example:
        >>> import lightning as L, torch
        >>> class Regressor(L.LightningModule):
        ...     def __init__(self):
        ...         super().__init__()
        ...         self.net = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.ReLU(), torch.nn.Linear(8, 1))
        ...     def training_step(self, batch, batch_idx):
        ...         return self.net(batch[0]).pow(2).mean()
        ...     def configure_optimizers(self):
        ...         return torch.optim.SGD([p for p in self.parameters() if p.requires_grad], lr=0.1)
        >>> module = Regressor()
        >>> LoRAAdapters(LoRAConfig(r=2, target_modules=["net.0"]), attribute=None).setup(None, module, "fit")
        >>> sorted(n for n, p in module.named_parameters() if p.requires_grad)
        ['net.0.lora_A', 'net.0.lora_B']
    """

    def __init__(self, config: LoRAConfig, attribute: Optional[str] = None) -> None:
        self.config = config
        self.attribute = attribute

    def target(self, pl_module: L.LightningModule):
        if not self.attribute:
            return pl_module
        try:
            return pl_module.get_submodule(self.attribute)
        except AttributeError:
            children = [name for name, _ in pl_module.named_children()]
            raise ValueError(f"LoRAAdapters(attribute={self.attribute!r}): {type(pl_module).__name__} has no such "
                             f"submodule; its children are {children}") from None

    @override
    def setup(self, trainer: Optional[L.Trainer], pl_module: L.LightningModule, stage: str) -> None:
        target = self.target(pl_module)
        if next(lora_modules(target), None) is None:
            inject_lora(target, self.config)
            heads = getattr(target, INJECTION_RECORD).modules_to_save
            if self.config.modules_to_save is None and heads:
                rank_zero_info(f"LoRAAdapters: task heads {heads} are trained fully next to the adapters "
                               "(LoRAConfig(modules_to_save=[]) keeps them frozen)")

    @override
    def state_dict(self) -> dict[str, Any]:
        return {"config": dataclasses.asdict(self.config), "attribute": self.attribute}
