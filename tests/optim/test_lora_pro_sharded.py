"""LoRAPro(mode="full") under FSDP2 on 2 CPU processes against one process: every rank keeps only its rows of the
m x n moments (the rows of its shard of lora_B), the steps end where one process ends, a NaN layer is skipped on
every rank, and a distributed checkpoint resumes bitwise. Layers split evenly (10 rows), unevenly (5 = 3 + 2) and
leave a rank empty (1 row). The ranks run lora_pro_sharded_run.py; the reference runs here."""
import importlib.util
import subprocess
import sys
from pathlib import Path

import pytest
import torch

SCRIPT = Path(__file__).with_name("lora_pro_sharded_run.py")
sys.path.insert(0, str(SCRIPT.parent))
from distributed_exit import finished
from lora_pro_sharded_run import STEPS, WORLD, build, full_parameters, make_optimizer, train  # noqa: E402

pytestmark = pytest.mark.slow
ROUTES = ["torch", pytest.param("triton", marks=pytest.mark.skipif(importlib.util.find_spec("triton") is None,
                                                                    reason="triton is not installed"))]


@pytest.fixture(scope="module", params=ROUTES)
def ranks(request, tmp_path_factory):
    out = tmp_path_factory.mktemp(f"sharded-{request.param}")
    command = [sys.executable, str(SCRIPT), "--out", str(out)] + (["--triton"] if request.param == "triton" else [])
    result = subprocess.run(command, capture_output=True, text=True, timeout=600, cwd=SCRIPT.parent)
    assert finished(result), f"sharded run failed:\n{result.stdout[-3000:]}\n{result.stderr[-6000:]}"
    return request.param, [torch.load(out / f"rank{rank}.pt", weights_only=False) for rank in range(WORLD)]


@pytest.fixture(scope="module")
def single():
    model = build()
    optimizer = make_optimizer(model)
    train(model, optimizer, range(STEPS))
    return model, optimizer


def rows_of(rows: int, rank: int) -> int:
    """Rows that FSDP2's Shard(0) gives ``rank``: torch.chunk's blocks (the last ranks may get fewer or none)."""
    blocks = torch.arange(rows).chunk(WORLD)
    return len(blocks[rank]) if rank < len(blocks) else 0


def test_two_ranks_end_where_one_process_ends(ranks, single):
    _, results = ranks
    model, _ = single
    expected, initial = full_parameters(model), full_parameters(build())
    assert min((expected[k] - initial[k]).abs().max() for k in expected if "lora" in k) > 5e-3  # every adapter moved
    for result in results:
        for name, value in expected.items():
            torch.testing.assert_close(result["straight"][name], value, rtol=1e-5, atol=1e-6,
                                       msg=lambda m: f"{name}: {m}")


def test_each_rank_keeps_only_its_rows_of_the_weight_moments(ranks):
    _, results = ranks
    for rank, result in enumerate(results):
        moments = [entry for entry in result["state"] if entry["key"].startswith("weight_exp_avg")]
        assert len(moments) == 2 * 5  # two moments for each of the five adapters
        for entry in moments:
            m, n = entry["global"]
            assert entry["sharded"] and entry["local"] == (rows_of(m, rank), n), entry
        # No rank holds a whole m x n moment, except of a layer with fewer rows than ranks.
        for entry in result["state"]:
            if entry["key"].startswith("weight_exp_avg") and entry["global"][0] >= WORLD:
                assert torch.Size(entry["local"]).numel() < torch.Size(entry["global"]).numel(), entry


def test_state_bytes_per_rank_are_those_of_its_rows(ranks, single):
    """optimizer_state_bytes (what OptimizerStateMonitor logs per rank) against the single process's state, its
    m x n moments and the AdamW moments of the head cut to the rank's rows, the 0-d counters whole."""
    _, results = ranks
    _, optimizer = single
    tensors = [value for state in optimizer.state.values() for value in state.values() if torch.is_tensor(value)]
    whole = sum(t.numel() * t.element_size() for t in tensors)
    for rank, result in enumerate(results):
        expected = sum((rows_of(t.shape[0], rank) * t[0].numel() if t.dim() else 1) * t.element_size() for t in tensors)
        assert result["state_bytes"] == expected
        assert result["state_bytes"] < 0.56 * whole  # about 1/world: only the counters are replicated


def test_a_non_finite_layer_is_skipped_on_every_rank(ranks, single):
    _, results = ranks
    _, optimizer = single
    assert optimizer.skipped_steps() == 1
    assert [result["skipped_steps"] for result in results] == [1] * WORLD


def test_a_distributed_checkpoint_resumes_bitwise(ranks):
    _, results = ranks
    for result in results:
        assert result["resumed_skipped_steps"] == result["skipped_steps"]
        for name, value in result["straight"].items():
            assert torch.equal(result["resumed"][name], value), name


def test_the_kernel_runs_on_each_rank_s_rows(ranks):
    route, results = ranks
    if route != "triton":
        pytest.skip("the torch route launches no kernel")
    layer_rows = [10, 10, 5, 1]  # one launch per batch: 10 x 6, the two 10 x 10 layers, 5 x 10, 1 x 5
    for rank, result in enumerate(results):
        per_step = [rows_of(m, rank) for m in layer_rows]
        # STEPS straight steps, the fresh optimizer's state-creating step (lr 0) in get_state_dict, the resumed step
        assert result["kernel_launches"] == per_step * (STEPS + 2)
