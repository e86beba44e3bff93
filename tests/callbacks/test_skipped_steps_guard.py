"""A fit whose optimizer keeps skipping non-finite gradients stops with an error instead of exiting 0; a few
skipped steps are counted, logged and survived."""
import csv

import lightning as L
import pytest
import torch
from lightning.pytorch.loggers import CSVLogger
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from lit_lowrank import LoRAConfig, inject_lora
from lit_lowrank.callbacks import OptimizerStateMonitor, SkippedStepsGuard
from lit_lowrank.optim import LoRAPreAdamW, LoRAPreMuon, LoRAPro
from lit_lowrank.tasks import LowRankTask


class NaNAtSteps(L.LightningModule):
    """A regressor whose gradients are NaN at the listed optimizer steps (a user's module, not one of ours)."""

    def __init__(self, optimizer: str, nan_steps):
        super().__init__()
        torch.manual_seed(0)
        self.net = nn.Sequential(nn.Linear(8, 16), nn.Tanh(), nn.Linear(16, 4))
        self.optimizer, self.nan_steps = optimizer, set(nan_steps)
        if optimizer == "lora_pro":
            inject_lora(self.net, LoRAConfig(r=2, target_modules="all-linear"))

    def training_step(self, batch, batch_idx):
        return nn.functional.mse_loss(self.net(batch[0]), batch[1])

    def on_after_backward(self):
        if self.global_step in self.nan_steps:
            for param in self.parameters():
                if param.grad is not None:
                    param.grad.fill_(float("nan"))

    def configure_optimizers(self):
        if self.optimizer == "lora_pro":
            return LoRAPro(self.net, lr=1e-2)
        optimizer_class = {"lora_pre_adam": LoRAPreAdamW, "lora_pre_muon": LoRAPreMuon}[self.optimizer]
        return optimizer_class(self.net.parameters(), lr=1e-2, rank=2)


def _fit(module, tmp_path, steps, callbacks):
    generator = torch.Generator().manual_seed(1)
    x = torch.randn(64, 8, generator=generator)
    data = DataLoader(TensorDataset(x, x[:, :4].cumsum(dim=1)), batch_size=4)
    trainer = L.Trainer(max_steps=steps, callbacks=callbacks, logger=CSVLogger(tmp_path), log_every_n_steps=1,
                        enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False)
    trainer.fit(module, data)
    return trainer


@pytest.mark.parametrize("optimizer", ["lora_pre_adam", "lora_pre_muon", "lora_pro"])
def test_consecutive_skipped_steps_stop_the_fit_with_a_clear_error(optimizer, tmp_path):
    module = NaNAtSteps(optimizer, nan_steps=range(3, 100))
    with pytest.raises(RuntimeError, match=r"non-finite \(NaN/inf\) gradients in 5 consecutive steps.*HINT"):
        _fit(module, tmp_path, 12, [SkippedStepsGuard(max_consecutive=5)])
    assert all(torch.isfinite(p).all() for p in module.parameters())


def test_a_few_skipped_steps_are_logged_and_the_fit_goes_on(tmp_path):
    module = NaNAtSteps("lora_pre_adam", nan_steps={2, 3, 6})
    trainer = _fit(module, tmp_path, 8, [SkippedStepsGuard(max_consecutive=3), OptimizerStateMonitor(every_n_steps=1)])
    assert trainer.global_step == 8 and trainer.optimizers[0].skipped_steps() == 3 * 4  # four tensors each time
    rows = list(csv.DictReader(open(next(tmp_path.rglob("metrics.csv")))))
    logged = [float(row["optimizer/skipped_steps"]) for row in rows if row.get("optimizer/skipped_steps")]
    assert logged[-1] == 12 and logged == sorted(logged)


def test_guard_rejects_a_bad_count():
    with pytest.raises(ValueError, match="max_consecutive must be an int >= 1"):
        SkippedStepsGuard(max_consecutive=0)


def test_tasks_add_the_guard_unless_the_trainer_has_one():
    class Stub:  # configure_callbacks only looks at the trainer's callbacks
        _trainer = None

    assert [type(c) for c in LowRankTask.configure_callbacks(Stub())] == [SkippedStepsGuard]
    stub = Stub()
    stub._trainer = stub.trainer = L.Trainer(callbacks=[SkippedStepsGuard(3)], logger=False)
    assert LowRankTask.configure_callbacks(stub) == []
