"""The LoRA-Pro step benchmark runs end to end in --smoke mode and writes its CSV and markdown table."""
import csv

import pytest
import torch
from benchmark_scripts import load_benchmark


@pytest.fixture
def benchmark_module():
    pytest.importorskip("scipy")
    pytest.importorskip("transformers")
    module = load_benchmark("lora_pro_step")
    threads = torch.get_num_threads()
    yield module
    torch.set_num_threads(threads)


def test_smoke_run_writes_every_method(benchmark_module, tmp_path):
    rows = benchmark_module.main(["--smoke", "--threads", "1", "--out", str(tmp_path)])
    with open(tmp_path / "lora_pro_step.csv") as handle:
        written = list(csv.DictReader(handle))
    assert len(written) == len(rows) == 3 + 3 * 2  # 3 step methods; 3 solver methods at 2 layer counts
    steps = {row["method"]: row for row in written if row["section"] == "step"}
    assert set(steps) == {"lora_adamw", "lora_pro_efficient", "lora_pro_full"}
    assert float(steps["lora_adamw"]["ratio"]) == 1.0
    assert all(float(row["median_ms"]) > 0 for row in written)
    table = (tmp_path / "lora_pro_step.md").read_text()
    assert "| 4 | lora_pro_full |" in table and "per_layer_scipy_mxm" in table


def test_host_baseline_agrees_with_the_batched_rewrite(benchmark_module):
    """The per-layer scipy baseline must compute the same gradients, or the timing compares different work."""
    from torch import nn

    from lit_lowrank import LoRAConfig, inject_lora
    from lit_lowrank.adapters import lora_modules
    from lit_lowrank.optim import apply_lora_pro_

    torch.manual_seed(0)
    nets = [inject_lora(nn.Sequential(nn.Linear(12, 10), nn.Linear(10, 12)), LoRAConfig(r=3)) for _ in range(3)]
    for net in nets[1:]:
        net.load_state_dict(nets[0].state_dict())
    x = torch.randn(5, 12)
    for net in nets:
        for _, module in lora_modules(net):
            torch.manual_seed(1)
            module.lora_B.data.normal_()
        net(x).square().sum().backward()
    apply_lora_pro_(nets[0])
    benchmark_module.host_sylvester_rewrite_([m for _, m in lora_modules(nets[1])])
    benchmark_module.host_sylvester_rewrite_([m for _, m in lora_modules(nets[2])], dense_projector=True)
    for ref, *others in zip(*(lora_modules(net) for net in nets)):
        for (_, other) in others:
            torch.testing.assert_close(other.lora_A.grad, ref[1].lora_A.grad, rtol=1e-3, atol=1e-5)
            torch.testing.assert_close(other.lora_B.grad, ref[1].lora_B.grad, rtol=1e-3, atol=1e-5)
