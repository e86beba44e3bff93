"""Inject LoRA adapters into any LightningModule, before its optimizers are configured."""
from __future__ import annotations

import dataclasses
from typing import Any

import lightning as L
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.utilities import rank_zero_info
from torch import nn
from torch.utils.hooks import RemovableHandle
from typing_extensions import override

from lit_lowrank.adapters import LoRAConfig, inject_lora, lora_modules
from lit_lowrank.adapters.inject import INJECTION_RECORD


class LoRAAdapters(Callback):
    """Add LoRA adapters to a LightningModule you wrote, without changing its code.

    Injection happens in ``setup`` (before ``configure_optimizers`` and before a checkpoint is restored, so
    resuming finds the adapter weights). A module that already has adapters is left as it is.

    A checkpoint whose adapters have another rank than the injected ones is refused with a ValueError naming both
    ranks, before torch reports a size mismatch: Lightning loads the model's weights before it restores callbacks,
    so the check is a ``load_state_dict`` pre-hook that ``setup`` puts on the module (removed when the run ends).

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

    def __init__(self, config: LoRAConfig, attribute: str | None = None) -> None:
        self.config = config
        self.attribute = attribute
        self._injected = False  # set by setup: from then on the model's adapters follow config and attribute
        self._rank_check: RemovableHandle | None = None

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
    def setup(self, trainer: L.Trainer | None, pl_module: L.LightningModule, stage: str) -> None:
        target = self.target(pl_module)
        if next(lora_modules(target), None) is None:
            inject_lora(target, self.config)
            self._injected = True
            heads = getattr(target, INJECTION_RECORD).modules_to_save
            if self.config.modules_to_save is None and heads:
                rank_zero_info(f"LoRAAdapters: task heads {heads} are trained fully next to the adapters "
                               "(LoRAConfig(modules_to_save=[]) keeps them frozen)")
        if self._injected and self._rank_check is None:
            self._rank_check = pl_module.register_load_state_dict_pre_hook(refuse_other_ranks)

    @override
    def teardown(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        self._remove_rank_check()

    @override
    def on_exception(self, trainer: L.Trainer, pl_module: L.LightningModule, exception: BaseException) -> None:
        self._remove_rank_check()  # a failed run skips teardown

    def _remove_rank_check(self) -> None:
        if self._rank_check is not None:
            self._rank_check.remove()
            self._rank_check = None

    @override
    def state_dict(self) -> dict[str, Any]:
        return {"config": dataclasses.asdict(self.config), "attribute": self.attribute}

    @override
    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Take back the settings :meth:`state_dict` returned (Lightning passes them when it restores a checkpoint).

        Lightning restores callbacks after ``setup``. Once this callback has injected adapters, a saved setting
        that shapes or scales them (all but ``dropout`` and ``init``) must equal its own, or a ValueError names the
        key: the checkpoint's adapter weights were trained with the saved settings. Malformed states (missing or
        unexpected keys) raise a ValueError naming the keys.

        Example:
            >>> saved = LoRAAdapters(LoRAConfig(r=4, target_modules=["q_proj"]), attribute="model").state_dict()
            >>> restored = LoRAAdapters(LoRAConfig())
            >>> restored.load_state_dict(saved)
            >>> restored.config.r, restored.config.target_modules, restored.attribute
            (4, ['q_proj'], 'model')
        """
        config, attribute = _read_state(state_dict)
        if not self._injected:
            self.config, self.attribute = config, attribute
            return
        saved, own = _settings(config, attribute), _settings(self.config, self.attribute)
        differences = [f"{key}: saved {saved[key]!r}, this callback {own[key]!r}"
                       for key in own if saved[key] != own[key]]
        if differences:
            raise ValueError(
                f"LoRAAdapters: the checkpoint's adapters were trained with other settings than the ones this callback "
                f"injected ({'; '.join(differences)}). HINT: resume with the saved settings.")


def refuse_other_ranks(module: nn.Module, state_dict: dict[str, Any], prefix: str, *_: Any) -> None:
    """A ``load_state_dict`` pre-hook: a ValueError naming both ranks when ``state_dict`` holds adapters of another
    rank than ``module``'s, instead of torch's size mismatch listing every tensor.

    Example:
        >>> from lit_lowrank import inject_lora
        >>> saved = inject_lora(nn.Sequential(nn.Linear(4, 4)), LoRAConfig(r=2, target_modules=["0"])).state_dict()
        >>> model = inject_lora(nn.Sequential(nn.Linear(4, 4)), LoRAConfig(r=3, target_modules=["0"]))
        >>> handle = model.register_load_state_dict_pre_hook(refuse_other_ranks)
        >>> model.load_state_dict(saved)
        Traceback (most recent call last):
        ValueError: LoRAAdapters: the checkpoint's adapters have rank 2 (0.lora_A: 2 x 4), this callback's ... 3 ...
    """
    for name, adapter in lora_modules(module):
        key = f"{prefix}{name}.lora_A" if name else f"{prefix}lora_A"
        saved = state_dict.get(key)
        if getattr(saved, "ndim", None) == 2 and saved.shape[0] != adapter.r:
            raise ValueError(
                f"LoRAAdapters: the checkpoint's adapters have rank {saved.shape[0]} ({key}: "
                f"{' x '.join(map(str, saved.shape))}), this callback's have rank {adapter.r} "
                f"(LoRAConfig(r={adapter.r})), so the checkpoint's adapter weights cannot be loaded. HINT: use "
                f"LoRAAdapters(LoRAConfig(r={saved.shape[0]}, ...)), the settings the checkpoint was trained with; to "
                f"train at rank {adapter.r}, start a new fit without ckpt_path.")


#: Settings that may change between a run and its resume: they neither shape nor scale the adapter weights.
RESUMABLE_CHANGES = ("dropout", "init")


def _settings(config: LoRAConfig, attribute: str | None) -> dict[str, Any]:
    """``config.<field>`` and ``attribute`` that must match the checkpoint's, with sequences as lists."""
    settings = {f"config.{key}": list(value) if isinstance(value, tuple) else value
                for key, value in dataclasses.asdict(config).items() if key not in RESUMABLE_CHANGES}
    return {**settings, "attribute": attribute}


def _read_state(state_dict: Any) -> tuple[LoRAConfig, str | None]:
    """The config and attribute of a saved state, or a ValueError naming every missing or unexpected key."""
    if not isinstance(state_dict, dict) or not isinstance(state_dict.get("config", {}), dict):
        raise ValueError("LoRAAdapters.load_state_dict expects {'config': {...}, 'attribute': ...} as state_dict() "
                         f"returns, got {state_dict!r}")
    fields = [field.name for field in dataclasses.fields(LoRAConfig)]
    config = state_dict.get("config", {})
    missing = [key for key in ("config", "attribute") if key not in state_dict]
    missing += [f"config.{name}" for name in fields if "config" in state_dict and name not in config]
    unexpected = [key for key in state_dict if key not in ("config", "attribute")]
    unexpected += [f"config.{name}" for name in config if name not in fields]
    if missing or unexpected:
        raise ValueError(f"LoRAAdapters.load_state_dict: missing keys {missing}, unexpected keys {unexpected}. "
                         "HINT: pass what LoRAAdapters.state_dict() returned.")
    attribute = state_dict["attribute"]
    if attribute is not None and not isinstance(attribute, str):
        raise ValueError(f"LoRAAdapters.load_state_dict: 'attribute' must be a module name or None, got {attribute!r}")
    return LoRAConfig(**config), attribute
