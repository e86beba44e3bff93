"""The ``lit-lowrank`` / ``python cli.py`` command line: LightningCLI with tasks and data modules in subclass mode.

- :mod:`~lit_lowrank.cli.entry`: :func:`main` (also the ``memory`` subcommand, :mod:`~lit_lowrank.cli.memory_command`)
- :mod:`~lit_lowrank.cli.app`: :class:`LowRankCLI`; :mod:`~lit_lowrank.cli.summary`: what it prints when fit ends
- :mod:`~lit_lowrank.cli.parser`: no abbreviated options, short parse errors; :mod:`~lit_lowrank.cli.arguments`:
  ``--key=null`` at any depth; :mod:`~lit_lowrank.cli.nested_help`: ``--model.backbone.help NAME`` and the rest
- :mod:`~lit_lowrank.cli.errors`: constructor errors and missing packages said first
- :mod:`~lit_lowrank.cli.resume`: ``--ckpt_path`` read once and checked against the command
- :mod:`~lit_lowrank.cli.callback_lists`, :mod:`~lit_lowrank.cli.preflight`, :mod:`~lit_lowrank.cli.rundir`: dropped
  callbacks named, loop settings checked before any compute, a run folder without a logger
- :mod:`~lit_lowrank.cli.lightning_private`: every private Lightning API lit_lowrank uses
"""
from __future__ import annotations

import importlib

# Resolved on first use: lit_lowrank.checkpoint_io (imported by the CLI) reaches Lightning's private APIs through
# lit_lowrank.cli.lightning_private, so importing this package must not import the CLI itself.
_EXPORTS = {"LowRankCLI": "app", "main": "entry", "close_process_group": "entry", "print_summary": "summary",
            "CLIConfigError": "errors"}
__all__ = sorted(_EXPORTS)


def __getattr__(name: str):
    if name not in _EXPORTS:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    return getattr(importlib.import_module(f"{__name__}.{_EXPORTS[name]}"), name)
