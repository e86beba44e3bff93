"""Without a logger each run still gets its own folder: ``<default_root_dir>/version_<n>`` holds its config.yaml,
adapter export and checkpoints, and the next run does not overwrite them."""
from cli_runs import SHORT, override, tiny_quickstart

from lit_lowrank.cli import LowRankCLI

NO_LOGGER = ["--trainer.logger=false", "--test_after_fit=false"]
# the quickstart's callbacks without MetricsPlot, which reads the CSV log
CALLBACKS = {"trainer": {"callbacks": [
    {"class_path": "lightning.pytorch.callbacks.ModelCheckpoint", "init_args": {"monitor": "val/acc", "mode": "max"}},
    {"class_path": "lit_lowrank.callbacks.AdapterExport"}]}}


def test_runs_without_a_logger_do_not_overwrite_each_other(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    for version in (0, 1):
        cli = LowRankCLI(args=["fit", *tiny_quickstart(tmp_path), *override(tmp_path, **CALLBACKS), *SHORT, *NO_LOGGER])
        run = tmp_path / f"version_{version}"
        assert cli.trainer.log_dir == str(run)
        for artefact in ("config.yaml", "adapter/final/adapter_model.safetensors", "adapter/best/adapter_config.json"):
            assert (run / artefact).is_file(), artefact
        assert list((run / "checkpoints").glob("*.ckpt"))
    assert not (tmp_path / "config.yaml").exists() and not (tmp_path / "adapter").exists()


def test_default_root_dir_holds_the_numbered_runs(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    LowRankCLI(args=["fit", *tiny_quickstart(tmp_path), *override(tmp_path, **CALLBACKS), *SHORT, *NO_LOGGER,
                     "--trainer.default_root_dir=out"])
    assert (tmp_path / "out" / "version_0" / "config.yaml").is_file()
    assert (tmp_path / "out" / "version_0" / "adapter" / "final").is_dir()
