"""Checkpoints that survive a kill during their save, and a plain error for a checkpoint file that cannot be read.

Lightning's ``TorchCheckpointIO`` writes through a temporary file in the system's temp folder and moves it over the
target; when that folder is on another file system (a tmpfs ``/tmp``), the move is a copy, and a kill during it
leaves a truncated checkpoint under the real name. Nothing is flushed to disk either. :class:`AtomicCheckpointIO`
writes beside the target and swaps it in only when complete (:func:`lit_lowrank.atomic.replacing_file`).
"""
from __future__ import annotations

import pickle
import zipfile
from pathlib import Path
from typing import Any

import torch
from fsspec.core import url_to_fs
from fsspec.implementations.local import LocalFileSystem
from lightning.fabric.plugins.io.torch_io import TorchCheckpointIO
from lightning.pytorch.plugins.io.wrapper import _WrappingCheckpointIO

from lit_lowrank.atomic import replacing_file
from lit_lowrank.cli.lightning_private import chosen_checkpoint_io

_ZIP_START = b"PK\x03\x04"  # torch.save's format since PyTorch 1.6 is a zip archive
_PICKLE_START = b"\x80"  # its older format: a pickle (protocol 2 or later)


class DamagedCheckpointError(ValueError):
    """A checkpoint file that is empty, cut short or not a checkpoint at all; the message names it and the fix.

    Example:
        >>> import tempfile
        >>> from pathlib import Path
        >>> empty = Path(tempfile.mkdtemp()) / "epoch=0.ckpt"
        >>> _ = empty.write_bytes(b"")
        >>> try:
        ...     load_checkpoint_file(empty)
        ... except DamagedCheckpointError as error:
        ...     print(str(error).split(". HINT")[0])
        checkpoint .../epoch=0.ckpt is damaged: the file is empty (0 bytes)
    """


class AtomicCheckpointIO(TorchCheckpointIO):
    """``TorchCheckpointIO`` whose saves are all-or-nothing: a kill, a full disk or an error during a save leaves
    the previous file under that name as it was; and whose loads say plainly when a file is damaged.

    The checkpoint is written to a hidden ``.<name>.partial-*`` file in the same folder, flushed to disk and then
    renamed over the target in one step. A save interrupted by a kill leaves that hidden file behind (safe to
    delete; the next save of the same name removes it). ModelCheckpoint writes a new checkpoint before it deletes the
    one it replaces, so the previous best and ``last.ckpt`` stay loadable. Remote paths (``s3://``) keep Lightning's
    own transaction. Sharded checkpoints (FSDP ``state_dict_type="sharded"``, ModelParallelStrategy, DeepSpeed) are
    folders the strategy writes itself, without a CheckpointIO: not covered. ``lit-lowrank fit`` uses this by
    default; in your own Lightning project pass ``Trainer(plugins=[AtomicCheckpointIO()])``.

    Example:
        >>> import tempfile
        >>> from pathlib import Path
        >>> io = AtomicCheckpointIO()
        >>> path = Path(tempfile.mkdtemp()) / "last.ckpt"
        >>> io.save_checkpoint({"global_step": 1}, path)
        >>> try:  # a save that fails half-way through
        ...     io.save_checkpoint({"global_step": 2, "unsaveable": lambda: None}, path)
        ... except Exception as error:
        ...     print(type(error).__name__)
        PicklingError
        >>> io.load_checkpoint(path)["global_step"]  # a plain torch.save would have left a truncated file
        1
    """

    _preloaded: tuple[Path, dict[str, Any]] | None = None

    def preload(self, path, checkpoint: dict[str, Any]) -> None:
        """Answer the next load of ``path`` with ``checkpoint`` instead of reading the file: the CLI has already read
        it to compare its settings with the command's (:class:`lit_lowrank.cli.resume.ResumeCheckpoint`)."""
        self._preloaded = (Path(str(path)).resolve(), checkpoint)

    def save_checkpoint(self, checkpoint: dict[str, Any], path, storage_options: Any | None = None) -> None:
        fs, local_path = url_to_fs(str(path))
        if storage_options is not None or not isinstance(fs, LocalFileSystem):
            return super().save_checkpoint(checkpoint, path, storage_options)
        with replacing_file(local_path) as staging:
            torch.save(checkpoint, staging)

    def load_checkpoint(self, path, map_location: Any = lambda storage, loc: storage,
                        weights_only: bool | None = None) -> dict[str, Any]:
        preloaded, self._preloaded = self._preloaded, None
        if preloaded is not None and "://" not in str(path) and Path(str(path)).resolve() == preloaded[0]:
            return preloaded[1]
        try:
            checkpoint = super().load_checkpoint(path, map_location=map_location, weights_only=weights_only)
        except Exception as error:
            damaged = damage(path, error)
            if damaged is None:
                raise
            raise damaged from None
        return require_dict(path, checkpoint)


