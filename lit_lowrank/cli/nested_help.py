"""Help for every part of the model: ``--model.backbone.help transformers_backbone``, ``--model.lora.help``, ...

jsonargparse answers ``--model.help TASK`` and ``--data.help NAME``, and advertises ``--model.lora.help`` and
``--model.backbone.help`` in it, but at the top level it cannot answer them: a dataclass's help takes no value
("expected one argument"), and a backbone is a factory function, which it does not count as a Backbone. These are
answered here, before parsing, for any argument of any task; ``fit --help`` ends with the list
(:func:`nested_help_epilog`).
"""
from __future__ import annotations

import collections.abc
import dataclasses
import functools
import importlib
import inspect
import sys
import textwrap
import types
import typing

from jsonargparse import ArgumentParser

from lit_lowrank.cli.parser import EpilogFormatter


def answer_nested_help(argv: list[str], prog: str = "cli.py") -> None:
    """Print the help ``argv`` asks for with ``--model[.init_args].<argument>.help [NAME]`` and exit (status 2 for a
    name that is not a choice); return when it asks for none.

    Example:
        >>> try:
        ...     answer_nested_help(["fit", "--model.backbone.help"])
        ... except SystemExit as done:
        ...     print("exit status", done.code)  # doctest: +ELLIPSIS
        --model.backbone takes one of these (Backbone, or a function that returns one):
          open_clip_backbone ...
          timm_backbone ...
          transformers_backbone ...
        ...
        exit status 0
    """
    for index, item in enumerate(argv):
        option, equals, value = item.partition("=")
        parts = [part for part in option.lstrip("-").split(".") if part != "init_args"]
        if not option.startswith("--") or len(parts) != 3 or parts[0] != "model" or parts[2] != "help":
            continue
        if not equals:
            following = argv[index + 1] if index + 1 < len(argv) else ""
            value = "" if following.startswith("-") else following
        text = argument_help(parts[1], value, prog.replace(" [options]", ""))
        failed = text.startswith("error:")
        print(text, file=sys.stderr if failed else sys.stdout)
        sys.exit(2 if failed else 0)


def argument_help(argument: str, value: str = "", prog: str = "cli.py fit") -> str:
    """The help text for the task argument ``argument`` (``backbone``, ``lora``, ``optimizer``, ...): the arguments
    of ``value`` (a short name or an import path), or the choices when ``value`` is empty.

    Example:
        >>> text = argument_help("lora")
        >>> print(text.splitlines()[0])
        usage: cli.py fit [--config CONFIG] [--model.lora.ARGUMENT VALUE ...]
        >>> "--model.lora.r R" in text and "--model.lora.target_modules" in text
        True
    """
    hint = _argument_type(argument)
    if hint is None:
        return (f"error: no task takes an argument {argument!r}. HINT: `{prog} --model.help TASK` lists a task's "
                "arguments; the end of `--help` lists the parts that have their own help.")
    kind, bases, skip = _kind(hint)
    key = f"model.{argument}"
    if kind == "dataclass":
        return _arguments_help(bases[0], key, 0, prog)
    if kind == "value":
        return textwrap.fill(f"--{key} is a plain value of type {_type_name(hint)}, without arguments of its own: set "
                             f"it with --{key}=VALUE or under model.init_args.{argument} in a config. `{prog} "
                             "--model.help TASK` shows it.", 100)
    choices = candidates(bases)
    if not value:
        return _choices_help(key, bases, choices, prog)
    target = _resolve(value, choices)
    if target is None:
        return (f"error: --{key}.help: {value!r} is not one of the choices for --{key}. HINT: "
                f"`{prog} --{key}.help` lists them; an import path (package.module.Name) works too.")
    return _arguments_help(target, key, skip, prog)


