"""Every benchmark script runs end to end in --smoke mode (tiny sizes, seconds) and writes the files it promises.

The scripts are loaded from their paths and run in this process (imports and the tokenizer are shared, which
keeps the whole file short). kernels_gpu.py has its own test (tests/kernels/test_lora_pro_full_kernel.py), and so
has step_timing.py, whose subcommands' smoke runs are in test_step_timing.py.
GaLore rows need galore-torch (the ``bench`` extra): without it they are absent and the tests expect that.
"""

import csv
import importlib.util
import sys
from pathlib import Path

import pytest
import torch
from benchmark_scripts import BENCHMARKS, HELPERS, load_benchmark

SCRIPTS = ["pretrain_quality", "finetune_quality", "memory", "step_timing"]
#: (script, subcommand) for every --help: step_timing.py's options are its subcommands'
HELP = [(name, None) for name in SCRIPTS if name != "step_timing"] + [
    ("step_timing", command) for command in ("lora-pre", "lora-pro", "training", "defaults-cost")]

pytest.importorskip("transformers")
pytest.importorskip("matplotlib")


load = load_benchmark


def galore() -> bool:
    return importlib.util.find_spec("galore_torch") is not None


def installed(module: str) -> bool:
    return importlib.util.find_spec(module) is not None


def rows(path: Path) -> list[dict]:
    with open(path, newline="") as handle:
        return list(csv.DictReader(handle))


@pytest.fixture(autouse=True)
def keep_threads():
    threads = torch.get_num_threads()
    yield
    torch.set_num_threads(threads)


@pytest.mark.parametrize("name, subcommand", HELP)
def test_help(name, subcommand, capsys):
    with pytest.raises(SystemExit) as exit_info:
        load(name).parse_args([subcommand, "--help"] if subcommand else ["--help"])
    assert exit_info.value.code == 0
    assert "--smoke" in capsys.readouterr().out


def test_pretrain_quality_smoke(tmp_path):
    module = load("pretrain_quality")
    summary = module.main(["--smoke", "--out", str(tmp_path)])
    methods = module.default_methods()
    assert ("galore" in methods) == galore() and "muon" in methods
    assert methods[:2] == ["adamw", "adamw_scaled"]  # AdamW and its fair counterpart head the table
    assert ({"apollo", "apollo_mini"} <= set(methods)) == installed("apollo_torch")
    assert ("adam_mini" in methods) == installed("adam_mini")
    assert [row["key"] for row in summary] == methods
    runs = rows(tmp_path / "pretrain_quality.csv")
    assert len(runs) == 2 * len(methods)  # one lr on seed 0, then seed 1
    assert all(float(run["final_val_loss"]) > 0 and run["diverged"] == "False" for run in runs)
    assert all(int(run["state_bytes"]) > 0 for run in runs)
    assert all(run["threads"] == "1" and run["warmup"] == "2" for run in runs)
    curves = rows(tmp_path / "pretrain_quality_curves.csv")
    assert {int(point["step"]) for point in curves} == {0, 3, 6}
    table = (tmp_path / "pretrain_quality.md").read_text()
    assert "- command: `python benchmarks/pretrain_quality.py --smoke" in table and "torch" in table
    assert "- CSV: `pretrain_quality.csv`, `pretrain_quality_curves.csv`, `pretrain_quality_summary.csv`" in table
    assert all(f"| {row['method']} |" in table for row in summary)
    assert (tmp_path / "pretrain_quality.png").stat().st_size > 0
    assert "in the block matrices" in table and "protocol wall time" in table
    # every other row against AdamW and against adamw_scaled, paired by seed, in the markdown and the summary CSV
    assert "### Against the full-rank references" in table
    compared = {row["key"]: row for row in rows(tmp_path / "pretrain_quality_summary.csv")}
    assert compared.keys() == set(methods) and compared["adamw"]["vs_adamw"] == ""
    assert all(row["vs_adamw_scaled_per_seed"].count("/") == 1  # two seeds paired
               for key, row in compared.items() if key != "adamw_scaled")
    # --report-only rebuilds the same summary from the saved runs, keeping the sweep's command in the header
    again = module.main(["--smoke", "--report-only", "--out", str(tmp_path)])
    assert [r["val_loss_mean"] for r in again] == [r["val_loss_mean"] for r in summary]
    assert "report rebuilt by" in (tmp_path / "pretrain_quality.md").read_text()


