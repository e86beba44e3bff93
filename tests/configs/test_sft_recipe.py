"""The offline instruction-tuning recipe runs cut down (a one-layer Llama, two steps per command): step 1
(configs/sft_base_pretrain.yaml) writes the base checkpoint, step 2 (configs/sft_docstring_lora_pro.yaml) starts from
it, reports test exact match before and after, and its checkpoint serves `cli.py test` and `cli.py predict`; the
pre-training recipe's checkpoint serves them too."""
import json

from cli_runs import CONFIGS, SHORT
from cli_runs import hf as _hf
from cli_runs import override as _override

from lit_lowrank.cli import LowRankCLI

TINY_LLAMA = {"model_type": "llama", "hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 1,
              "num_attention_heads": 2, "num_key_value_heads": 2, "vocab_size": 8192, "max_position_embeddings": 128,
              "tie_word_embeddings": True}
PRETRAIN, SFT = str(CONFIGS / "sft_base_pretrain.yaml"), str(CONFIGS / "sft_docstring_lora_pro.yaml")
# No --trainer.limit_predict_batches: jsonargparse may read "1" as the float 1.0, i.e. every batch (which depends on
# what was parsed before in the process), so the tests count the rows the data module actually has.
SHORT_RUN = list(SHORT)


def test_sft_recipe_runs_both_steps_then_test_and_predict(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)  # the recipes' relative runs/ paths land here
    base_args = ["--config", PRETRAIN,
                 *_override(tmp_path, _hf(TINY_LLAMA), {"max_train_blocks": 32, "max_val_blocks": 4}),
                 "--model.init_args.optimizer.init_args.rank=8"]  # below the tiny model's width
    LowRankCLI(args=["fit", *base_args, *SHORT_RUN])
    base = tmp_path / "runs" / "sft_base" / "checkpoints" / "base.ckpt"
    assert base.is_file()

    sft_args = ["--config", SFT, *_override(tmp_path, _hf(TINY_LLAMA), {"cap_per_class": 20, "batch_size": 4}),
                "--model.init_args.max_new_tokens=3"]
    capsys.readouterr()
    fit = LowRankCLI(args=["fit", *sft_args, *SHORT_RUN])
    printed = capsys.readouterr().out
    assert fit.trainer.global_step == 2
    assert "Test split before fine-tuning (initial weights):\n  test/exact_match" in printed
    assert "Test split, before fine-tuning -> after:\n  test/exact_match" in printed
    checkpoint = fit.trainer.checkpoint_callback
    assert checkpoint.monitor == "val/exact_match" and checkpoint.best_model_score is not None  # logged at validation
    assert fit.model.generation.answer_pattern == r"#\s*#\s*#\s*#\s*(\w+)"  # a '#' pattern survives the YAML parsing
    best = checkpoint.best_model_path

    tested = LowRankCLI(args=["test", *sft_args, *SHORT_RUN, "--ckpt_path", best])
    assert {"test/loss", "test/ppl", "test/exact_match"} <= set(tested.trainer.callback_metrics)
    capsys.readouterr()
    predicted = LowRankCLI(args=["predict", *sft_args, *SHORT_RUN, "--ckpt_path", best])
    (written,) = tmp_path.glob("runs/sft_docstring/version_*/generations.jsonl")
    rows = [json.loads(line) for line in written.read_text().splitlines()]
    expected = len(predicted.datamodule.predict_prompts)  # the test split's prompts
    assert len(rows) == expected > 0 and rows[0]["prompt"].startswith("Which standard-library package")
    assert rows[0]["reference"].startswith("#### ") and {"generation", "answer", "correct"} <= set(rows[0])
    assert f"Generations ({expected} rows) written to {written.resolve()}" in capsys.readouterr().out

    base_tested = LowRankCLI(args=["test", *base_args, *SHORT_RUN, "--ckpt_path", str(base)])
    assert "test/ppl" in base_tested.trainer.callback_metrics  # on the validation blocks, with a warning
    LowRankCLI(args=["predict", *base_args, *SHORT_RUN, "--ckpt_path", str(base)])
    (continued,) = tmp_path.glob("runs/sft_base/version_*/generations.jsonl")
    assert len(continued.read_text().splitlines()) == 4  # a continuation of each of the 4 validation blocks
