"""MetricsPlot never crashes a finished fit: without a CSV log it says so before training and draws nothing."""
import lightning as L
import pytest
import torch
from lightning.pytorch.loggers import CSVLogger
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from lit_lowrank.callbacks import MetricsPlot


class Tiny(L.LightningModule):
    def __init__(self):
        super().__init__()
        self.layer = nn.Linear(4, 1)

    def training_step(self, batch, batch_idx):
        loss = nn.functional.mse_loss(self.layer(batch[0]), batch[1])
        self.log("train/loss", loss)
        return loss

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.1)


def _fit(tmp_path, logger, steps=2, log_every=1):
    data = DataLoader(TensorDataset(torch.randn(8, 4), torch.randn(8, 1)), batch_size=4)
    plot = MetricsPlot(metrics=["train/loss"])
    trainer = L.Trainer(max_steps=steps, logger=logger, callbacks=[plot], default_root_dir=tmp_path,
                        log_every_n_steps=log_every, enable_checkpointing=False, enable_progress_bar=False,
                        enable_model_summary=False)
    trainer.fit(Tiny(), data)
    return plot


def test_without_a_csv_logger_it_warns_before_training_and_draws_nothing(tmp_path):
    with pytest.warns(UserWarning, match="no CSVLogger.*HINT"):
        plot = _fit(tmp_path, logger=False)
    assert plot.path is None


def test_with_a_csv_logger_it_draws(tmp_path):
    plot = _fit(tmp_path, logger=CSVLogger(tmp_path))
    assert plot.path is not None and plot.path.stat().st_size > 0