def test_finetune_quality_smoke(tmp_path):
    module = load("finetune_quality")
    summary = module.main(["--smoke", "--out", str(tmp_path)])
    assert [row["key"] for row in summary] == module.DEFAULT_METHODS
    runs = rows(tmp_path / "finetune_quality.csv")
    assert len(runs) == 2 * len(module.DEFAULT_METHODS)
    assert all(0.0 <= float(run["final_test_acc"]) <= 1.0 and run["test_examples"] == "6" for run in runs)
    by_method = {run["method"]: run for run in runs if run["seed"] == "0"}
    # LoRA methods train adapters + head only; LoRA-Pro full keeps m x n moments, so more state than efficient
    assert int(by_method["lora_adamw"]["trainable_params"]) < int(by_method["full_ft"]["trainable_params"])
    assert int(by_method["lora_pro_full"]["state_bytes"]) > int(by_method["lora_pro_efficient"]["state_bytes"])
    # rsLoRA and LoRA+ train the same adapters as LoRA
    assert by_method["rslora_adamw"]["trainable_params"] == by_method["loraplus_adamw"]["trainable_params"] \
        == by_method["lora_adamw"]["trainable_params"]
    saved = module.sweep.read_json(tmp_path / "finetune_quality_runs" / "lora_adamw_lr1e-3_seed0.json")
    assert len(saved["test_predictions"]) == len(saved["test_labels"]) == 6
    dm = module.data_module(True, 0)
    dm.setup("test")
    assert saved["test_labels"] == [label for _, label in dm.splits["test"]]  # evaluated length-sorted, saved in order
    assert all(row["seeds"] == 2 and row["test_acc_ci_low"] <= row["test_acc_mean"] <= row["test_acc_ci_high"]
               for row in summary)
    pairs = rows(tmp_path / "finetune_quality_pairs.csv")
    assert len(pairs) == len(summary) * (len(summary) - 1) // 2
    table = (tmp_path / "finetune_quality.md").read_text()
    assert all(f"| {row['method']} |" in table for row in summary)
    assert "| LoRA-Pro efficient r=2 - LoRA r=2 + AdamW |" in table and "protocol wall time" in table
    assert (tmp_path / "finetune_quality.png").stat().st_size > 0
    again = module.main(["--smoke", "--report-only", "--out", str(tmp_path)])
    assert [r["test_acc_ci"] for r in again] == [r["test_acc_ci"] for r in summary]  # fixed bootstrap seed


def test_finetune_quality_evaluates_length_sorted_and_restores_the_order():
    module = load("finetune_quality")
    dm = module.data_module(True, 0)
    dm.setup("fit")
    split = module.LengthSortedSplit(dm, "train")
    in_loader_order = [dm.splits["train"][i] for i in split.order]
    assert split.in_split_order(in_loader_order) == dm.splits["train"]
    lengths = [int(n) for batch in split.loader for n in batch["attention_mask"].sum(1)]
    assert lengths == sorted(lengths) and len(lengths) == len(in_loader_order)


def test_finetune_quality_evaluation_leaves_training_alone():
    """Validating more often changes nothing in the trained model (no draws from the RNG that dropout uses)."""
    module = load("finetune_quality")
    spec = dict(method="lora_adamw", lr=1e-2, seed=0, rank=2, steps=4, warmup=1, threads=1, smoke=True)
    often, rarely = module.run_one({**spec, "eval_every": 1}), module.run_one({**spec, "eval_every": 4})
    assert len(often["curve"]) == 4 and len(rarely["curve"]) == 1
    assert often["curve"][-1] == rarely["curve"][-1] | {"train_loss": often["curve"][-1]["train_loss"]}
    assert often["final_test_loss"] == rarely["final_test_loss"]


def test_finetune_quality_loraplus_groups():
    """LoRA+ puts every lora_B, and nothing else, at ratio x lr; the scheduler scales both groups alike."""
    module = load("finetune_quality")
    task, optimizer, scheduler = module.build_task("loraplus_adamw", 1e-3, 0, 2, 4, 1, smoke=True)
    names = {id(p): name for name, p in task.model.named_parameters()}
    rest, b_group = optimizer.param_groups
    assert all("lora_B" in names[id(p)] for p in b_group["params"])
    assert not any("lora_B" in names[id(p)] for p in rest["params"])
    assert (any("lora_A" in names[id(p)] for p in rest["params"])
            and any("classifier" in names[id(p)] for p in rest["params"]))
    trainable = [p for p in task.model.parameters() if p.requires_grad]
    assert len(rest["params"]) + len(b_group["params"]) == len(trainable)
    optimizer.step()  # no gradients yet: moves nothing, keeps the scheduler's order check quiet
    scheduler.step()
    assert b_group["lr"] == pytest.approx(module.LORAPLUS_RATIO * rest["lr"]) and rest["lr"] > 0


