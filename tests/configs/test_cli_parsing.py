"""What the command line means is what the user wrote: no abbreviated options (a typo is a two-line error with the
closest option), ``null`` at any depth is None, and callbacks that a later config drops are named."""
import pytest
import yaml
from cli_runs import CONFIGS, SHORT, override, tiny_quickstart

from lit_lowrank.cli import LowRankCLI

QUICKSTART = ["--config", str(CONFIGS / "quickstart.yaml")]


def parse_error(capsys, *args) -> list[str]:
    with pytest.raises(SystemExit) as done:
        LowRankCLI(args=["fit", *QUICKSTART, *args])
    assert done.value.code == 2
    return capsys.readouterr().err.strip().splitlines()


def printed_config(capsys, *args) -> dict:
    with pytest.raises(SystemExit) as done:
        LowRankCLI(args=["fit", *args, "--print_config"])
    captured = capsys.readouterr()
    assert done.value.code == 0, captured.err[-3000:]
    return yaml.safe_load(captured.out)


def test_an_abbreviated_option_is_refused_with_the_closest_one(capsys):
    lines = parse_error(capsys, "--trainer.max_step=5")
    assert lines[0] == ("error: unknown option --trainer.max_step=5; did you mean --trainer.max_steps? (options are "
                        "never abbreviated)")
    assert len(lines) == 2 and lines[1].startswith("HINT: `")


def test_a_misspelled_key_in_a_config_is_named_with_the_closest_one(tmp_path, capsys):
    lines = parse_error(capsys, *override(tmp_path, trainer={"max_step": 5}))
    assert lines[0] == "error: unknown key trainer.max_step in a --config; did you mean trainer.max_steps?"


def test_an_unknown_argument_of_a_nested_class_names_the_closest_and_its_help(capsys):
    lines = parse_error(capsys, "--model.init_args.lora.rr=4")
    assert lines[0] == "error: lit_lowrank.LoRAConfig has no argument 'rr'; did you mean 'r'?"
    assert lines[1].startswith("HINT: `") and lines[1].endswith(" fit --model.lora.help` lists its arguments.")
    lines = parse_error(capsys, "--model.init_args.backbone.init_args.nam_or_path=x")
    assert lines[0].endswith("has no argument 'nam_or_path'; did you mean 'name_or_path'?")
    assert lines[1].endswith(" fit --model.backbone.help transformers_backbone` lists its arguments.")


def test_null_two_class_paths_deep_is_none(tmp_path, capsys):
    named = override(tmp_path, backbone={"name_or_path": "some/model"})
    for given in (["--model.init_args.backbone.init_args.name_or_path=null"],
                  ["--model.backbone.name_or_path", "null"]):
        config = printed_config(capsys, *QUICKSTART, *named, *given)
        assert config["model"]["init_args"]["backbone"]["init_args"]["name_or_path"] is None, given


def test_null_inside_the_lora_dataclass_is_none(tmp_path, capsys):
    heads = override(tmp_path, model={"init_args": {"lora": {"modules_to_save": ["classifier"]}}})
    config = printed_config(capsys, *QUICKSTART, *heads, "--model.init_args.lora.modules_to_save=null")
    assert config["model"]["init_args"]["lora"]["modules_to_save"] is None
    assert config["model"]["init_args"]["lora"]["r"] == 8  # the rest of the dataclass is kept


EARLY_STOPPING = {"class_path": "lightning.pytorch.callbacks.EarlyStopping", "init_args": {"monitor": "val/loss"}}


def test_callbacks_a_later_config_drops_are_named(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    replacing = override(tmp_path, trainer={"callbacks": [EARLY_STOPPING]})
    with pytest.warns(UserWarning, match=r"sets trainer.callbacks, which replaces the list before it: ModelCheckpoint, "
                                         r"AdapterExport, MetricsPlot, OptimizerStateMonitor \(from .*quickstart.yaml"
                                         r"\) will not run. HINT: .*`callbacks\+:`"):
        LowRankCLI(args=[*tiny_quickstart(tmp_path), *replacing, *SHORT], run=False)


def test_callbacks_plus_adds_to_the_list_without_a_warning(tmp_path, monkeypatch, recwarn):
    monkeypatch.chdir(tmp_path)
    adding = override(tmp_path, trainer={"callbacks+": [EARLY_STOPPING]})
    cli = LowRankCLI(args=[*tiny_quickstart(tmp_path), *adding, *SHORT], run=False)
    names = [type(callback).__name__ for callback in cli.trainer.callbacks]
    assert {"AdapterExport", "MetricsPlot", "EarlyStopping"} <= set(names)
    assert not [w for w in recwarn if "replaces the list" in str(w.message)]
