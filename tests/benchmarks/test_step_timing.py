"""benchmarks/step_timing.py: every subcommand runs end to end in --smoke mode and writes the files it promises
(under the result names of the scripts it replaced), and the baselines it times compute what they claim to.

GaLore rows need galore-torch (the ``bench`` extra): without it they are absent and the tests expect that.
"""
import csv
import importlib.util
from pathlib import Path

import pytest
import torch
from benchmark_scripts import load_benchmark

SUBCOMMANDS = ["lora-pre", "lora-pro", "training", "defaults-cost"]

pytest.importorskip("transformers")


@pytest.fixture
def step_timing():
    threads = torch.get_num_threads()
    yield load_benchmark("step_timing")
    torch.set_num_threads(threads)


def galore() -> bool:
    return importlib.util.find_spec("galore_torch") is not None


def rows(path: Path) -> list[dict]:
    with open(path, newline="") as handle:
        return list(csv.DictReader(handle))


def test_subcommands(step_timing):
    assert list(step_timing.SUBCOMMANDS) == list(step_timing.COMMANDS) == list(step_timing.SMOKE) == SUBCOMMANDS


def test_lora_pre_smoke(step_timing, tmp_path):
    measured = step_timing.main(["lora-pre", "--smoke", "--threads", "1", "--out", str(tmp_path)])
    methods = {row["method"] for row in rows(tmp_path / "lora_pre_step.csv")}
    floors = {"floor_products_r4", "floor_elementwise"}  # the eager-torch lower bound of a LoRA-Pre step
    assert methods == {"adamw_foreach", "lora_pre_r4", *floors} | ({"galore_r4_amortised"} if galore() else set())
    report = (tmp_path / "lora_pre_step.md").read_text()
    assert len(measured) == len(methods) and "| 64x96 |" in report
    assert "- command: `python benchmarks/step_timing.py lora-pre --smoke" in report
    assert "- CSV: `lora_pre_step.csv`" in report and not (tmp_path / "lora_pre_step_profile.csv").exists()


def test_lora_pro_smoke(step_timing, tmp_path):
    pytest.importorskip("scipy")
    measured = step_timing.main(["lora-pro", "--smoke", "--threads", "1", "--out", str(tmp_path)])
    written = rows(tmp_path / "lora_pro_step.csv")
    assert len(written) == len(measured) == 3 + 3 * 2  # 3 step methods; 3 solver methods at 2 layer counts
    assert list(written[0]) == ["section", "r", "layers", "method", "median_ms", "min_ms", "optimizer_ms", "ratio"]
    steps = {row["method"]: row for row in written if row["section"] == "step"}
    assert set(steps) == {"lora_adamw", "lora_pro_efficient", "lora_pro_full"}
    assert float(steps["lora_adamw"]["ratio"]) == 1.0
    assert all(float(row["median_ms"]) > 0 for row in written)
    table = (tmp_path / "lora_pro_step.md").read_text()
    assert "| 4 | lora_pro_full |" in table and "per_layer_scipy_mxm" in table
    assert "- command: `python benchmarks/step_timing.py lora-pro --smoke" in table


def test_training_smoke(step_timing, tmp_path):
    pytest.importorskip("matplotlib")
    measured = step_timing.main(["training", "--smoke", "--out", str(tmp_path)])
    written = rows(tmp_path / "train_step_speed.csv")
    assert len(written) == len(measured) == (7 + 2 if galore() else 6) + 5  # pre-training rows include full-rank Muon
    assert "muon" in {row["method"] for row in written if row["setting"] == "pretrain"}
    assert list(written[0]) == ["setting", "method", "label", "median_ms", "min_ms", "optimizer_ms", "ratio",
                                "repeats_used", "disturbed_repeats"]
    baselines = {row["setting"]: row for row in written if row["method"] in ("adamw", "lora_adamw")}
    assert set(baselines) == {"pretrain", "finetune"} and all(float(r["ratio"]) == 1.0 for r in baselines.values())
    assert all(float(row["median_ms"]) > 0 for row in written)
    report = (tmp_path / "train_step_speed.md").read_text()
    assert (tmp_path / "train_step_speed.png").exists() and "load average" in report
    # the setting is pretrain_quality.py's: its byte vocabulary and its GaLore gap
    gap = load_benchmark("pretrain_quality").PROJECTION_GAP
    assert "byte vocabulary 257" in report and f"/ {gap} (its update_proj_gap" in report
    assert not galore() or f"amortised (1 SVD step per {gap})" in report


def test_defaults_cost_smoke(step_timing, tmp_path, capsys):
    measured = step_timing.main(["defaults-cost", "--smoke", "--threads", "1"])
    printed = capsys.readouterr().out
    assert len(measured) == 1 and "| 64x96 |" in printed and "| paper + check / paper |" in printed
    assert not list(tmp_path.iterdir())  # prints only, unless --out is given
    step_timing.main(["defaults-cost", "--smoke", "--threads", "1", "--out", str(tmp_path)])
    assert rows(tmp_path / "lora_pre_defaults_cost.csv")[0]["shape"] == "64x96"
    report = (tmp_path / "lora_pre_defaults_cost.md").read_text()
    assert "- command: `python benchmarks/step_timing.py defaults-cost --smoke" in report


def test_time_interleaved_order_and_prepare():
    """Rotated order by default; fixed order and an untimed ``prepare`` before every step where asked."""
    timing = load_benchmark("timing")
    calls = []
    steppers = {"a": lambda: calls.append("a"), "b": lambda: calls.append("b")}
    times, clean = timing.time_interleaved(steppers, 3, 0.0, 0.0)
    assert calls == ["a", "b", "b", "a", "a", "b"] and {len(t) for t in times.values()} == {3} and len(clean) == 3
    calls.clear()
    timing.time_interleaved(steppers, 2, 0.0, 0.0, warmup_repeats=1, rotate=False, prepare=lambda: calls.append("p"))
    assert calls == ["p", "a", "p", "b"] * 3


def test_galore_amortised_over_its_gap():
    step_cases = load_benchmark("step_cases")
    assert step_cases.amortised([1.0, 2.0], [201.0, 402.0], 200) == pytest.approx([2.0, 4.0])


def test_host_baseline_agrees_with_the_batched_rewrite(step_timing):
    """The per-layer scipy baseline must compute the same gradients, or the timing compares different work."""
    pytest.importorskip("scipy")
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
    rewrite = step_timing.step_cases.host_sylvester_rewrite_
    rewrite([m for _, m in lora_modules(nets[1])])
    rewrite([m for _, m in lora_modules(nets[2])], dense_projector=True)
    for ref, *others in zip(*(lora_modules(net) for net in nets)):
        for (_, other) in others:
            torch.testing.assert_close(other.lora_A.grad, ref[1].lora_A.grad, rtol=1e-3, atol=1e-5)
            torch.testing.assert_close(other.lora_B.grad, ref[1].lora_B.grad, rtol=1e-3, atol=1e-5)
