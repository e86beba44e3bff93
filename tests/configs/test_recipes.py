"""Every YAML recipe in configs/ loads and runs a couple of steps with a tiny backbone (and local data) override;
strategy and precision files compose with it as a second --config."""
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from cli_runs import CONFIGS, MINILM, ROOT, SHORT, TINY_BERT
from cli_runs import hf as _hf
from cli_runs import override as _override
from distributed_exit import finished
from PIL import Image
from sklearn.datasets import load_digits

from lit_lowrank.cli import LowRankCLI

TINY_LLAMA = {"model_type": "llama", "hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2,
              "num_attention_heads": 2, "num_key_value_heads": 2, "vocab_size": 30522, "max_position_embeddings": 512,
              "tie_word_embeddings": True}
TINY_VIT = {"pretrained": False, "img_size": 32,
            "model_kwargs": {"patch_size": 8, "embed_dim": 32, "depth": 2, "num_heads": 2}}


def _digit_files(root: Path) -> Path:
    """Digits as PNG files: an ImageFolder tree and an image-caption CSV."""
    digits = load_digits()
    names = ["zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine"]
    rows = ["image,caption,label"]
    for index in range(60):
        image = Image.fromarray((digits.images[index] * 16).astype("uint8")).convert("RGB")
        label = names[digits.target[index]]
        for split in ("train", "val"):
            path = root / "images" / split / label / f"{index}.png"
            path.parent.mkdir(parents=True, exist_ok=True)
            image.save(path)
        rows.append(f"images/train/{label}/{index}.png,a photo of the number {label},{label}")
    (root / "pairs.csv").write_text("\n".join(rows) + "\n")
    return root


def _labelled_csv(root: Path) -> Path:
    texts = ["the cat sat on the mat", "stocks fell sharply today", "a dog barked loudly", "markets rallied at close"]
    lines = ["text,label"] + [f"{text} {i},{i % 2}" for i, text in enumerate(texts * 5)]
    (root / "train.csv").write_text("\n".join(lines) + "\n")
    return root / "train.csv"


RECIPES = {
    "quickstart.yaml": lambda tmp: _override(tmp, _hf(TINY_BERT, MINILM), {"cap_per_class": 12}),
    "finetune_lora_pre.yaml": lambda tmp: _override(tmp, _hf(TINY_BERT, MINILM), {"cap_per_class": 12}),
    "minilm_classify_lora_pro.yaml": lambda tmp: _override(tmp, _hf(TINY_BERT, MINILM), {
        "train_file": str(_labelled_csv(tmp)), "batch_size": 8}),
    "pretrain_lora_pre.yaml": lambda tmp: _override(tmp, _hf(TINY_LLAMA), {
        "max_train_blocks": 32, "max_val_blocks": 4}),
    "llama_finetune_lora_pro.yaml": lambda tmp: _override(tmp, _hf(TINY_LLAMA, MINILM), {
        "block_size": 32, "max_train_blocks": 16, "max_val_blocks": 4}),
    "vit_classify_lora_pro.yaml": lambda tmp: _override(tmp, TINY_VIT, {
        "train_dir": str(_digit_files(tmp) / "images" / "train"), "val_dir": str(tmp / "images" / "val")}),
    "digits_vit_lora_pre_muon.yaml": lambda tmp: _override(tmp, {
        "model_kwargs": {"patch_size": 4, "embed_dim": 24, "depth": 1, "num_heads": 2}}),
    "clip_fewshot_lora_pro.yaml": lambda tmp: _override(tmp, {
        "name": None, "pretrained": None, "embed_dim": 16,
        "vision_cfg": {"image_size": 32, "patch_size": 8, "width": 32, "layers": 1, "head_width": 16},
        "text_cfg": {"context_length": 16, "width": 32, "heads": 2, "layers": 1}},
        {"train_per_class": 4, "batch_size": 16}),
}


#: Recipes whose model is built from a config (no tokenizer of its own): the data module names the tokenizer.
TOKENIZED_BY_THE_DATA = {"pretrain_lora_pre.yaml"}


def test_every_recipe_is_covered():
    # the instruction-tuning recipes run cut down in tests/configs/test_sft_recipe.py and test_smollm2_recipe.py
    assert sorted(p.name for p in CONFIGS.glob("*.yaml")) == sorted([*RECIPES, "sft_base_pretrain.yaml",
                                                                     "sft_docstring_lora_pro.yaml",
                                                                     "sft_smollm2_lora_pro.yaml"])


