"""Errors raised while the CLI builds the model, data or callbacks, said first and plainly.

jsonargparse wraps an exception raised by a constructor (``LoRAConfig(r=0)``, an unreachable hub, ...) in one
"Does not validate against any of the Union subtypes" per nesting level: 30 frames, with the real message deep
inside. :func:`explain` finds that innermost error and the config key being built when it was raised.
"""
from __future__ import annotations

import sys
import traceback
from pathlib import Path

import jsonargparse

_JSONARGPARSE = str(Path(jsonargparse.__file__).resolve().parent)


class CLIConfigError(ValueError):
    """A configuration the CLI cannot run; ``__cause__`` is the original error, where there is one."""


def _in_jsonargparse(filename: str) -> bool:
    return str(Path(filename).resolve()).startswith(_JSONARGPARSE)


def _raised_by_jsonargparse(error: BaseException) -> bool:
    frames = traceback.extract_tb(error.__traceback__)
    return bool(frames) and _in_jsonargparse(frames[-1].filename)


def _keys_being_built(error: BaseException) -> list[str]:
    """The config keys jsonargparse was instantiating along this error's traceback (outermost first)."""
    keys, tb = [], error.__traceback__
    while tb is not None:
        frame = tb.tb_frame
        component = frame.f_locals.get("component") if frame.f_code.co_name == "instantiate" else None
        if _in_jsonargparse(frame.f_code.co_filename) and isinstance(getattr(component, "dest", None), str):
            keys.append(component.dest)
        tb = tb.tb_next
    return keys


def explain(error: BaseException) -> CLIConfigError | None:
    """A :class:`CLIConfigError` naming the key and the innermost message, or None if ``error`` is not wrapped."""
    keys, current = [], error
    # follow jsonargparse's own wrappers only: a constructor's error keeps its cause (e.g. the OSError behind an
    # unreachable hub) as the constructor chose to present it
    while _raised_by_jsonargparse(current) and current.__cause__ is not None:
        keys += _keys_being_built(current)
        current = current.__cause__
    if current is error or _raised_by_jsonargparse(current):
        return None
    keys += _keys_being_built(current)
    where = f" {'.init_args.'.join(keys)}" if keys else ""
    explained = CLIConfigError(f"could not build{where}: {type(current).__name__}: {current}")
    explained.__cause__ = current
    return explained


def report(error: Exception) -> None:
    """Print the message first, then where the original error was raised (without jsonargparse's frames)."""
    lines = [f"error: {error}"]
    cause = error.__cause__
    if cause is not None:
        frames = [f for f in traceback.extract_tb(cause.__traceback__) if not _in_jsonargparse(f.filename)]
        lines.append("Raised at (most recent call last):")
        lines.extend(line.rstrip("\n") for line in traceback.format_list(frames))
        lines.extend(line.rstrip("\n") for line in traceback.format_exception_only(type(cause), cause))
    print("\n".join(lines), file=sys.stderr, flush=True)
