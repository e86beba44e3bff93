"""``--ckpt_path`` never drops the command's model settings silently: fit stops on a difference (a new learning
rate resumes with ``--resume_with_changed lr`` and then really trains with it); evaluation says which it used."""
from pathlib import Path

import lightning.fabric.plugins.io.torch_io as torch_io
import pytest
import torch
import yaml
from cli_runs import SHORT, tiny_quickstart

from lit_lowrank.cli import LowRankCLI
from lit_lowrank.cli.errors import CLIConfigError

OPTIMIZER = "--model.init_args.optimizer.init_args"
MORE_STEPS = ["--trainer.max_steps=4", "--trainer.max_epochs=3", "--test_after_fit=false"]


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A two-step quickstart run (LoRA-Pro efficient, lr 0.002, rank 8): its folder and best checkpoint."""
    tmp = tmp_path_factory.mktemp("resume")
    with pytest.MonkeyPatch.context() as patch:
        patch.chdir(tmp)
        cli = LowRankCLI(args=["fit", *tiny_quickstart(tmp), *SHORT, "--test_after_fit=false"])
    return tmp, str(tmp / cli.trainer.checkpoint_callback.best_model_path)


def _fit(tmp, monkeypatch, ckpt, *args):
    monkeypatch.chdir(tmp)
    return LowRankCLI(args=["fit", *tiny_quickstart(tmp), *SHORT, *MORE_STEPS, "--ckpt_path", ckpt, *args])


def test_changed_settings_stop_fit_and_are_listed(trained, monkeypatch):
    tmp, ckpt = trained
    with pytest.raises(CLIConfigError) as error:
        _fit(tmp, monkeypatch, ckpt, f"{OPTIMIZER}.mode=full", "--model.init_args.lora.init_args.r=4")
    message = str(error.value)
    assert "model.init_args.optimizer.init_args.mode: command 'full', checkpoint 'efficient'" in message
    assert "model.init_args.lora.r: command 4, checkpoint 8" in message
    assert "HINT:" in message and "--resume_with_changed" not in message  # neither can change on resume


def test_changed_optimizer_class_stops_fit(trained, monkeypatch):
    tmp, ckpt = trained
    with pytest.raises(CLIConfigError, match=r"optimizer.class_path: command 'torch.optim.AdamW'"):
        _fit(tmp, monkeypatch, ckpt, "--model.init_args.optimizer=torch.optim.AdamW")


def test_changed_lr_needs_the_opt_in(trained, monkeypatch):
    tmp, ckpt = trained
    expected = r"(?s)init_args.lr: command 0.01, checkpoint 0.002.*add --resume_with_changed lr"
    with pytest.raises(CLIConfigError, match=expected):
        _fit(tmp, monkeypatch, ckpt, f"{OPTIMIZER}.lr=0.01")


def test_opted_in_lr_is_the_rate_that_trains(trained, monkeypatch):
    tmp, ckpt = trained
    cli = _fit(tmp, monkeypatch, ckpt, f"{OPTIMIZER}.lr=0.01", "--resume_with_changed=lr")
    assert cli.trainer.global_step == 4
    # the restored optimizer and scheduler states held 0.002; resuming rescaled them to the command's rate
    groups = cli.trainer.optimizers[0].param_groups
    assert cli.trainer.lr_scheduler_configs[0].scheduler.base_lrs == pytest.approx([0.01] * len(groups))
    assert [group["initial_lr"] for group in groups] == pytest.approx([0.01] * len(groups))
    saved = yaml.safe_load((Path(cli.trainer.log_dir) / "config.yaml").read_text())
    assert saved["model"]["init_args"]["optimizer"]["init_args"]["lr"] == 0.01


def test_evaluating_a_checkpoint_says_it_uses_the_checkpoints_settings(trained, monkeypatch):
    tmp, ckpt = trained
    monkeypatch.chdir(tmp)
    with pytest.warns(UserWarning, match=r"model.init_args.lora.r: command 4, checkpoint 8"):
        cli = LowRankCLI(args=["test", *tiny_quickstart(tmp), *SHORT, "--ckpt_path", ckpt,
                               "--model.init_args.lora.init_args.r=4"])
    assert cli.model.lora.r == 8  # Lightning builds the model the checkpoint's weights fit


def test_arguments_the_checkpoint_predates_are_not_differences():
    from lit_lowrank.cli.resume import differences

    command = {"_class_path": "Task", "lr": 0.1, "gradient_checkpointing": False, "lora": {"r": 8}}
    older = {"_class_path": "Task", "lr": 0.1, "lora": {"r": 4}}
    assert differences(command, older) == {"model.init_args.lora.r": (8, 4)}


def test_the_checkpoint_is_read_once(trained, monkeypatch):
    # the CLI compares the checkpoint's settings with the command's, then Lightning restores from the same dict
    tmp, ckpt = trained
    reads, load, pl_load = [], torch.load, torch_io.pl_load

    def counting_load(f, *args, **kwargs):
        if isinstance(f, (str, Path)):  # pl_load (counted itself) passes an open file
            reads.append(str(f))
        return load(f, *args, **kwargs)

    monkeypatch.setattr(torch, "load", counting_load)
    monkeypatch.setattr(torch_io, "pl_load", lambda path, *a, **k: reads.append(str(path)) or pl_load(path, *a, **k))
    cli = _fit(tmp, monkeypatch, ckpt)
    assert cli.trainer.global_step == 4 and cli.resume is not None and cli.resume.checkpoint is None
    assert [read for read in reads if read.endswith(Path(ckpt).name)] == [ckpt]
