"""The environment record of a benchmark run: where the repository and its results are, and the machine, date,
package versions, git commit and command line that head every results file (``environment`` and
``environment_lines``), plus the process's own peak memory and CPU time (``peak_rss_mib``, ``cpu_seconds``).

The benchmark scripts (run as ``python benchmarks/<script>.py``, or loaded from their path by the tests) put their
own folder first on ``sys.path`` and import this and the other helpers (``timing``, ``stats``, ``report``,
``sweep``, and ``step_timing``'s measurements ``step_cases``) as top-level modules.
"""

from __future__ import annotations

import contextlib
import datetime
import logging
import os
import platform
import resource
import shlex
import subprocess
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
RESULTS = Path(__file__).resolve().parent / "results"
DISTRIBUTIONS = ("torch", "transformers", "lightning", "galore-torch", "numpy")


def cpu_name() -> str:
    """CPU model and core count, e.g. ``AMD EPYC (2 cores)``."""
    try:
        with open("/proc/cpuinfo") as handle:
            for line in handle:
                if line.startswith("model name"):
                    return f"{line.split(':', 1)[1].strip()} ({os.cpu_count()} cores)"
    except OSError:
        pass
    return f"{platform.processor() or platform.machine()} ({os.cpu_count()} cores)"


def memory_gib() -> float | None:
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30
    except (ValueError, OSError, AttributeError):
        return None


def version(distribution: str) -> str:
    from importlib.metadata import PackageNotFoundError
    from importlib.metadata import version as _version

    try:
        return _version(distribution)
    except PackageNotFoundError:
        return "not installed"


def git_commit() -> str:
    """Short commit of the repository, with ``+uncommitted`` when the working tree differs from it."""
    try:
        commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=REPO, capture_output=True, text=True,
                                timeout=10).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=REPO,
                               capture_output=True, text=True, timeout=10).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return "unknown"
    return (commit or "unknown") + (" +uncommitted changes" if dirty else "")


def load_average() -> tuple[float, float, float] | None:
    try:
        return tuple(round(x, 2) for x in os.getloadavg())
    except (OSError, AttributeError):
        return None


def command_line(script: str | Path, argv: Sequence[str] | None) -> str:
    """The command as a user would type it from the repository root."""
    argv = sys.argv[1:] if argv is None else list(argv)
    return shlex.join(["python", f"benchmarks/{Path(script).name}", *argv])


def gpu_name() -> str | None:
    try:
        import torch

        return torch.cuda.get_device_name(0) if torch.cuda.is_available() else None
    except Exception:  # noqa: BLE001 - no driver, broken install: just no GPU
        return None


def environment(command: str, threads: int | None = None) -> dict[str, Any]:
    """Machine, date, versions, git commit, command: the header of every results file."""
    memory = memory_gib()
    env = {
        "command": command,
        "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "machine": f"{cpu_name()}, {platform.machine()}" + (f", {memory:.0f} GiB RAM" if memory else ""),
        "gpu": gpu_name() or "none",
        "os": platform.platform(terse=True),
        "python": platform.python_version(),
        **{name: version(name) for name in DISTRIBUTIONS},
        "git commit": git_commit(),
        "load average at start": load_average(),
    }
    if threads is not None:
        env["torch threads"] = threads
    return env


def environment_lines(env: dict[str, Any]) -> list[str]:
    """The environment as markdown lines (command first, in a code span)."""
    lines = [f"- command: `{env.get('command', 'unknown')}`"]
    lines += [f"- {key}: {value}" for key, value in env.items() if key != "command"]
    return lines


def peak_rss_mib() -> float:
    """Peak resident memory of this process so far (``ru_maxrss``; KiB on Linux, bytes on macOS), in MiB."""
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak / 2**20 if sys.platform == "darwin" else peak / 1024


def cpu_seconds() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


@contextlib.contextmanager
def library_warnings_silenced():
    """Raise the ``lit_lowrank`` logger to ERROR inside the block (a benchmark that builds the paper formula's
    optimizer many times would log its warning each time) and restore its level after, since the process may go
    on: the tests run benchmark functions in their own process."""
    logger = logging.getLogger("lit_lowrank")
    level = logger.level
    logger.setLevel(logging.ERROR)
    try:
        yield
    finally:
        logger.setLevel(level)
