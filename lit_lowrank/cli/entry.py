"""The console entry point: ``lit-lowrank`` and ``python cli.py`` (LowRankCLI, or the ``memory`` subcommand)."""
from __future__ import annotations

import sys

from lit_lowrank.checkpoint_io import DamagedCheckpointError
from lit_lowrank.cli.app import LowRankCLI
from lit_lowrank.cli.errors import CLIConfigError, report
from lit_lowrank.errors import ConfigurationError


def main(args: list | None = None) -> None:
    """Run the command ``args`` (default: ``sys.argv[1:]``); a configuration it cannot run exits with status 2 and
    its message first, not a page of traceback.

    Example:
        >>> try:
        ...     main(["memory", "--config", "llama-2-7b", "--methods", "lora", "--world-size", "1"])
        ... except SystemExit as done:
        ...     print("exit status", done.code)  # doctest: +ELLIPSIS
        ### llama-2-7b
        ...
        | lora | 25.70 | 0.30 |
        ...
        exit status 0
    """
    argv = sys.argv[1:] if args is None else list(args)
    if argv[:1] == ["memory"]:  # not a LightningCLI subcommand: per-GPU memory tables (memory_command.py)
        from lit_lowrank.cli.memory_command import main as memory_main

        sys.exit(memory_main(argv[1:]))
    try:
        LowRankCLI(args=args)
    except (CLIConfigError, ConfigurationError, DamagedCheckpointError) as error:
        report(error)
        sys.exit(2)
    close_process_group()


def close_process_group() -> None:
    """Destroy the default process group after a successful run (DDP / FSDP), while the interpreter is still whole.

    Lightning leaves it to the process's exit, where gloo's worker threads can outlive the interpreter and abort a
    finished run ("terminate called without an active exception", exit status -6, seen in CI on a 2-process CPU DDP
    run). Only on success: after an exception another rank may be inside a collective, and destroying would hang.
    """
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()
