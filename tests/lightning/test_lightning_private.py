"""Each private Lightning API that lit_lowrank uses (all in lit_lowrank/cli/lightning_private.py) still behaves as
relied on: a Lightning release that renames or reorders one fails here, by name, instead of in a user's run."""
import lightning as L
from lightning.pytorch.cli import LightningCLI
from lightning.pytorch.demos.boring_classes import BoringDataModule, BoringModel
from lightning.pytorch.plugins import TorchCheckpointIO

from lit_lowrank.checkpoint_io import AtomicCheckpointIO
from lit_lowrank.cli.lightning_private import (
    CheckpointConfigHook,
    chosen_checkpoint_io,
    given_hyperparameters,
    set_default_root_dir,
)

SEEN = {}


class RecordsGivenHyperparameters(BoringModel):
    def __init__(self, width: int = 3) -> None:
        super().__init__()
        SEEN["given while built by LightningCLI"] = given_hyperparameters()


class RecordingCLI(CheckpointConfigHook, LightningCLI):
    def read_checkpoint_config(self) -> None:
        SEEN["config when the hook runs"] = self.config
        SEEN["model built before the hook"] = hasattr(self, "model")


def test_lightning_cli_calls_the_ckpt_path_hook_after_parsing_and_hands_modules_their_config(tmp_path):
    SEEN.clear()
    RecordingCLI(RecordsGivenHyperparameters, BoringDataModule, args=["--model.width=5"], run=False,
                 trainer_defaults={"default_root_dir": str(tmp_path), "logger": False})
    assert "config when the hook runs" in SEEN, "LightningCLI.__init__ no longer calls _parse_ckpt_path"
    assert SEEN["config when the hook runs"]["model"]["width"] == 5  # called after parsing ...
    assert SEEN["model built before the hook"] is False  # ... and before the classes are instantiated
    assert SEEN["given while built by LightningCLI"]["width"] == 5  # _given_hyperparameters
    assert given_hyperparameters() is None  # only while LightningCLI builds the module


def test_default_root_dir_can_be_moved_after_the_trainer_is_built(tmp_path):
    trainer = L.Trainer(logger=False, default_root_dir=str(tmp_path))
    set_default_root_dir(trainer, str(tmp_path / "version_0"))
    assert trainer.default_root_dir == str(tmp_path / "version_0") == trainer.log_dir


def test_the_chosen_checkpoint_io_is_none_until_someone_chooses_one():
    strategy = L.Trainer(logger=False).strategy
    assert chosen_checkpoint_io(strategy) is None
    assert type(strategy.checkpoint_io) is TorchCheckpointIO  # the public property creates the default ...
    assert chosen_checkpoint_io(strategy) is strategy.checkpoint_io  # ... in the same attribute
    plugin = AtomicCheckpointIO()
    assert chosen_checkpoint_io(L.Trainer(logger=False, plugins=[plugin]).strategy) is plugin

