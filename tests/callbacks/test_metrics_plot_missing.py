"""MetricsPlot with metric names the module never logged: a warning naming them and the logged ones, never an
error that would stop the callbacks after it (AdapterExport's final adapter) at the end of a finished fit."""
import lightning as L
import pytest
import torch
from lightning.pytorch.loggers import CSVLogger
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from lit_lowrank import LoRAConfig, load_adapter
from lit_lowrank.callbacks import AdapterExport, LoRAAdapters, MetricsPlot


class LogsItsOwnNames(L.LightningModule):
    def __init__(self):
        super().__init__()
        self.net = nn.Sequential(nn.Linear(4, 8), nn.Tanh(), nn.Linear(8, 1))

    def training_step(self, batch, batch_idx):
        loss = nn.functional.mse_loss(self.net(batch[0]), batch[1])
        self.log("loss", loss)
        self.log("error", (self.net(batch[0]) - batch[1]).abs().mean())
        return loss

    def configure_optimizers(self):
        return torch.optim.SGD([p for p in self.parameters() if p.requires_grad], lr=0.1)


def _fit(root, plot):
    x = torch.randn(16, 4, generator=torch.Generator().manual_seed(0))
    export = AdapterExport(str(root / "adapter"))
    trainer = L.Trainer(max_steps=4, accelerator="cpu", devices=1, logger=CSVLogger(root), log_every_n_steps=1,
                        callbacks=[LoRAAdapters(LoRAConfig(r=2, target_modules=["net.0"])), plot, export],
                        enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False)
    module = LogsItsOwnNames()
    trainer.fit(module, DataLoader(TensorDataset(x, x.sum(dim=1, keepdim=True)), batch_size=4))
    return module, export


def test_default_names_never_logged_warn_and_the_final_adapter_is_still_written(tmp_path):
    plot = MetricsPlot()
    expected = (r"MetricsPlot: \['train/loss', 'val/loss', 'val/acc'\] were never logged in this run, so no plot "
                r"was drawn; the logged metrics are \['error', 'loss'\]\. HINT: .*"
                r"MetricsPlot\(metrics=\['loss', 'error'\]\)")
    with pytest.warns(UserWarning, match=expected):
        module, export = _fit(tmp_path, plot)
    assert plot.path is None and not list(tmp_path.rglob("*.png"))
    restored = load_adapter(LogsItsOwnNames(), export.exported["final"])  # written after the plot's turn
    assert restored.net[0].lora_B.abs().sum() > 0
    torch.testing.assert_close(restored.net[0].lora_B, module.net[0].lora_B)


def test_some_names_missing_draws_the_others_and_names_the_missing(tmp_path):
    plot = MetricsPlot(metrics=["loss", "val/acc"])
    with pytest.warns(UserWarning, match=r"\['val/acc'\] were never logged in this run, so drew \['loss'\] only"):
        _fit(tmp_path, plot)
    assert plot.path is not None and plot.path.read_bytes()[:4] == b"\x89PNG"
