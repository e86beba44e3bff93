"""DDP and FSDP2 (ModelParallelStrategy) on 2 CPU processes give the parameters of one process with the same
global batch, for every optimizer. Each strategy runs once as a script (Lightning relaunches it per rank).

What each step gathers under FSDP2: LoRA-Pro all-gathers every adapter's A and B and their gradients
(r x (m + n) numbers per adapter) and keeps only its own rows of the result; full mode keeps its rows of the m x n
moments and all-reduces r x (n + r) numbers per adapter; LoRA-Pre all-reduces the r x q and r x r factor products
over the row shards (see lit_lowrank/optim/sharding.py). Under FSDP2 LoRA-Pro full mode also resumes from
Lightning's (distributed) checkpoint to the uninterrupted run's parameters, bitwise.
"""
import json
import math
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from distributed_exit import finished
from safetensors import safe_open
from safetensors.torch import load_file

SCRIPT = Path(__file__).with_name("distributed_run.py")
METHODS = ["adamw", "lora_pro_efficient", "lora_pro_full", "lora_pre_adam", "lora_pre_muon"]
RESUMED = {"fsdp": ["lora_pro_full"]}
pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    out = tmp_path_factory.mktemp("distributed")
    for strategy in ("single", "ddp", "fsdp"):
        result = subprocess.run([sys.executable, str(SCRIPT), "--strategy", strategy, "--methods", ",".join(METHODS),
                                 "--resume", ",".join(RESUMED.get(strategy, [])), "--steps", "3", "--out", str(out)],
                                capture_output=True, text=True, timeout=900, cwd=SCRIPT.parent)
        assert finished(result), f"{strategy} run failed:\n{result.stdout[-3000:]}\n{result.stderr[-6000:]}"
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


def report(runs, strategy: str, method: str, rank: int) -> dict:
    """What a rank logged with OptimizerStateMonitor, and the shapes of its optimizer-state tensors."""
    return json.loads((runs / f"{strategy}-{method}-rank{rank}.json").read_text())


def test_fsdp_ranks_hold_half_of_lora_pro_full_state(runs):
    single = report(runs, "single", "lora_pro_full", 0)["optimizer/state_bytes_per_rank"]
    for rank in range(2):
        logged = report(runs, "fsdp", "lora_pro_full", rank)
        assert 0.49 < logged["optimizer/state_bytes_per_rank"] / single < 0.51
        assert single <= logged["optimizer/state_bytes"] < 1.01 * single  # summed over ranks: the 0-d counters twice
        assert 0.99 < report(runs, "ddp", "lora_pro_full", rank)["optimizer/state_bytes_per_rank"] / single < 1.01


def test_no_fsdp_rank_holds_a_whole_m_x_n_moment(runs):
    moments = [entry for entry in report(runs, "single", "lora_pro_full", 0)["state"] if len(entry["global"]) == 2]
    assert len(moments) == 2 * 2 * 7  # every adapter of the tiny Llama (2 layers x 7) has two m x n moments
    for rank in range(2):
        for entry in report(runs, "fsdp", "lora_pro_full", rank)["state"]:
            if len(entry["global"]) == 2:
                m, n = entry["global"]
                assert entry["local"] == [m // 2, n], entry  # this rank's rows, as lora_B's shard
        # The check would see replication: DDP keeps each moment whole.
        ddp = report(runs, "ddp", "lora_pro_full", rank)["state"]
        assert all(math.prod(e["local"]) == math.prod(e["global"]) for e in ddp if len(e["global"]) == 2)


@pytest.mark.parametrize("method", RESUMED["fsdp"])
def test_fsdp_resume_from_a_lightning_checkpoint_is_bitwise(runs, method):
    straight = load_file(runs / f"fsdp-{method}-straight.safetensors")
    resumed = load_file(runs / f"fsdp-{method}-resumed.safetensors")
    stopped = load_file(runs / f"fsdp-{method}-stopped.safetensors")
    assert max((straight[k] - stopped[k]).abs().max().item() for k in straight) > 1e-3  # the resumed step moves
    for name, value in straight.items():
        assert torch.equal(resumed[name], value), name
