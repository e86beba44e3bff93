"""An error raised by a constructor while the CLI builds the model comes first, with the config key, not buried in
jsonargparse's nested "Does not validate against any of the Union subtypes"."""
import importlib.util
import os
import subprocess
import sys
from importlib import metadata

import pytest
from cli_runs import ROOT, SHORT, override, tiny_quickstart

from lit_lowrank.cli import LowRankCLI
from lit_lowrank.cli.errors import CLIConfigError

CASES = {
    "lora rank, command line": (["--model.init_args.lora.init_args.r=0"], "model.init_args.lora",
                                "LoRAConfig.r must be a positive integer"),
    "lora rank, YAML": ({"model": {"init_args": {"lora": {"r": 0}}}}, "model.init_args.lora",
                        "LoRAConfig.r must be a positive integer"),
    "backbone factory": ({"model": {"init_args": {"backbone": {"init_args": {"auto_class": "Nope"}}}}},
                         "model.init_args.backbone", "unknown transformers auto class 'Nope'"),
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_constructor_error_is_named_and_said_first(case, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    change, key, message = CASES[case]
    extra = change if isinstance(change, list) else override(tmp_path, **change)
    with pytest.raises(CLIConfigError) as error:
        LowRankCLI(args=[*tiny_quickstart(tmp_path), *extra, *SHORT], run=False)
    assert str(error.value).startswith(f"could not build {key}: ValueError: {message}")
    assert "Union subtypes" not in str(error.value)


def test_command_line_shows_the_message_before_any_traceback(tmp_path):
    result = subprocess.run([sys.executable, str(ROOT / "cli.py"), "fit", *tiny_quickstart(tmp_path),
                             "--model.init_args.lora.init_args.r=0"], cwd=tmp_path, capture_output=True, text=True,
                            timeout=300, env={**os.environ, "HF_HUB_OFFLINE": "1"})
    assert result.returncode == 2
    lines = [line for line in result.stderr.splitlines() if not line.startswith("Seed set")]
    assert lines[0] == ("error: could not build model.init_args.lora: ValueError: LoRAConfig.r must be a positive "
                        "integer, got 0"), result.stderr[-3000:]
    assert "Union subtypes" not in result.stderr and len(lines) < 12  # where it was raised, without jsonargparse


def test_a_logger_whose_package_is_missing_says_the_pip_install_first(tmp_path, monkeypatch):
    if importlib.util.find_spec("wandb") is not None:
        pytest.skip("wandb is installed here")
    monkeypatch.chdir(tmp_path)
    wandb = override(tmp_path, trainer={"logger": [{"class_path": "lightning.pytorch.loggers.WandbLogger"}]})
    with pytest.raises(CLIConfigError) as error:
        LowRankCLI(args=[*tiny_quickstart(tmp_path), *wandb, *SHORT], run=False)
    assert str(error.value) == (
        "could not build trainer.logger: lightning.pytorch.loggers.WandbLogger needs wandb>=0.12.10, which is not "
        "installed. HINT: pip install 'wandb>=0.12.10' (or the extra that provides it: pip install -e '.[wandb]' in "
        "the repository).")


def test_the_logger_extras_pin_what_lightning_requires():
    from lightning.pytorch.loggers import comet, mlflow, wandb

    installed = metadata.requires("lit_lowrank")  # the metadata the error message reads the extras from
    for extra, required in (("wandb", wandb._WANDB_AVAILABLE), ("mlflow", mlflow._MLFLOW_AVAILABLE),
                            ("comet", comet._COMET_AVAILABLE)):
        assert [r.split(";")[0].strip() for r in installed if f'extra == "{extra}"' in r] == [required.requirement]
