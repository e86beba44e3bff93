"""The repository's kernels/ folder (installed as lit_lowrank.kernels) is never the top-level ``kernels``, which is
Hugging Face's kernel hub package (``from kernels import get_kernel`` in transformers and bitsandbytes), whether
``python cli.py``, ``python -m pytest`` or ``python benchmarks/<script>.py`` runs from the repository root."""
import importlib.util
import os
import subprocess
import sys
from pathlib import Path

import pytest
from cli_runs import ROOT

OURS = ROOT / "kernels"
# Imported at interpreter start from PYTHONPATH; reports, when the program exits, what `kernels` resolves to then.
PROBE = """import atexit, importlib.util
atexit.register(lambda: print("KERNELS_ORIGIN", getattr(importlib.util.find_spec("kernels"), "origin", None)))
"""


def _is_ours(origin) -> bool:
    return origin not in (None, "None") and Path(origin).resolve().is_relative_to(OURS)


def test_this_process_does_not_see_our_kernels():
    spec = importlib.util.find_spec("kernels")
    assert spec is None or not _is_ours(spec.origin), spec


@pytest.mark.parametrize("command", [["cli.py", "--help"], ["benchmarks/environment.py"]], ids=["cli.py", "benchmarks"])
def test_scripts_run_from_the_root_do_not_see_our_kernels(command, tmp_path):
    (tmp_path / "sitecustomize.py").write_text(PROBE)
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(tmp_path), os.environ.get("PYTHONPATH")]))}
    result = subprocess.run([sys.executable, *command], cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    origin = result.stdout.split("KERNELS_ORIGIN ")[-1].strip()
    assert "KERNELS_ORIGIN" in result.stdout and not _is_ours(origin), origin


def test_pytest_run_from_the_root_does_not_see_our_kernels():
    test = f"{Path(__file__).relative_to(ROOT)}::test_this_process_does_not_see_our_kernels"
    result = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", test], cwd=ROOT,
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stdout[-3000:]
