"""A kill -9 during a checkpoint save leaves the previous checkpoints whole and ``fit --ckpt_path`` resumes from
them; the CLI saves through AtomicCheckpointIO unless a CheckpointIO is configured."""
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import lightning as L
import pytest
import torch
from cli_runs import SHORT, override, tiny_quickstart
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.demos.boring_classes import BoringModel
from lightning.pytorch.plugins import AsyncCheckpointIO, TorchCheckpointIO
from lightning.pytorch.strategies import SingleDeviceStrategy

from lit_lowrank.atomic import partial_siblings
from lit_lowrank.checkpoint_io import AtomicCheckpointIO, use_by_default
from lit_lowrank.cli import LowRankCLI

RUNNER = Path(__file__).with_name("paused_save_run.py")


def every_step(tmp: Path) -> list:
    """Fit arguments that keep the newest step's checkpoint and last.ckpt, both saved after every step."""
    checkpoint = {"class_path": "lightning.pytorch.callbacks.ModelCheckpoint",
                  "init_args": {"dirpath": str(tmp / "ckpts"), "filename": "{step}", "every_n_train_steps": 1,
                                "save_top_k": 1, "save_last": True}}
    callbacks = override(tmp, trainer={"callbacks": [checkpoint]})
    return [*tiny_quickstart(tmp), *callbacks, *SHORT, "--test_after_fit=false"]


def killed_while_overwriting_last_ckpt(tmp: Path) -> str:
    """Run fit in a process whose save of last.ckpt at step 2 (the second save of that step, after step=2.ckpt)
    stops half-way; SIGKILL it there. The path it was writing."""
    marker = tmp / "paused-at"
    with open(tmp / "run.log", "wb") as log:
        run = subprocess.Popen([sys.executable, str(RUNNER), "2", "2", str(marker), "fit", *every_step(tmp)], cwd=tmp,
                               stdout=log, stderr=subprocess.STDOUT, env={**os.environ, "HF_HUB_OFFLINE": "1"})
        try:
            deadline = time.monotonic() + 240
            while not marker.exists() and run.poll() is None and time.monotonic() < deadline:
                time.sleep(0.2)
        finally:
            run.send_signal(signal.SIGKILL)
            run.wait()
    assert marker.exists(), f"the save never paused:\n{(tmp / 'run.log').read_text()[-4000:]}"
    return marker.read_text()


def test_kill_while_overwriting_a_checkpoint_keeps_the_previous_one_and_resumes(tmp_path, monkeypatch):
    folder = tmp_path / "ckpts"
    writing = killed_while_overwriting_last_ckpt(tmp_path)
    # the half-written bytes went to a hidden file beside last.ckpt, never over it
    assert Path(writing).parent == folder and Path(writing).name.startswith(".last.ckpt.partial-"), writing
    assert partial_siblings(folder / "last.ckpt") == [Path(writing)]
    assert sorted(p.name for p in folder.glob("*.ckpt")) == ["last.ckpt", "step=2.ckpt"]
    assert torch.load(folder / "last.ckpt", weights_only=True, map_location="cpu")["global_step"] == 1

    monkeypatch.chdir(tmp_path)
    cli = LowRankCLI(args=["fit", *every_step(tmp_path), "--trainer.max_steps=3", "--trainer.max_epochs=2",
                           "--ckpt_path", str(folder / "last.ckpt")])
    assert isinstance(cli.trainer.strategy.checkpoint_io, AtomicCheckpointIO)
    assert cli.trainer.global_step == 3  # two steps after step 1
    assert torch.load(folder / "last.ckpt", weights_only=True, map_location="cpu")["global_step"] == 3
    # saving last.ckpt again removed what the killed save had left; step=2.ckpt is the killed run's own, whole (the
    # resumed run wrote its step 2 as step=2-v1.ckpt, Lightning never overwrites another run's file, then deleted it)
    assert sorted(p.name for p in folder.iterdir()) == ["last.ckpt", "step=2.ckpt", "step=3.ckpt"]


def test_a_save_failing_half_way_keeps_the_previous_top_k_checkpoint(tmp_path, monkeypatch):
    # ModelCheckpoint deletes the checkpoint it replaces only after the new one is saved: a failed save (disk full)
    # leaves the previous one, whole, and no file under the new name
    save = torch.save

    def disk_full_at_step_2(obj, f, *args, **kwargs):
        if obj.get("global_step") == 2:
            Path(f).write_bytes(b"PK\x03\x04 half")
            raise OSError(28, "No space left on device")
        return save(obj, f, *args, **kwargs)

    monkeypatch.setattr(torch, "save", disk_full_at_step_2)
    checkpoint = ModelCheckpoint(tmp_path, "{step}", every_n_train_steps=1, save_top_k=1)
    trainer = _trainer(max_steps=3, limit_val_batches=0, callbacks=[checkpoint], plugins=[AtomicCheckpointIO()])
    with pytest.raises(OSError, match="No space left"):
        trainer.fit(BoringModel())
    assert [p.name for p in tmp_path.iterdir()] == ["step=1.ckpt"]
    assert torch.load(tmp_path / "step=1.ckpt", weights_only=True)["global_step"] == 1


def test_a_failing_save_leaves_the_previous_file_and_no_partial(tmp_path):
    path = tmp_path / "last.ckpt"
    io = AtomicCheckpointIO()
    io.save_checkpoint({"global_step": 1}, path)
    with pytest.raises(Exception, match="pickle"):
        io.save_checkpoint({"global_step": 2, "unsaveable": lambda: None}, path)
    assert io.load_checkpoint(path)["global_step"] == 1
    assert list(tmp_path.iterdir()) == [path]


class OwnCheckpointIO(TorchCheckpointIO):
    """A user's CheckpointIO (or a strategy's own kind, as XLA's)."""


class StrategyWithItsOwnIO(SingleDeviceStrategy):
    @property
    def checkpoint_io(self):
        return self._checkpoint_io or OwnCheckpointIO()

    @checkpoint_io.setter
    def checkpoint_io(self, io) -> None:
        self._checkpoint_io = io


def _trainer(**kwargs) -> L.Trainer:
    return L.Trainer(accelerator="cpu", logger=False, enable_progress_bar=False, **kwargs)


def test_only_an_unchosen_default_is_replaced():
    default = _trainer().strategy
    assert use_by_default(default) and type(default.checkpoint_io) is AtomicCheckpointIO
    for chosen in (OwnCheckpointIO(), TorchCheckpointIO()):  # a plugin the user configured stays, even Lightning's
        strategy = _trainer(plugins=[chosen]).strategy
        assert not use_by_default(strategy) and strategy.checkpoint_io is chosen
    wrapper = _trainer(plugins=[AsyncCheckpointIO()]).strategy
    assert use_by_default(wrapper) and type(wrapper.checkpoint_io.checkpoint_io) is AtomicCheckpointIO
    own = StrategyWithItsOwnIO(device=torch.device("cpu"))
    assert not use_by_default(own) and type(own.checkpoint_io) is OwnCheckpointIO


def test_cli_keeps_a_configured_checkpoint_io(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    plugin = "--trainer.plugins=lightning.pytorch.plugins.TorchCheckpointIO"
    cli = LowRankCLI(args=[*tiny_quickstart(tmp_path), *SHORT, plugin], run=False)
    assert type(cli.trainer.strategy.checkpoint_io) is TorchCheckpointIO