@functools.cache
def nested_help_epilog() -> str:
    """The end of ``fit --help``: which option prints the arguments of each part, and the names it takes."""
    from lightning.pytorch import LightningDataModule

    from lit_lowrank.tasks import LowRankTask

    def names(bases, within: str = "", limit: int = 12) -> str:
        found = [name for name, _ in candidates(bases) if name.startswith(within) or "." not in name]
        shown = ", ".join(name.rsplit(".", 1)[-1] for name in found[:limit])
        return shown + (", ..." if len(found) > limit else "")

    _, optimizer_bases, _ = _kind(_argument_type("optimizer"))
    _, scheduler_bases, _ = _kind(_argument_type("scheduler"))
    rows = [
        ("--model.help TASK", names((LowRankTask,))),
        ("--model.backbone.help BACKBONE", names(_kind(_argument_type("backbone"))[1])),
        ("--model.lora.help", "LoRAConfig: r, alpha, target_modules, modules_to_save, ..."),
        ("--model.optimizer.help OPTIMIZER", f"{names(optimizer_bases, 'lit_lowrank')}; or any torch.optim class"),
        ("--model.scheduler.help SCHEDULER", f"{names(scheduler_bases, 'lit_lowrank')}; or any torch.optim."
                                             "lr_scheduler class"),
        ("--data.help DATAMODULE", names((LightningDataModule,), "lit_lowrank")),
        ("--trainer.callbacks.help CALLBACK", "AdapterExport, MetricsPlot, OptimizerStateMonitor, ...; Lightning's "
                                              "ModelCheckpoint, EarlyStopping, LearningRateMonitor, ..."),
        ("--trainer.logger.help LOGGER", "CSVLogger, TensorBoardLogger, WandbLogger, MLFlowLogger, CometLogger"),
    ]
    lines = ["Nested help: the arguments of each part of the run (NAME: a short name or an import path):"]
    for option, names_ in rows:
        lines += textwrap.wrap(names_, 118, initial_indent=f"  {option:35s}", subsequent_indent=" " * 37)
    lines += ["Set them in a --config YAML (see configs/), or as --model.init_args.backbone.init_args.name_or_path="
              "VALUE;", "`null` works at any depth. Options are never abbreviated."]
    return "\n".join(lines)


def candidates(bases: tuple[type, ...]) -> list[tuple[str, object]]:
    """``(import path, class or factory)`` for every loaded, public subclass of ``bases`` and every public function
    of their package that returns one, sorted by import path."""
    found: dict[str, object] = {}
    stack = list(bases)
    while stack:
        cls = stack.pop()
        stack.extend(cls.__subclasses__())
        if cls not in bases and not inspect.isabstract(cls) and not cls.__name__.startswith("_"):
            found.setdefault(_import_path(cls), cls)
    for base in bases:
        package = sys.modules.get(base.__module__.rsplit(".", 1)[0])
        for name in getattr(package, "__all__", []):
            factory = getattr(package, name)
            if inspect.isfunction(factory) and _returns(factory, base):
                found.setdefault(_import_path(factory), factory)
    return sorted((path, target) for path, target in found.items() if _public(path))


def _public(path: str) -> bool:
    """Not private, not a test, not a base class; lit_lowrank's own: exported by one of its packages."""
    if "._" in path or ".test" in path or path.endswith("Base"):
        return False
    module = path.rsplit(".", 1)[0]
    return not module.startswith("lit_lowrank") or hasattr(sys.modules.get(module), "__path__")


def _argument_type(argument: str):
    from lit_lowrank.tasks import LowRankTask

    stack = [LowRankTask]
    while stack:
        task = stack.pop(0)
        hints = typing.get_type_hints(task.__init__)
        if argument in hints and argument != "return":
            return hints[argument]
        stack.extend(task.__subclasses__())
    return None


