"""Checkpoint after one epoch, resume in a fresh process: the next steps' losses and the final parameters are
bitwise those of the uninterrupted run, for every optimizer (CPU, deterministic math)."""
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

SCRIPT = Path(__file__).with_name("resume_run.py")
METHODS = ["adamw", "lora_pro_efficient", "lora_pro_full", "lora_pre_adam", "lora_pre_muon"]
pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    out = tmp_path_factory.mktemp("resume")
    for phase in ("straight", "first", "resume"):
        result = subprocess.run([sys.executable, str(SCRIPT), "--phase", phase, "--methods", ",".join(METHODS),
                                 "--out", str(out)], capture_output=True, text=True, timeout=600, cwd=SCRIPT.parent)
        assert result.returncode == 0, f"{phase} failed:\n{result.stderr[-6000:]}"
    return out


@pytest.mark.parametrize("method", METHODS)
def test_resumed_run_is_bitwise_the_uninterrupted_one(runs, method):
    straight = json.loads((runs / f"straight-{method}.json").read_text())
    resumed = json.loads((runs / f"resume-{method}.json").read_text())
    first = json.loads((runs / f"first-{method}.json").read_text())
    assert sorted(first) == ["1", "2"] and sorted(resumed) == ["3", "4"]  # two steps per epoch
    assert [resumed[k] for k in ("3", "4")] == [straight[k] for k in ("3", "4")]
    final, again = load_file(runs / f"straight-{method}.safetensors"), load_file(runs / f"resume-{method}.safetensors")
    for name, value in final.items():
        assert torch.equal(again[name], value), name
