"""``--ckpt_path``: the checkpoint is read once, and its model settings must match the command's.

LightningCLI (2.6) parses the checkpoint's hyper-parameters over the command's model config, so ``fit --ckpt_path``
with a changed optimizer mode, rank or learning rate would silently train with the checkpoint's values. Here a
difference stops ``fit`` (or, for a learning rate, is resumed on request) and is reported by test/validate/predict.
The file read for that comparison is the one Lightning restores from (:class:`ResumeCheckpoint`).
"""
from __future__ import annotations

import pickle
from pathlib import Path
from typing import Any

from lightning.pytorch.callbacks import Callback
from lightning.pytorch.plugins.io.wrapper import _WrappingCheckpointIO
from lightning.pytorch.strategies import Strategy
from lightning.pytorch.utilities import rank_zero_warn

from lit_lowrank.checkpoint_io import AtomicCheckpointIO
from lit_lowrank.cli.errors import CLIConfigError

#: Settings that ``fit --resume_with_changed NAME`` may change, by name, with the config key they stand for.
RESUMABLE = {"lr": "model.init_args.optimizer.init_args.lr"}
_ABSENT = "(not set)"


def flat_model_config(model: dict[str, Any]) -> dict[str, Any]:
    """The command's dumped ``model`` config in the layout LightningCLI stores as a checkpoint's hyper-parameters."""
    if "class_path" not in model:
        return dict(model)
    return {"_class_path": model["class_path"], **(model.get("init_args") or {}), **(model.get("dict_kwargs") or {})}


def differences(command: Any, checkpoint: Any, key: str = "model") -> dict[str, tuple[Any, Any]]:
    """Dotted config keys whose values differ, as ``{key: (command value, checkpoint value)}``."""
    if not (isinstance(command, dict) and isinstance(checkpoint, dict)):
        return {} if command == checkpoint else {key: (command, checkpoint)}
    for class_key in ("_class_path", "class_path"):
        if command.get(class_key) != checkpoint.get(class_key):  # other classes: their arguments do not compare
            return {f"{key}.class_path": (command.get(class_key, _ABSENT), checkpoint.get(class_key, _ABSENT))}
    found: dict[str, tuple[Any, Any]] = {}
    # A key the checkpoint lacks (an argument added after it was saved) keeps the command's value when Lightning
    # loads the checkpoint's hyper-parameters over the config, so it cannot be silently overridden: not a difference.
    for name in sorted(set(checkpoint) - {"_class_path", "_instantiator"}):
        # top-level hyper-parameters are the model's init_args, spelled as on the command line
        child = f"{key}.init_args.{name}" if "_class_path" in command else f"{key}.{name}"
        found.update(differences(command.get(name, _ABSENT), checkpoint.get(name, _ABSENT), child))
    return found


def describe(found: dict[str, tuple[Any, Any]]) -> str:
    return "\n".join(f"  {key}: command {new!r}, checkpoint {old!r}" for key, (new, old) in found.items())


def mismatch_message(ckpt_path: str, found: dict[str, tuple[Any, Any]]) -> str:
    names = {key: name for name, key in RESUMABLE.items()}
    opt_in = sorted(names[key] for key in found if key in names)
    others = [key for key in found if key not in names]
    hint = ("make the command match the checkpoint (the config.yaml of its run has the settings it was trained "
            "with), or train from scratch without --ckpt_path")
    if opt_in:
        flag = opt_in[0] if len(opt_in) == 1 else f"[{','.join(opt_in)}]"
        hint += (f". To resume with the changed {', '.join(opt_in)}, add --resume_with_changed {flag}"
                 + (" (the other differences must still go)" if others else ""))
    return (f"fit --ckpt_path {ckpt_path}: the checkpoint was trained with other model settings than this command; "
            f"Lightning would resume with the checkpoint's and ignore the command's:\n{describe(found)}\nHINT: {hint}.")


class RescaleResumedLR(Callback):
    """Make ``--resume_with_changed lr`` take effect: the optimizer and scheduler states in the checkpoint hold the
    old rate (``param_groups``, ``base_lrs``) and are loaded after the model is built, so changing the config alone
    would not change the rate that trains. Every restored rate is scaled by ``new_lr / old_lr`` (groups with their
    own rates and the schedule's current position keep their proportions)."""

    def __init__(self, old_lr: float, new_lr: float) -> None:
        if not all(isinstance(lr, (int, float)) and lr > 0 for lr in (old_lr, new_lr)):
            raise CLIConfigError(f"--resume_with_changed lr needs positive learning rates, got checkpoint {old_lr!r} "
                             f"and command {new_lr!r}. HINT: set optimizer.init_args.lr to a positive number.")
        self.ratio = float(new_lr) / float(old_lr)

    def on_load_checkpoint(self, trainer, pl_module, checkpoint: dict[str, Any]) -> None:
        for state in checkpoint.get("optimizer_states", []):
            for group in state.get("param_groups", []):
                for name in ("lr", "initial_lr"):
                    if name in group:
                        group[name] = group[name] * self.ratio
        for state in checkpoint.get("lr_schedulers", []):
            for name in ("base_lrs", "_last_lr"):
                if name in state:
                    state[name] = [lr * self.ratio for lr in state[name]]