def _kind(hint) -> tuple[str, tuple, int]:
    """("dataclass" | "classes" | "value", the base classes, how many leading arguments the caller supplies)."""
    members = [member for member in _union_members(hint) if member is not type(None)]
    if len(members) == 1 and dataclasses.is_dataclass(members[0]):
        return "dataclass", (members[0],), 0
    if len(members) == 1 and typing.get_origin(members[0]) is collections.abc.Callable:
        supplied, returned = typing.get_args(members[0])
        return "classes", tuple(_union_members(returned)), len(supplied)
    if len(members) == 1 and inspect.isclass(members[0]) and members[0].__module__ != "builtins":
        return "classes", (members[0],), 0
    return "value", (), 0


def _union_members(hint) -> list:
    if typing.get_origin(hint) in (typing.Union, types.UnionType):
        return [member for arg in typing.get_args(hint) for member in _union_members(arg)]
    return [hint]


def _returns(factory, base: type) -> bool:
    try:
        returned = typing.get_type_hints(factory).get("return")
    except Exception:  # an annotation that does not resolve: not a factory we can vouch for
        return False
    return inspect.isclass(returned) and issubclass(returned, base)


def _import_path(target) -> str:
    """The shortest ``package.Name`` that exports ``target`` (``torch.optim.AdamW``, ``lit_lowrank.optim.LoRAPro``)."""
    parts = target.__module__.split(".")
    for end in range(1, len(parts) + 1):
        if getattr(sys.modules.get(".".join(parts[:end])), target.__name__, None) is target:
            return f"{'.'.join(parts[:end])}.{target.__name__}"
    return f"{target.__module__}.{target.__qualname__}"


def _resolve(value: str, choices: list[tuple[str, object]]):
    if "." in value:
        module, _, name = value.rpartition(".")
        try:
            target = getattr(importlib.import_module(module), name)
        except (ImportError, AttributeError, ValueError):
            return None
        return target if any(target is choice for _, choice in choices) else None
    matches = [choice for path, choice in choices if path.rsplit(".", 1)[-1] == value]
    return matches[0] if len(matches) == 1 else None


def _first_line(target) -> str:
    return (inspect.getdoc(target) or "").split("\n\n")[0].replace("\n", " ")


def _type_name(hint) -> str:
    return getattr(hint, "__name__", None) or str(hint).replace("typing.", "")


def _choices_help(key: str, bases: tuple, choices: list, prog: str) -> str:
    kinds = " or ".join(base.__name__ for base in bases)
    lines = [f"--{key} takes one of these ({kinds}, or a function that returns one):"]
    width = max((len(path.rsplit(".", 1)[-1]) for path, _ in choices), default=0)
    for path, target in choices:
        summary = textwrap.shorten(_first_line(target), 116 - width, placeholder=" ...")
        lines += [f"  {path.rsplit('.', 1)[-1]:{width}s}  {summary}", f"  {'':{width}s}  class_path: {path}"]
    lines.append(f"`{prog} --{key}.help NAME` lists the arguments of one.")
    return "\n".join(lines)


def _arguments_help(target, key: str, skip: int, prog: str) -> str:
    """jsonargparse's own help for the arguments of ``target`` (a class or a function), as ``--<key>.<argument>``;
    the first ``skip`` arguments are the ones the task supplies (an optimizer's parameters)."""
    supplied = list(inspect.signature(target).parameters)[:skip]
    path = _import_path(target)
    parser = ArgumentParser(prog=prog, usage=f"{prog} [--config CONFIG] [--{key}.ARGUMENT VALUE ...]",
                            description=f"Arguments of {path} for --{key}", formatter_class=EpilogFormatter,
                            add_help=False)
    add = parser.add_class_arguments if inspect.isclass(target) else parser.add_function_arguments
    add(target, key, skip=set(supplied), fail_untyped=False, sub_configs=True)
    where = f"model.init_args.{key.split('.', 1)[1]}"
    if not dataclasses.is_dataclass(target):
        where += f" (class_path: {path}, init_args: {{...}})"
    parser.epilog = textwrap.fill(f"Give them on the command line (--{key}.ARGUMENT=VALUE) or in a --config YAML "
                                  f"under {where}.", 100)
    return parser.format_help()
