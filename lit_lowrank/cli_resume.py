"""``--ckpt_path`` against the command line: the checkpoint's model settings must match the command's.

LightningCLI (2.6) parses the checkpoint's hyper-parameters over the command's model config, so ``fit --ckpt_path``
with a changed optimizer mode, rank or learning rate would silently train with the checkpoint's values. Here a
difference stops ``fit`` (or, for a learning rate, is resumed on request) and is reported by test/validate/predict.
"""
from __future__ import annotations

from typing import Any

from lightning.pytorch.callbacks import Callback

from lit_lowrank.cli_errors import CLIConfigError

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
