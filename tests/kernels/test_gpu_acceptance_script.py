"""benchmarks/gpu_acceptance.sh and its fit helper, without a GPU: CI never runs the acceptance itself.

On a machine without a (visible) GPU the script must say so and exit 0 before installing or writing anything; the
fit helper must fail a run whose expected kernel never launched (here: ``cli.py --help``, which trains nothing),
and its launch-count profile must refuse to pass without a GPU.
"""
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


def no_gpu_env():
    env = dict(os.environ, CUDA_VISIBLE_DEVICES="", PYTHON=sys.executable)
    env.pop("TRITON_INTERPRET", None)
    return env


@pytest.mark.skipif(shutil.which("bash") is None, reason="needs bash")
def test_acceptance_script_without_gpu_says_so_and_exits_0(tmp_path):
    out = tmp_path / "results"
    done = subprocess.run(["bash", str(ROOT / "benchmarks" / "gpu_acceptance.sh"), str(out)], env=no_gpu_env(),
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stdout + done.stderr
    assert "no GPU present" in done.stdout and "Exiting 0 without installing or writing anything" in done.stdout
    assert not out.exists()


def test_fit_helper_fails_when_the_expected_kernel_never_ran():
    helper = [sys.executable, str(ROOT / "benchmarks" / "gpu_acceptance_fit.py")]
    expected = subprocess.run([*helper, "--expect", "lora_pro_full", "--", "--help"], env=no_gpu_env(),
                              capture_output=True, text=True, timeout=300)
    assert expected.returncode == 1, expected.stdout + expected.stderr
    assert "kernels: launches {}" in expected.stdout and "FAILED: lora_pro_full never launched" in expected.stdout
    assert "FAILED: lora_pro_full never passed a self-check" in expected.stdout


def test_launch_count_profile_needs_a_gpu_and_the_script_runs_it():
    helper = [sys.executable, str(ROOT / "benchmarks" / "gpu_acceptance_fit.py")]
    done = subprocess.run([*helper, "--launch-counts", "4", "16"], env=no_gpu_env(), capture_output=True, text=True,
                          timeout=300)
    assert done.returncode == 2, done.stdout + done.stderr
    assert "needs a CUDA GPU" in done.stdout
    script = (ROOT / "benchmarks" / "gpu_acceptance.sh").read_text()
    assert "gpu_acceptance_fit.py --launch-counts 4 16" in script