def use_by_default(strategy) -> bool:
    """Give ``strategy`` an :class:`AtomicCheckpointIO` where nobody chose a CheckpointIO and the strategy would fall
    back to Lightning's plain ``TorchCheckpointIO``; True if it did. A configured plugin, or a strategy with a
    CheckpointIO of its own kind (XLA), is left alone; a wrapper without an inner one (``AsyncCheckpointIO()``) gets
    this one inside."""
    chosen = chosen_checkpoint_io(strategy)  # the public property would create the default in its place
    if isinstance(chosen, _WrappingCheckpointIO):
        if chosen.checkpoint_io is not None:
            return False
        chosen.checkpoint_io = AtomicCheckpointIO()
        return True
    if chosen is not None or type(strategy.checkpoint_io) is not TorchCheckpointIO:
        return False
    strategy.checkpoint_io = AtomicCheckpointIO()
    return True


def load_checkpoint_file(path: str | Path, **torch_load_kwargs) -> Any:
    """``torch.load(path)``, raising :class:`DamagedCheckpointError` for a file that is not a readable checkpoint."""
    try:
        return torch.load(path, **torch_load_kwargs)
    except Exception as error:
        damaged = damage(path, error)
        if damaged is None:
            raise
        raise damaged from None


def require_dict(path, checkpoint: Any) -> dict[str, Any]:
    """``checkpoint`` if it is a dict, as every Lightning checkpoint is; else a :class:`DamagedCheckpointError` saying
    what the file holds (a tensor, a list, ...) instead of the AttributeError Lightning would stop with later."""
    if isinstance(checkpoint, dict):
        return checkpoint
    raise DamagedCheckpointError(f"checkpoint {Path(str(path)).resolve()} is not a Lightning checkpoint: it holds a "
                                 f"{type(checkpoint).__name__}, not a dict. HINT: pass a .ckpt file that Lightning "
                                 "saved (ModelCheckpoint or trainer.save_checkpoint).")


def damage(path, error: BaseException) -> DamagedCheckpointError | None:
    """A :class:`DamagedCheckpointError` describing ``path`` when ``error`` came from its content being unreadable;
    None for errors that are not about the content (a missing or unreadable file, a remote path, a checkpoint that
    ``weights_only`` refuses for holding other objects)."""
    local = Path(str(path))
    if isinstance(error, (PermissionError, FileNotFoundError, IsADirectoryError)) or not local.is_file():
        return None
    size = local.stat().st_size
    with local.open("rb") as file:
        start = file.read(len(_ZIP_START))
    refused = isinstance(error, pickle.UnpicklingError) and "Weights only load failed" in str(error)
    if size == 0:
        what = "the file is empty (0 bytes)"
    elif start == _ZIP_START and not zipfile.is_zipfile(local):
        what = f"the file is cut short ({size} bytes; a save that was interrupted, or an incomplete copy)"
    elif start[:1] == _PICKLE_START or start == _ZIP_START:  # torch.save's zip or its pre-1.6 pickle format
        if refused:  # intact, but holds objects other than tensors and plain types: Lightning's message says so
            return None
        what = f"its content is corrupt ({type(error).__name__}: {str(error).splitlines()[0] if str(error) else ''})"
    else:  # garbage also reaches the weights-only unpickler, which then calls it a refusal
        what = f"it is not a PyTorch checkpoint ({size} bytes, not in torch.save's format)"
    return DamagedCheckpointError(f"checkpoint {local.resolve()} is damaged: {what}. HINT: {_other_checkpoints(local)}")


def _other_checkpoints(path: Path) -> str:
    others = sorted(p.name for p in path.parent.glob("*.ckpt") if p.name != path.name and p.is_file())
    if not others:
        return "use another checkpoint, or start again without ckpt_path; there is no other .ckpt file in its folder."
    listed = ", ".join(others[-5:]) + (f" and {len(others) - 5} more" if len(others) > 5 else "")
    return f"use another checkpoint, e.g. an earlier one in the same folder ({path.parent}): {listed}."