@pytest.mark.parametrize("name", sorted(RECIPES))
def test_recipe_runs_with_a_tiny_backbone(name, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    cli = LowRankCLI(args=["fit", "--config", str(CONFIGS / name), *RECIPES[name](tmp_path), *SHORT])
    assert cli.trainer.global_step == 2
    assert cli.trainer.callback_metrics, "nothing was logged"
    # the backbone decides: the data module read with its tokenizer and transformed images as it says
    data, task = cli.datamodule, cli.model
    if task.preprocess is not None:
        assert data.preprocessing == task.preprocess, "the recipe overrides the backbone's image preprocessing"
    if task.tokenizer is not None and hasattr(data, "tokenizer"):  # CLIP on digits: the task's prompts only
        assert data.tokenizer is task.tokenizer, "the recipe's data module does not use the backbone's tokenizer"
    assert task.preprocess is not None or task.tokenizer is not None or name in TOKENIZED_BY_THE_DATA


@pytest.mark.parametrize("precision", ["bf16-mixed", "bf16-true", "16-mixed"])
def test_precision_files_compose(precision, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    args = ["fit", "--config", str(CONFIGS / "quickstart.yaml"),
            "--config", str(CONFIGS / "precision" / f"{precision}.yaml"),
            *RECIPES["quickstart.yaml"](tmp_path), *SHORT]
    cli = LowRankCLI(args=args)
    expected = "bf16-mixed" if precision == "16-mixed" else precision  # Lightning: fp16 AMP is GPU-only
    assert cli.trainer.precision == expected and cli.trainer.global_step == 2


COMPOSABLE = sorted((CONFIGS / "strategy").glob("*.yaml")) + sorted((CONFIGS / "precision").glob("*.yaml"))


def _print_config(capsys, *configs: Path) -> dict:
    with pytest.raises(SystemExit) as exited:
        LowRankCLI(args=["fit", *[arg for c in configs for arg in ("--config", str(c))], "--print_config"])
    assert exited.value.code in (0, None), capsys.readouterr().err[-3000:]
    return yaml.safe_load(capsys.readouterr().out)


@pytest.mark.parametrize("path", COMPOSABLE, ids=lambda p: f"{p.parent.name}/{p.stem}")
def test_strategy_and_precision_files_parse_with_the_quickstart(path, capsys):
    printed = _print_config(capsys, CONFIGS / "quickstart.yaml", path)["trainer"]
    for key, value in yaml.safe_load(path.read_text())["trainer"].items():
        if isinstance(value, dict):  # a class: the printed config adds every default init_arg
            assert printed[key]["class_path"] == value["class_path"]
            for section in ("init_args", "dict_kwargs"):
                assert value.get(section, {}).items() <= printed[key].get(section, {}).items(), (key, section)
        else:
            assert printed[key] == value, key


def test_fsdp1_file_builds_lightnings_fsdp_strategy(capsys):
    from jsonargparse import ArgumentParser
    from lightning.pytorch.strategies import FSDPStrategy, Strategy
    from torch.distributed.fsdp import ShardingStrategy

    printed = _print_config(capsys, CONFIGS / "quickstart.yaml", CONFIGS / "strategy" / "fsdp1.yaml")
    parser = ArgumentParser(exit_on_error=False)
    parser.add_argument("--strategy", type=str | Strategy)
    strategy = parser.instantiate_classes(parser.parse_object({"strategy": printed["trainer"]["strategy"]})).strategy
    assert type(strategy) is FSDPStrategy and printed["trainer"]["accelerator"] == "gpu"
    assert strategy.kwargs["use_orig_params"] is True and strategy.sharding_strategy == ShardingStrategy.FULL_SHARD


@pytest.mark.slow
@pytest.mark.parametrize("strategy", ["ddp", "fsdp"])
def test_strategy_files_compose_end_to_end(strategy, tmp_path):
    # 64 blocks: 2 batches of 16 on each of the 2 ranks
    args = [sys.executable, str(ROOT / "cli.py"), "fit", "--config", str(CONFIGS / "pretrain_lora_pre.yaml"),
            "--config", str(CONFIGS / "strategy" / f"{strategy}.yaml"),
            *_override(tmp_path, _hf(TINY_LLAMA), {"max_train_blocks": 64, "max_val_blocks": 4}),
            *[a for a in SHORT if not a.startswith("--trainer.devices")]]
    result = subprocess.run(args, cwd=tmp_path, capture_output=True, text=True, timeout=600)
    assert finished(result), result.stderr[-5000:]
    assert "max_steps=2` reached" in result.stderr + result.stdout


def test_print_config_and_help(capsys):
    with pytest.raises(SystemExit):
        LowRankCLI(args=["fit", "--config", str(CONFIGS / "quickstart.yaml"), "--print_config"])
    printed = capsys.readouterr().out
    assert "class_path: lit_lowrank.tasks.SequenceClassificationTask" in printed and "mode: efficient" in printed
    with pytest.raises(SystemExit):
        LowRankCLI(args=["fit", "--model.help", "lit_lowrank.tasks.CausalLMTask"])
    help_text = capsys.readouterr().out
    assert "adapters to inject" in help_text  # argument help comes from the docstrings


def test_console_script_is_the_same_cli():
    from importlib.metadata import entry_points

    (script,) = [e for e in entry_points(group="console_scripts") if e.name == "lit-lowrank"]
    assert script.value == "lit_lowrank.cli:main"
    result = subprocess.run([sys.executable, "-m", "lit_lowrank.cli", "fit", "--help"], capture_output=True, text=True,
                            timeout=300)
    assert result.returncode == 0 and "--test_after_fit" in result.stdout


def test_a_finished_run_destroys_its_process_group(tmp_path, monkeypatch):
    # Left to interpreter exit, gloo's threads can abort a finished DDP run (exit -6): main() closes the group.
    import torch.distributed as dist

    import lit_lowrank.cli.entry as cli

    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'store'}", rank=0, world_size=1)
    monkeypatch.setattr(cli, "LowRankCLI", lambda args: None)  # a run that finished
    cli.main(["fit"])
    assert not dist.is_initialized()
    cli.close_process_group()  # nothing to close: a no-op
