"""Name the callbacks that a later ``--config`` (or ``--trainer.callbacks=``) dropped by setting its own list.

jsonargparse replaces a list given again, so a second config that sets ``trainer.callbacks: [EarlyStopping]`` ran
without the recipe's AdapterExport, MetricsPlot and ModelCheckpoint, and said nothing. ``callbacks+:`` appends.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml
from lightning.pytorch.utilities import rank_zero_warn


def warn_dropped_callbacks(argv: list[str], config) -> list[str]:
    """Warn, once per replacing source, which callbacks listed before it are not in the parsed ``config``; return
    the warnings.

    Example:
        >>> import tempfile
        >>> first, second = Path(tempfile.mkdtemp()) / "recipe.yaml", Path(tempfile.mkdtemp()) / "mine.yaml"
        >>> _ = first.write_text("trainer: {callbacks: [{class_path: lit_lowrank.callbacks.AdapterExport}]}")
        >>> _ = second.write_text("trainer: {callbacks: [{class_path: EarlyStopping}]}")
        >>> parsed = {"subcommand": "fit", "fit": {"trainer": {"callbacks": [{"class_path": "EarlyStopping"}]}}}
        >>> import warnings
        >>> with warnings.catch_warnings():
        ...     warnings.simplefilter("ignore")
        ...     found = warn_dropped_callbacks(["fit", "--config", str(first), "--config", str(second)], parsed)
        >>> print(found[0].split("before it: ")[1].split(" HINT")[0])  # doctest: +ELLIPSIS
        AdapterExport (from .../recipe.yaml) will not run.
    """
    subcommand = config.get("subcommand")
    parsed = (config.get(subcommand) or {}) if subcommand else config
    kept = {callback_name(callback) for callback in ((parsed.get("trainer") or {}).get("callbacks") or [])}
    listed: dict[str, str] = {}  # callback name -> the source that listed it
    warnings = []
    for source, names, replaces in _callback_lists(argv, subcommand):
        if replaces:
            dropped = {name: origin for name, origin in listed.items() if name not in names and name not in kept}
            if dropped:
                warnings.append(_message(source, dropped))
            listed = {}
        listed.update(dict.fromkeys(names, source))
    for message in warnings:
        rank_zero_warn(message)
    return warnings


def callback_name(callback: Any) -> str:
    """``EarlyStopping`` for ``"lightning.pytorch.callbacks.EarlyStopping"``, ``{"class_path": ...}`` or a
    jsonargparse Namespace with that class_path."""
    class_path = callback if isinstance(callback, str) else (callback or {}).get("class_path", "")
    return str(class_path).rsplit(".", 1)[-1]


def _message(source: str, dropped: dict[str, str]) -> str:
    by_origin: dict[str, list[str]] = {}
    for name, origin in dropped.items():
        by_origin.setdefault(origin, []).append(name)
    listed = "; ".join(f"{', '.join(names)} (from {origin})" for origin, names in by_origin.items())
    return (f"{source} sets trainer.callbacks, which replaces the list before it: {listed} will not run. HINT: to "
            "add callbacks to the list instead, write `callbacks+:` in a config (or --trainer.callbacks+=NAME); to "
            "keep the list, repeat the callbacks you want in it.")


def _callback_lists(argv: list[str], subcommand: str | None):
    """``(source, callback names, replaces the list)`` for each config file and command-line option that sets or
    extends ``trainer.callbacks``, in order."""
    for index, item in enumerate(argv):
        option, equals, value = item.partition("=")
        if not equals:
            value = argv[index + 1] if index + 1 < len(argv) else ""
        if option in ("--config", "-c", "--trainer"):
            content = _load(value)
            trainer = content if option == "--trainer" else _trainer_section(content, subcommand)
            for key, replaces in (("callbacks", True), ("callbacks+", False)):
                if isinstance(trainer, dict) and key in trainer:
                    yield value, _names(trainer[key]), replaces
        elif option in ("--trainer.callbacks", "--trainer.callbacks+"):
            yield "the command line", _names(_load(value) if value.lstrip().startswith(("[", "{")) else value), \
                not option.endswith("+")


def _trainer_section(content: Any, subcommand: str | None) -> Any:
    if not isinstance(content, dict):
        return None
    if subcommand and isinstance(content.get(subcommand), dict):  # a config given before the subcommand
        content = content[subcommand]
    return content.get("trainer")


def _load(value: str) -> Any:
    """A config file's content, or an inline YAML/JSON config's; None where neither parses."""
    try:
        text = Path(value).read_text() if Path(value).is_file() else value
        return yaml.safe_load(text)
    except (OSError, ValueError, yaml.YAMLError):
        return None


def _names(callbacks: Any) -> list[str]:
    items = callbacks if isinstance(callbacks, list) else [callbacks] if callbacks else []
    return [callback_name(item) for item in items if callback_name(item)]
