"""The multi-process tests accept gloo's teardown abort only after the job finished."""

import subprocess

from distributed_exit import GLOO_TEARDOWN_ABORT, finished


def run(code: int, stderr: str) -> subprocess.CompletedProcess:
    return subprocess.CompletedProcess(args=[], returncode=code, stdout="", stderr=stderr)


def test_exit_zero_and_the_teardown_abort_pass_and_everything_else_fails():
    assert finished(run(0, ""))
    assert finished(run(-6, f"Writing model shards: 100%\n{GLOO_TEARDOWN_ABORT}\nTraceback (most recent call last)"))
    assert not finished(run(1, "Traceback (most recent call last):\nValueError: bad"))
    assert not finished(run(-6, f"Traceback (most recent call last):\nRuntimeError\n{GLOO_TEARDOWN_ABORT}"))
    assert not finished(run(-9, "Killed"))
