"""The DataModules as Lightning and LightningCLI use them: YAML/--help from signatures, and a real Trainer loop."""
import pytest
import torch
from jsonargparse import ArgumentParser
from lightning.pytorch import LightningModule, Trainer

from lit_lowrank import data

DATAMODULES = [data.TextBlocksDataModule, data.TextClassificationDataModule, data.DocstringClassificationDataModule,
               data.DigitsDataModule, data.ImageFolderDataModule, data.ImageTextDataModule]


@pytest.mark.parametrize("cls", DATAMODULES, ids=lambda c: c.__name__)
def test_cli_builds_arguments_and_help_from_the_signature(cls, capsys):
    parser = ArgumentParser(exit_on_error=False)
    parser.add_class_arguments(cls, "data")
    with pytest.raises(SystemExit):
        parser.parse_args(["--help"])
    help_text = capsys.readouterr().out
    assert "--data.batch_size" in help_text and "--data.seed" in help_text
    assert "examples per batch" in help_text or "per batch" in help_text  # Args: descriptions reach --help
    for name in ("batch_size", "num_workers", "seed"):
        assert name in parser.get_defaults()["data"]


def test_cli_instantiates_from_yaml_values():
    parser = ArgumentParser(exit_on_error=False)
    parser.add_class_arguments(data.DigitsDataModule, "data")
    config = parser.parse_args(["--data.image_size=16", "--data.train_per_class=3", "--data.mean=[0.5,0.5,0.5]"])
    dm = parser.instantiate_classes(config).data
    assert isinstance(dm, data.DigitsDataModule) and dm.image_size == 16 and dm.mean == (0.5, 0.5, 0.5)
    assert dm.hparams["train_per_class"] == 3


class _Probe(LightningModule):
    """Checks every batch it sees has the documented keys, and trains one parameter so fit runs."""

    def __init__(self, keys):
        super().__init__()
        self.keys, self.weight, self.seen = set(keys), torch.nn.Parameter(torch.zeros(1)), []

    def _check(self, batch):
        assert set(batch) == self.keys
        self.seen.append(len(next(iter(batch.values()))))

    def training_step(self, batch, batch_idx):
        self._check(batch)
        return self.weight.sum()

    def validation_step(self, batch, batch_idx):
        self._check(batch)

    def test_step(self, batch, batch_idx):
        self._check(batch)

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.1)


@pytest.mark.parametrize("make, keys", [
    (lambda: data.DigitsDataModule(image_size=16, batch_size=8), {"images", "labels"}),
    (lambda: data.DocstringClassificationDataModule(packages=["json", "http"], cap_per_class=20, batch_size=4),
     {"input_ids", "attention_mask", "token_type_ids", "labels"}),
], ids=["digits", "docstrings"])
def test_trainer_fit_and_test_consume_the_batches(make, keys):
    dm, probe = make(), _Probe(keys)
    trainer = Trainer(max_epochs=1, limit_train_batches=2, limit_val_batches=1, limit_test_batches=1, logger=False,
                      enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                      accelerator="cpu", num_sanity_val_steps=0)
    trainer.fit(probe, datamodule=dm)
    trainer.test(probe, datamodule=dm, verbose=False)
    assert len(probe.seen) == 4 and probe.weight.item() != 0.0
