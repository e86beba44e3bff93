"""The CLI's argument parser: options are never abbreviated, and a parse error is a few lines, not a page.

argparse expands an unambiguous prefix (``--trainer.max_step=5`` became ``max_steps``), so a typo could set another
option silently. jsonargparse prints its 50-line usage before a parse error and nests the real problem (an unknown
option of a class, deep in a Union) under several "Does not validate" headers. :func:`short_error` says the problem,
the closest option and where the options are listed.
"""
from __future__ import annotations

import dataclasses
import difflib
import importlib
import inspect
import os
import re
import sys
from typing import NoReturn

from jsonargparse import DefaultHelpFormatter
from lightning.pytorch.cli import LightningArgumentParser

_UNRECOGNIZED = re.compile(r"unrecognized arguments: (\S+)", re.IGNORECASE)
_NOT_ACCEPTED = (  # an argument a class does not take; a callable class (an optimizer) says it in other words
    re.compile(r"Problem with given class_path '(?P<cls>[^']+)':\s*\n\s*Option '(?P<name>[^']+)' is not accepted"),
    re.compile(r"Option '(?P<name>[^']+)' is not accepted. Got value: Namespace\(class_path='(?P<cls>[^']+)'"),
)
_NOT_ACCEPTED_BY_SUBCOMMAND = re.compile(r"does not accept option '([^']+)'")
_PARSER_KEY = re.compile(r'Parser key "([^"]+)"')
_UNION_NOISE = re.compile(r"^\s*(- )?(Expected a <class 'NoneType'>|Subtypes:|Errors:|Given value|Does not validate)")


class EpilogFormatter(DefaultHelpFormatter):
    """jsonargparse's help formatter, keeping the line breaks of the description and epilog (the nested-help table)."""

    def _fill_text(self, text, width, indent):
        return "".join(indent + line for line in text.splitlines(keepends=True))


class LowRankArgumentParser(LightningArgumentParser):
    """LightningArgumentParser without abbreviated options, whose parse errors are short (:func:`short_error`).

    Example:
        >>> parser = LowRankArgumentParser(prog="demo", exit_on_error=False)
        >>> _ = parser.add_argument("--max_steps", type=int, default=-1)
        >>> parser.parse_args(["--max_steps=3"]).max_steps
        3
        >>> try:  # plain argparse would have set max_steps
        ...     parser.parse_args(["--max_step=3"])
        ... except Exception as error:
        ...     print(error)
        unrecognized arguments: --max_step=3
    """

    def __init__(self, *args, **kwargs) -> None:
        kwargs.setdefault("allow_abbrev", False)
        kwargs.setdefault("formatter_class", EpilogFormatter)
        super().__init__(*args, **kwargs)

    def error(self, message: str, ex: Exception | None = None) -> NoReturn:
        if not self.exit_on_error or os.environ.get("JSONARGPARSE_DEBUG"):
            super().error(message, ex)
        parser = getattr(ex, "subcommand_parser", None) or self
        print(short_error(message, parser), file=sys.stderr, flush=True)
        self.exit(2)


def short_error(message: str, parser) -> str:
    """``error: ...`` in a few lines: an unknown option with the closest known one, an unknown argument of a class
    with its closest argument, else jsonargparse's message without the Union bookkeeping; then where to look.

    Example:
        >>> parser = LowRankArgumentParser(prog="cli.py fit")
        >>> _ = parser.add_argument("--trainer.max_steps", type=int)
        >>> print(short_error("Unrecognized arguments: --trainer.max_step=5", parser))
        error: unknown option --trainer.max_step=5; did you mean --trainer.max_steps? (options are never abbreviated)
        HINT: `cli.py fit --help` lists the options; its end says how to list those of the model, data, ...
    """
    prog = parser.prog.replace(" [options]", "")
    help_hint = f"HINT: `{prog} --help` lists the options; its end says how to list those of the model, data, ..."
    options = [option for option in parser._option_string_actions if option.startswith("--")]
    unknown = _UNRECOGNIZED.search(message)
    if unknown:  # on the command line
        given = unknown.group(1)
        closest = difflib.get_close_matches(given.split("=", 1)[0], options, n=1, cutoff=0.6)
        guess = f"; did you mean {closest[0]}?" if closest else ""
        return f"error: unknown option {given}{guess} (options are never abbreviated)\n{help_hint}"
    unknown = _NOT_ACCEPTED_BY_SUBCOMMAND.search(message)
    if unknown:  # in a config file
        given = unknown.group(1)
        closest = difflib.get_close_matches(f"--{given}", options, n=1, cutoff=0.6)
        guess = f"; did you mean {closest[0][2:]}?" if closest else ""
        return f"error: unknown key {given} in a --config{guess}\n{help_hint}"
    not_accepted = next((found for pattern in _NOT_ACCEPTED if (found := pattern.search(message))), None)
    if not_accepted:  # a class (a callable one: an optimizer) given an argument it does not take
        class_path, name = not_accepted.group("cls"), not_accepted.group("name")
        closest = difflib.get_close_matches(name, _argument_names(class_path), n=1, cutoff=0.6)
        guess = f"; did you mean {closest[0]!r}?" if closest else ""
        key = ".".join(_PARSER_KEY.findall(message[:not_accepted.start()]))
        what = "" if dataclasses.is_dataclass(_import(class_path)) else f" {class_path.rsplit('.', 1)[-1]}"
        return (f"error: {class_path} has no argument {name!r}{guess}\n"
                f"HINT: `{prog} --{key or '<key>'}.help{what}` lists its arguments.")
    lines = [line for line in message.splitlines() if line.strip() and not _UNION_NOISE.match(line)]
    return "error: " + "\n".join(lines[:12]) + ("\n  ..." if len(lines) > 12 else "") + f"\n{help_hint}"


def _import(class_path: str):
    module, _, name = class_path.rpartition(".")
    try:
        return getattr(importlib.import_module(module), name)
    except (ImportError, AttributeError, ValueError):  # an unimportable class is reported by the message itself
        return None


def _argument_names(class_path: str) -> list[str]:
    try:
        parameters = inspect.signature(_import(class_path)).parameters.values()
    except (TypeError, ValueError):
        return []
    return [p.name for p in parameters if p.kind not in (p.VAR_POSITIONAL, p.VAR_KEYWORD)]