class ResumeCheckpoint:
    """The ``--ckpt_path`` file of one command, read once: its model settings are compared with the command's
    (:meth:`check`), and the same loaded dict is what Lightning restores from (:meth:`hand_over`).

    Example:
        >>> import tempfile, torch
        >>> path = Path(tempfile.mkdtemp()) / "last.ckpt"
        >>> adamw = lambda lr: {"class_path": "torch.optim.AdamW", "init_args": {"lr": lr}}
        >>> torch.save({"hyper_parameters": {"_class_path": "Task", "optimizer": adamw(0.1)}}, path)
        >>> resume = ResumeCheckpoint.read(path)
        >>> resume.check("test", {"class_path": "Task", "init_args": {"optimizer": adamw(0.1)}})  # the checkpoint's
        True
        >>> command = {"class_path": "Task", "init_args": {"optimizer": adamw(0.2)}}
        >>> resume.check("fit", command, resume_with_changed=["lr"])  # keep the command's, rescaling the restored lr
        False
        >>> type(resume.callbacks[0]).__name__, resume.callbacks[0].ratio
        ('RescaleResumedLR', 2.0)
    """

    def __init__(self, path: str | Path, checkpoint: dict[str, Any]) -> None:
        self.path = Path(path)
        self.checkpoint: dict[str, Any] | None = checkpoint
        self.hyperparameters = dict(checkpoint.get("hyper_parameters") or {})
        self.hyperparameters.pop("_instantiator", None)
        #: what resuming adds to the Trainer (a learning-rate rescale opted into with --resume_with_changed lr)
        self.callbacks: list[Callback] = []

    @classmethod
    def read(cls, ckpt_path: Any, weights_only: bool | None = None) -> ResumeCheckpoint | None:
        """Load ``ckpt_path`` as Lightning would (same ``weights_only``, tensors where they were saved); None for no
        path, a name Lightning resolves itself (``last``, ``best``, ``registry``), a remote path or a folder (a
        sharded checkpoint): Lightning reads those alone."""
        if not ckpt_path or not Path(str(ckpt_path)).is_file():
            return None
        try:
            checkpoint = AtomicCheckpointIO().load_checkpoint(ckpt_path, weights_only=weights_only)
        except pickle.UnpicklingError as error:
            if "Weights only load failed" not in str(error):
                raise
            raise CLIConfigError(f"checkpoint {Path(ckpt_path).resolve()} holds objects other than tensors and plain "
                                 "values, which torch.load(weights_only=True) refuses to unpickle. HINT: if you "
                                 "trust the file, add --weights_only false.") from None
        return cls(ckpt_path, checkpoint)

    def check(self, subcommand: str, command_model: dict[str, Any], resume_with_changed: Any = ()) -> bool:
        """Compare the command's dumped ``model`` config with the checkpoint's; True when the checkpoint's settings
        are to be parsed over the command's (evaluating: they match its weights), False to keep the command's.

        ``fit`` stops with a :class:`CLIConfigError` listing every difference not opted into."""
        if not self.hyperparameters:
            return False
        command = flat_model_config(command_model)
        if "_class_path" not in self.hyperparameters:  # saved by a task built from Python: only some were recorded
            command = {name: value for name, value in command.items() if name in self.hyperparameters}
        found = differences(command, self.hyperparameters)
        if subcommand != "fit":
            if found:
                rank_zero_warn(f"{subcommand} --ckpt_path {self.path}: using the checkpoint's model settings "
                               f"instead of the command's for:\n{describe(found)}")
            return True
        opted_in = [resume_with_changed] if isinstance(resume_with_changed, str) else resume_with_changed or []
        allowed = {RESUMABLE[name] for name in opted_in}
        if any(key not in allowed for key in found):
            raise CLIConfigError(mismatch_message(str(self.path), found))
        if RESUMABLE["lr"] in found:  # only opted-in settings differ: make them count
            new_lr, old_lr = found[RESUMABLE["lr"]]
            self.callbacks.append(RescaleResumedLR(old_lr, new_lr))
        return False

    def model_config(self) -> dict[str, Any]:
        """The checkpoint's hyper-parameters as a ``model`` config, in LightningCLI's layout."""
        saved = dict(self.hyperparameters)
        if "_class_path" in saved:
            return {"class_path": saved.pop("_class_path"), "dict_kwargs": saved}
        return saved

    def hand_over(self, strategy: Strategy) -> bool:
        """Give the loaded checkpoint to ``strategy``'s :class:`~lit_lowrank.checkpoint_io.AtomicCheckpointIO`, which
        returns it when Lightning restores from this path instead of reading the file again; True if it did.
        Strategies that load checkpoints their own way (FSDP, ModelParallelStrategy, DeepSpeed) and other
        CheckpointIOs read the file again. Either way this object lets go of the checkpoint."""
        checkpoint, self.checkpoint = self.checkpoint, None
        io = strategy.checkpoint_io
        if isinstance(io, _WrappingCheckpointIO):
            io = io.checkpoint_io
        if checkpoint is None or not isinstance(io, AtomicCheckpointIO):
            return False
        if type(strategy).load_checkpoint is not Strategy.load_checkpoint:
            return False
        io.preload(self.path, checkpoint)
        return True
