"""Every LoRA, backbone and data option is reachable from ``fit --help``: its end lists the nested help, and each
entry answers, with short names, for every part (a dataclass, a factory function, a data module)."""
import contextlib
import inspect
import io
import re

import pytest
from lightning.pytorch import LightningDataModule

import lit_lowrank.backbones as backbones
import lit_lowrank.data as data
from lit_lowrank import LoRAConfig
from lit_lowrank.cli import LowRankCLI


def named_parameters(target) -> list[str]:
    return [p.name for p in inspect.signature(target).parameters.values() if p.kind not in (p.VAR_POSITIONAL,
                                                                                                p.VAR_KEYWORD)]


def help_of(capsys, *args) -> str:
    with pytest.raises(SystemExit) as done:
        LowRankCLI(args=["fit", *args])
    captured = capsys.readouterr()
    assert done.value.code == 0, captured.err[-2000:]
    return captured.out


@pytest.fixture(scope="module")
def fit_help():
    out = io.StringIO()
    with contextlib.redirect_stdout(out), pytest.raises(SystemExit):
        LowRankCLI(args=["fit", "--help"])
    return out.getvalue()


def test_fit_help_ends_with_every_nested_help_and_each_answers(fit_help, capsys):
    assert len(fit_help.splitlines()[0]) < 120  # the usage line no longer repeats the ~50 options
    nested = fit_help[fit_help.index("Nested help"):]
    rows = re.findall(r"^  (--\S+\.help)(?: [A-Z]+)? +(\S+?)[,;:]", nested, flags=re.MULTILINE)
    assert {option for option, _ in rows} == {
        "--model.help", "--model.backbone.help", "--model.lora.help", "--model.optimizer.help",
        "--model.scheduler.help", "--data.help", "--trainer.callbacks.help", "--trainer.logger.help"}
    for option, first_name in rows:
        args = [option] if option == "--model.lora.help" else [option, first_name]
        assert "--" in help_of(capsys, *args), (option, first_name)


def test_lora_help_lists_every_lora_option_in_both_spellings(capsys):
    for option in ("--model.lora.help", "--model.init_args.lora.help"):
        text = help_of(capsys, option)
        for name in named_parameters(LoRAConfig):
            assert f"--model.lora.{name} " in text, (option, name)


@pytest.mark.parametrize("name", ["transformers_backbone", "timm_backbone", "open_clip_backbone"])
def test_backbone_factories_have_help_by_short_name_and_import_path(name, capsys):
    short = help_of(capsys, "--model.backbone.help", name)
    full = help_of(capsys, f"--model.init_args.backbone.help=lit_lowrank.backbones.{name}")
    assert short == full
    for parameter in named_parameters(getattr(backbones, name)):
        assert f"--model.backbone.{parameter} " in short, parameter


def test_backbone_help_without_a_name_lists_the_factories(capsys):
    text = help_of(capsys, "--model.backbone.help")
    assert all(f"class_path: lit_lowrank.backbones.{name}" in text
               for name in ("transformers_backbone", "timm_backbone", "open_clip_backbone"))


def test_every_data_module_has_help_by_short_name(capsys):
    modules = [name for name in data.__all__
               if inspect.isclass(getattr(data, name)) and issubclass(getattr(data, name), LightningDataModule)]
    assert "InstructionDataModule" in modules
    for name in modules:
        text = help_of(capsys, "--data.help", name)
        for parameter in named_parameters(getattr(data, name)):
            assert f"--data.{parameter} " in text, (name, parameter)


def test_an_unknown_name_says_where_the_choices_are(capsys):
    with pytest.raises(SystemExit) as done:
        LowRankCLI(args=["fit", "--model.backbone.help", "nope_backbone"])
    text = capsys.readouterr().err
    assert done.value.code == 2
    assert text.startswith("error: --model.backbone.help: 'nope_backbone' is not one of the choices")
    assert "--model.backbone.help` lists them" in text
