"""Stop a run with dropout, resume it in a fresh process from mid-epoch and epoch-end checkpoints: the next
steps' losses and the final parameters are bitwise those of the uninterrupted run, for every optimizer and with
a loader worker (CPU, deterministic math). Needs the RNG states and the sampler position in the checkpoint."""
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

SCRIPT = Path(__file__).with_name("resume_run.py")
sys.path.insert(0, str(SCRIPT.parent))
from resume_run import CASES, POINTS  # noqa: E402

RESUMED_FROM = {"mid0": 1, "end0": 2, "mid1": 3}  # global step of each resume point's checkpoint
pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    out = tmp_path_factory.mktemp("resume")
    for phase in ("straight", "first", "resume"):
        result = subprocess.run([sys.executable, str(SCRIPT), "--phase", phase, "--cases", ",".join(CASES),
                                 "--out", str(out)], capture_output=True, text=True, timeout=900, cwd=SCRIPT.parent)
        assert result.returncode == 0, f"{phase} failed:\n{result.stderr[-6000:]}"
    return out


@pytest.mark.parametrize("point", POINTS)
@pytest.mark.parametrize("case", CASES)
def test_resumed_run_is_bitwise_the_uninterrupted_one(runs, case, point):
    straight = json.loads((runs / f"straight-{case}.json").read_text())
    first = json.loads((runs / f"first-{case}.json").read_text())
    resumed = json.loads((runs / f"resume-{point}-{case}.json").read_text())
    assert sorted(straight) == ["1", "2", "3", "4"] and sorted(first) == ["1", "2", "3"]  # two steps per epoch
    assert sorted(resumed) == [str(step) for step in range(RESUMED_FROM[point] + 1, 5)]
    assert resumed == {step: straight[step] for step in resumed}
    final = load_file(runs / f"straight-{case}.safetensors")
    again = load_file(runs / f"resume-{point}-{case}.safetensors")
    for name, value in final.items():
        assert torch.equal(again[name], value), name