def test_finetune_quality_rslora_scaling():
    module = load("finetune_quality")
    task, _, _ = module.build_task("rslora_adamw", 1e-3, 0, 2, 4, 1, smoke=True)
    scalings = [m.scaling for m in task.model.modules() if hasattr(m, "lora_B") and hasattr(m, "scaling")]
    assert scalings and scalings == pytest.approx([4 / 2 ** 0.5] * len(scalings))  # alpha = 2 r = 4, over sqrt(r)


def test_memory_smoke(tmp_path):
    module = load("memory")
    result = module.main(["--smoke", "--out", str(tmp_path)])
    measured = rows(tmp_path / "memory_runs.csv")
    references = 1 + 2 * installed("apollo_torch") + installed("adam_mini")  # full-rank Muon needs torch only
    finetune = len(load("finetune_quality").cost_methods())
    assert len(measured) == len(result["runs"]) == (6 if galore() else 5) + references + finetune
    assert all(float(row["state_MiB"]) > 0 and float(row["peak_rss_MiB"]) > 0 for row in measured)
    state = {row["method"]: float(row["state_MiB"]) for row in measured if row["setting"] == "pretrain"}
    # measured after a real step: Muon keeps one full buffer per matrix, Adam-mini drops most of v, APOLLO-Mini
    # keeps rank-1 moments of the matrices
    assert state["muon"] < state["adamw"]
    if installed("adam_mini"):
        assert state["adam_mini"] < state["adamw"]
    if installed("apollo_torch"):
        assert state["apollo_mini"] < state["apollo"] < state["adamw"]
    llama = rows(tmp_path / "memory_llama.csv")
    assert {row["method"] for row in llama} >= {"AdamW", "LoRA-Pre Adam", "LoRA-Pro efficient", "LoRA-Pro full"}
    assert all(row["matches_formula"] == "True" for row in llama)
    # the optimizer table (once lora_pre_memory.py's): AdamW, GaLore, LoRA-Pre Adam and Muon at --smoke's rank 16
    optimizers = [row for row in llama if row["method"] not in module.LORA_METHODS]
    assert len(optimizers) == (4 if galore() else 3) and all(row["model"] == "60M" for row in llama)
    assert {row["rank"] for row in optimizers if row["method"].startswith("LoRA-Pre")} == {"16"}
    full = next(row for row in llama if row["method"] == "LoRA-Pro full")
    adamw = next(row for row in llama if row["method"] == "AdamW")
    assert full["lowrank_state_MiB"] == adamw["lowrank_state_MiB"]  # 2 m n per adapted layer, as AdamW's
    report = (tmp_path / "memory.md").read_text()
    assert (tmp_path / "memory.png").exists() and "## Llama-60M..1B" in report
    assert "- command: `python benchmarks/memory.py --smoke" in report
    assert "- CSV: `memory_runs.csv`, `memory_llama.csv`" in report


def test_scripts_do_not_leave_their_helpers_shadowed():
    """The scripts import their helpers as top-level modules (``environment``, ``timing``, ``stats``, ``report``,
    ``sweep``, ``step_cases``); each must be the one in benchmarks/."""
    for name in SCRIPTS:
        load(name)
    for helper in HELPERS:
        assert Path(sys.modules[helper].__file__).resolve() == BENCHMARKS / f"{helper}.py"


def test_lora_pre_bound_probe(tmp_path):
    found = {(row["variant"], str(row["zero gradient at step"])): row
             for row in load("lora_pre_bound_probe").main(["--out", str(tmp_path)])}
    default = [row for (variant, _), row in found.items() if "(default)" in variant]
    paper = [row for (variant, _), row in found.items() if variant.startswith("paper-literal")]
    # the biases are plain AdamW inside the same optimizer: their own bound is sqrt(C_t) lr, 1.02 lr at step 6
    assert len(default) == 3 and all(row["largest move (x lr)"] <= 1.03 for row in default)
    assert all(row["largest move (x lr)"] > 50 for row in paper)  # the unbounded steps
    assert "| debiased, v_floor (default) |" in (tmp_path / "lora_pre_bound_probe.md").read_text()
