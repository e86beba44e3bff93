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


# What transformers does at import when Hugging Face's `kernels` is installed (transformers.integrations.hub_kernels),
# then building a model: it failed with "cannot import name 'CUDAProperties' from 'kernels'" from the root.
USE_TRANSFORMERS = """
import kernels, transformers.activations
from transformers import LlamaConfig, LlamaForCausalLM
LlamaForCausalLM(LlamaConfig(hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2,
                             num_key_value_heads=2, vocab_size=50))
import lit_lowrank.kernels.dispatch
print("KERNELS_ORIGIN", kernels.__file__)
"""


def _run_in_root(args: list[str]) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, *args], cwd=ROOT, capture_output=True, text=True, timeout=300)


def _hub_kernels_installed() -> bool:
    from importlib.metadata import PackageNotFoundError, version
    try:
        return bool(version("kernels"))
    except PackageNotFoundError:
        return False


def test_python_c_in_the_root_imports_transformers_and_the_hub_kernels():
    result = _run_in_root(["-c", USE_TRANSFORMERS])
    assert result.returncode == 0, result.stderr[-3000:]
    origin = result.stdout.split("KERNELS_ORIGIN ")[-1].strip()
    assert not _is_ours(origin), origin
    if _hub_kernels_installed():
        assert Path(origin).parent.name == "kernels" and "site-packages" in origin, origin


def test_a_script_saved_in_the_root_imports_transformers():
    script = ROOT / f"_probe_kernels_{os.getpid()}.py"  # a user's own script beside README.md
    script.write_text(USE_TRANSFORMERS)
    try:
        result = _run_in_root([script.name])
    finally:
        script.unlink()
    assert result.returncode == 0, result.stderr[-3000:]
    assert not _is_ours(result.stdout.split("KERNELS_ORIGIN ")[-1].strip())


def test_without_the_hub_package_kernels_is_missing_not_ours():
    # -S: no site-packages, so no Hugging Face `kernels` anywhere; the root's folder must not pose as it.
    result = _run_in_root(["-S", "-c", "import kernels"])
    assert result.returncode == 1
    assert "ModuleNotFoundError: No module named 'kernels'" in result.stderr, result.stderr[-2000:]
