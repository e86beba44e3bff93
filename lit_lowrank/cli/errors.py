"""Errors raised while the CLI builds the model, data, loggers or callbacks, said first and plainly.

jsonargparse wraps an exception raised by a constructor (``LoRAConfig(r=0)``, an unreachable hub, ...) in one
"Does not validate against any of the Union subtypes" per nesting level: 30 frames, with the real message deep
inside. :func:`explain` finds that innermost error and the config key being built when it was raised; a class
whose package is not installed (``WandbLogger`` without ``wandb``) becomes one line with the ``pip install``.
"""
from __future__ import annotations

import importlib.util
import re
import sys
import traceback
from importlib import metadata
from pathlib import Path

import jsonargparse

_JSONARGPARSE = str(Path(jsonargparse.__file__).resolve().parent)
# lightning_utilities' RequirementCache ("Requirement 'wandb>=0.12.10' not met") and Python's own import error
_REQUIREMENT = re.compile(r"Requirement '([^']+)' not met|No module named '([^'.]+)[^']*'")
_CLASS_PATH = re.compile(r"Problem with given class_path '([^']+)'")
_IMPORT_NAMES = {"comet_ml": "comet-ml", "sklearn": "scikit-learn", "PIL": "pillow", "yaml": "pyyaml"}


class CLIConfigError(ValueError):
    """A configuration the CLI cannot run; ``__cause__`` is the original error, where there is one.

    Example:
        >>> str(CLIConfigError("could not build model.init_args.lora: ValueError: r must be positive"))
        'could not build model.init_args.lora: ValueError: r must be positive'
    """


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
    keys, current, chain = [], error, [error]
    # follow jsonargparse's own wrappers only: a constructor's error keeps its cause (e.g. the OSError behind an
    # unreachable hub) as the constructor chose to present it
    while _raised_by_jsonargparse(current) and current.__cause__ is not None:
        keys += _keys_being_built(current)
        current = current.__cause__
        chain.append(current)
    keys += _keys_being_built(current)
    where = f" {'.init_args.'.join(keys)}" if keys else ""
    # a Union keeps the text of each member's error only, and not always in the innermost one
    missing = next((found for link in chain if (found := missing_package(link, where)) is not None), None)
    if missing is not None:
        return missing
    if current is error or _raised_by_jsonargparse(current):
        return None
    explained = CLIConfigError(f"could not build{where}: {type(current).__name__}: {current}")
    explained.__cause__ = current
    return explained


def missing_package(error: BaseException, where: str = "") -> CLIConfigError | None:
    """One line with the ``pip install`` for an error that says a package is missing, else None.

    jsonargparse keeps only the text of an error raised inside a Union type (a logger list), so the text is searched.

    Example:
        >>> message = ("Problem with given class_path 'lightning.pytorch.loggers.WandbLogger':\\n"
        ...            "  Requirement 'wandb>=0.12.10' not met. HINT: Try running `pip install -U 'wandb>=0.12.10'`")
        >>> print(missing_package(ValueError(message), " trainer.logger"))  # doctest: +ELLIPSIS
        could not build trainer.logger: lightning.pytorch.loggers.WandbLogger needs wandb>=0.12.10, which is not \
installed. HINT: pip install 'wandb>=0.12.10'...
    """
    text = str(error)
    found = _REQUIREMENT.search(text)
    if found is None:
        return None
    if found.group(2) and importlib.util.find_spec(found.group(2)) is not None:
        return None  # installed: a misspelled class path or module inside it, not a missing package
    requirement = found.group(1) or _IMPORT_NAMES.get(found.group(2), found.group(2))
    classes = _CLASS_PATH.findall(text[:found.start()])
    needs = classes[-1] if classes else "it"
    extra = _extra_providing(re.split(r"[<>=!~;\[ ]", requirement, maxsplit=1)[0])
    also = f" (or the extra that provides it: pip install -e '.[{extra}]' in the repository)" if extra else ""
    return CLIConfigError(f"could not build{where}: {needs} needs {requirement}, which is not installed. "
                          f"HINT: pip install '{requirement}'{also}.")


def _extra_providing(package: str) -> str | None:
    """The smallest ``lit_lowrank[extra]`` that installs ``package`` (the logger extras: wandb, mlflow, comet)."""
    try:
        requires = metadata.requires("lit_lowrank") or []
    except metadata.PackageNotFoundError:
        return None
    normalized = re.sub(r"[-_.]+", "-", package).lower()
    extras: dict[str, int] = {}
    providing = set()
    for requirement in requires:
        marker = re.search(r"extra\s*==\s*['\"]([^'\"]+)['\"]", requirement)
        if marker is None:
            continue
        extras[marker.group(1)] = extras.get(marker.group(1), 0) + 1
        name = re.match(r"[A-Za-z0-9._-]+", requirement).group(0)
        if re.sub(r"[-_.]+", "-", name).lower() == normalized:
            providing.add(marker.group(1))
    return min(providing, key=lambda extra: (extras[extra], extra)) if providing else None


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
