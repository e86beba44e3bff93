"""benchmarks/finetune_smollm2.py: the protocol end to end on a tiny Llama (--smoke, no download), its data split
(the recipe's chats, >= 1000 test paragraphs), evaluation in the split's order, and, where the pip-packaged GGUF
is installed, one short run on the real SmolLM2-135M-Instruct."""
import csv
import importlib.util

import pytest
import torch
from benchmark_scripts import load_benchmark

pytest.importorskip("transformers")
pytest.importorskip("matplotlib")


@pytest.fixture(scope="module")
def bench():
    return load_benchmark("finetune_smollm2")


@pytest.fixture(autouse=True)
def keep_threads():
    threads = torch.get_num_threads()
    yield
    torch.set_num_threads(threads)


def rows(path):
    with open(path, newline="") as handle:
        return list(csv.DictReader(handle))


def test_help(bench, capsys):
    with pytest.raises(SystemExit) as exit_info:
        bench.parse_args(["--help"])
    assert exit_info.value.code == 0
    out = capsys.readouterr().out
    assert "--smoke" in out and "--report-only" in out and "--precision" in out


def test_smoke_runs_the_protocol_and_rebuilds_the_same_report(bench, tmp_path):
    summary = bench.main(["--smoke", "--out", str(tmp_path)])
    assert [row["key"] for row in summary] == bench.DEFAULT_METHODS
    runs_dir = tmp_path / "finetune_smollm2_runs"
    # zero-shot is evaluated once (greedy, untrained: no seed changes it); every trained method on seeds 0 and 1
    assert sorted(p.name for p in runs_dir.glob("zero_shot_*.json")) == ["zero_shot_lr1e-3_seed0.json"]
    runs = rows(tmp_path / "finetune_smollm2.csv")
    assert len(runs) == 1 + 2 * (len(bench.DEFAULT_METHODS) - 1)
    assert all(run["test_examples"] == "6" and run["precision"] == "bf16-mixed" and run["diverged"] == "False"
               for run in runs)
    by_method = {run["method"]: run for run in runs if run["seed"] == "0"}
    assert by_method["zero_shot"]["steps"] == "0" and by_method["zero_shot"]["state_bytes"] == "0"
    assert int(by_method["lora_adamw"]["trainable_params"]) < int(by_method["full_ft"]["trainable_params"])
    assert int(by_method["lora_pro_full"]["state_bytes"]) > int(by_method["lora_pro_efficient"]["state_bytes"])
    assert int(by_method["lora_pre_adam"]["state_bytes"]) < int(by_method["full_ft"]["state_bytes"])
    assert all(float(by_method[m]["step_ms_median"]) > 0 for m in bench.DEFAULT_METHODS if m != "zero_shot")

    # per-paragraph results are saved in the test split's order (evaluation batches are length-sorted)
    saved = bench.sweep.read_json(runs_dir / "lora_adamw_lr1e-3_seed0.json")
    dm = bench.data_module(True, 0)
    dm.setup("fit")
    references = [e.prompt.reference_decoded for e in dm.examples["test"]]
    assert len(saved["test_generations"]) == len(saved["test_predictions"]) == len(references) == 6
    assert saved["test_labels"] == bench.nothing_right(dm, "test", 0)["labels"]
    assert [label.replace(" ", "") for label in saved["test_labels"]] == [r.replace(" ", "") for r in references]

    assert all(row["test_acc_ci_low"] <= row["test_acc_mean"] <= row["test_acc_ci_high"] for row in summary)
    assert [row["seeds"] for row in summary] == [1] + [2] * (len(summary) - 1)
    pairs = rows(tmp_path / "finetune_smollm2_pairs.csv")
    assert len(pairs) == len(summary) * (len(summary) - 1) // 2
    table = (tmp_path / "finetune_smollm2.md").read_text()
    assert "- command: `python benchmarks/finetune_smollm2.py --smoke" in table and "protocol wall time" in table
    assert all(f"| {row['method']} |" in table for row in summary)
    assert "| LoRA-Pro efficient r=2 - LoRA r=2 + AdamW |" in table
    assert "| LoRA r=2 + AdamW - Zero-shot (no training) |" in table
    assert (tmp_path / "finetune_smollm2.png").stat().st_size > 0

    again = bench.main(["--smoke", "--report-only", "--out", str(tmp_path)])
    assert [r["test_acc_ci"] for r in again] == [r["test_acc_ci"] for r in summary]  # fixed bootstrap seed
    assert "report rebuilt by" in (tmp_path / "finetune_smollm2.md").read_text()


def test_the_split_is_the_recipes_chats_with_a_large_test_split(bench):
    """Every distinct paragraph is used, the test split has >= 1000 and shares none with training."""
    large = bench.data_module(False, 0).read_examples()
    sizes = {split: len(examples) for split, examples in large.items()}
    assert sizes["test"] >= 1000 and sizes["validation"] >= 96 and sizes["train"] >= 64 * bench.BATCH_SIZE
    tests = {example.messages[-2].content for example in large["test"]}
    assert not tests & {example.messages[-2].content for example in large["train"]}
    assert large["test"][0].messages[-1].content.startswith("#### ")


def test_a_diverged_run_gets_no_test_answer(bench):
    dm = bench.data_module(True, 0)
    dm.setup("fit")
    result = bench.nothing_right(dm, "test", 4)
    assert result["acc"] == 0.0 and result["predictions"] == [None] * 4 and len(result["labels"]) == 4


@pytest.mark.slow
def test_a_short_run_on_the_real_smollm2(bench):
    """Two LoRA-Pro steps on the packaged SmolLM2-135M-Instruct, evaluated on a few paragraphs: the chat template
    is the model's, the answers are read from generations. About 30 s on one core."""
    from lit_lowrank.backbones import gguf

    try:
        gguf.packaged_gguf()
    except FileNotFoundError:
        pytest.skip(f"the packaged SmolLM2 GGUF is not installed: {gguf.install_line()}")
    if importlib.util.find_spec("gguf") is None:
        pytest.skip(f"the gguf package is not installed: {gguf.install_line()}")
    spec = dict(method="lora_pro_efficient", lr=1e-3, seed=0, rank=8, steps=2, warmup=1, eval_every=0, threads=1,
                smoke=False, precision="bf16-mixed", val_paragraphs=2, test_paragraphs=4)
    result = bench.run_one(spec)
    assert result["steps"] == 2 and not result["diverged"] and result["final_val_loss"] > 0
    assert result["sizes"]["test"] >= 1000 and result["test_examples"] == 4
    assert set(result["test_labels"]) <= set(bench.data_module(False, 0).packages)  # '#### <package>' read back
    assert result["trainable_params"] == 2_442_240  # r=8 on q/k/v/o/gate/up/down of 30 blocks
    assert all(isinstance(text, str) for text in result["test_generations"])
