"""DDP and FSDP2 (ModelParallelStrategy) on 2 CPU processes give the parameters of one process with the same
global batch, for every optimizer. Each strategy runs once as a script (Lightning relaunches it per rank).

What each step gathers under FSDP2: LoRA-Pro all-gathers every adapter's A and B and their gradients
(r x (m + n) numbers per adapter) and keeps only its own rows of the result; LoRA-Pre all-reduces the r x q
and r x r factor products over the row shards (see lit_lowrank/optim/sharding.py).
"""
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file

SCRIPT = Path(__file__).with_name("distributed_run.py")
METHODS = ["adamw", "lora_pro_efficient", "lora_pro_full", "lora_pre_adam", "lora_pre_muon"]
pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    out = tmp_path_factory.mktemp("distributed")
    for strategy in ("single", "ddp", "fsdp"):
        result = subprocess.run([sys.executable, str(SCRIPT), "--strategy", strategy, "--methods", ",".join(METHODS),
                                 "--steps", "3", "--out", str(out)], capture_output=True, text=True, timeout=600,
                                cwd=SCRIPT.parent)
        assert result.returncode == 0, f"{strategy} run failed:\n{result.stdout[-3000:]}\n{result.stderr[-6000:]}"
    return out


@pytest.mark.parametrize("strategy", ["ddp", "fsdp"])
@pytest.mark.parametrize("method", METHODS)
def test_two_processes_match_one(runs, strategy, method):
    single = load_file(runs / f"single-{method}.safetensors")
    distributed = load_file(runs / f"{strategy}-{method}.safetensors")
    initial = load_file(runs / f"initial-{method}.safetensors")
    assert single.keys() == distributed.keys()
    moved = max((single[k] - initial[k]).abs().max().item() for k in single)
    assert moved > 1e-3, "the optimizer must have changed the parameters"
    for name, value in single.items():
        torch.testing.assert_close(distributed[name], value, rtol=1e-4, atol=2e-5, msg=lambda m: f"{name}: {m}")


def test_fsdp_really_shards(runs):
    with safe_open(runs / "fsdp-adamw.safetensors", "pt") as handle:
        assert int(handle.metadata()["sharded_parameters"]) > 0
    with safe_open(runs / "ddp-adamw.safetensors", "pt") as handle:
        assert int(handle.metadata()["sharded_parameters"]) == 0


@pytest.mark.parametrize("method", ["lora_pro_efficient", "lora_pro_full"])
def test_adapter_export_under_fsdp_holds_every_shard(runs, method):
    exported = load_file(runs / f"fsdp-{method}-adapter" / "final" / "adapter_model.safetensors")
    single = load_file(runs / f"single-{method}.safetensors")
    prefix = "base_model.model."
    for key, value in exported.items():
        name = key[len(prefix):].replace(".lora_A.weight", ".lora_A").replace(".lora_B.weight", ".lora_B")
        assert value.shape == single[name].shape, name  # full shapes, not one rank's rows
        torch.testing.assert_close(value, single[name], rtol=1e-4, atol=2e-5)
    assert len(exported) == 2 * 2 * 7  # 2 layers x 7 projections x (A, B)
