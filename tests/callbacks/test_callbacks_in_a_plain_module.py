"""The callbacks on a LightningModule written here (not one of ours), as a user's existing project would."""
import copy

import lightning as L
import pytest
import torch
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.loggers import CSVLogger
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from lit_lowrank import LoRAConfig, inject_lora, load_adapter
from lit_lowrank.adapters import lora_modules
from lit_lowrank.callbacks import AdapterExport, LoRAAdapters, LoRAProGradients, MetricsPlot, OptimizerStateMonitor
from lit_lowrank.optim import apply_lora_pro_

STEPS, CLIP = 6, 0.05


class PlainRegressor(L.LightningModule):
    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.body = nn.Sequential(nn.Linear(8, 16), nn.Tanh(), nn.Linear(16, 16), nn.Tanh())
        self.head = nn.Linear(16, 1)

    def forward(self, x):
        return self.head(self.body(x))

    def training_step(self, batch, batch_idx):
        loss = nn.functional.mse_loss(self(batch[0]), batch[1])
        self.log("train_loss", loss)
        return loss

    def validation_step(self, batch, batch_idx):
        self.log("val_loss", nn.functional.mse_loss(self(batch[0]), batch[1]))

    def configure_optimizers(self):
        return torch.optim.SGD([p for p in self.parameters() if p.requires_grad], lr=0.5, momentum=0.9)


def _data():
    generator = torch.Generator().manual_seed(1)
    x = torch.randn(48, 8, generator=generator)
    y = torch.sin(x.sum(dim=1, keepdim=True))
    return DataLoader(TensorDataset(x, y), batch_size=8)


CONFIG = LoRAConfig(r=2, alpha=4, target_modules="all-linear", modules_to_save=["head"])


def _manual_run(clip_after_rewrite: bool):
    """The same training in plain torch: rewrite, then clip (Lightning's order), then SGD."""
    module = inject_lora(PlainRegressor(), CONFIG)
    optimizer = module.configure_optimizers()
    for x, y in _data():
        optimizer.zero_grad()
        nn.functional.mse_loss(module(x), y).backward()
        if not clip_after_rewrite:
            torch.nn.utils.clip_grad_norm_(module.parameters(), CLIP)
        apply_lora_pro_(module)
        if clip_after_rewrite:
            torch.nn.utils.clip_grad_norm_(module.parameters(), CLIP)
        optimizer.step()
    return module


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    root = tmp_path_factory.mktemp("plain")
    module = PlainRegressor()
    pristine = copy.deepcopy(module)
    callbacks = [
        LoRAAdapters(CONFIG), LoRAProGradients(), OptimizerStateMonitor(every_n_steps=2),
        AdapterExport(dirpath=str(root / "adapters")), MetricsPlot(metrics=["train_loss", "val_loss"]),
        ModelCheckpoint(dirpath=root / "ckpt", monitor="val_loss", save_top_k=1),
    ]
    trainer = L.Trainer(max_steps=STEPS, accelerator="cpu", devices=1, logger=CSVLogger(root), callbacks=callbacks,
                        gradient_clip_val=CLIP, gradient_clip_algorithm="norm", log_every_n_steps=1,
                        limit_val_batches=2, val_check_interval=3, enable_progress_bar=False,
                        enable_model_summary=False)
    trainer.fit(module, train_dataloaders=_data(), val_dataloaders=_data())
    return module, pristine, callbacks, root


def test_adapters_injected_and_only_they_and_the_head_trained(trained):
    module, pristine, _, _ = trained
    assert [name for name, _ in lora_modules(module)] == ["body.0", "body.2"]
    torch.testing.assert_close(module.body[0].base_layer.weight, pristine.body[0].weight, rtol=0, atol=0)
    assert not torch.equal(module.head.weight, pristine.head.weight)
    assert module.body[2].lora_B.abs().sum() > 0


def test_rewrite_happens_before_clipping_exactly_as_a_manual_loop(trained):
    module = trained[0]
    expected, wrong_order = _manual_run(True), _manual_run(False)
    for name, param in module.named_parameters():
        torch.testing.assert_close(param, expected.get_parameter(name), rtol=1e-5, atol=1e-6)
    assert not torch.allclose(module.body[0].lora_B, wrong_order.body[0].lora_B, atol=1e-6)


def test_optimizer_state_bytes_are_exact(trained):
    module, _, callbacks, root = trained
    monitor = callbacks[2]
    trainable = sum(p.numel() for p in module.parameters() if p.requires_grad)
    assert monitor.last["optimizer/state_bytes"] == 4 * trainable  # SGD momentum: one fp32 buffer per parameter
    assert monitor.last["memory/peak_bytes"] > 10 * 2**20
    assert "optimizer/state_bytes" in next(root.rglob("metrics.csv")).read_text().splitlines()[0]


def test_adapter_export_best_and_final_reload(trained):
    module, pristine, callbacks, root = trained
    export = callbacks[3]
    assert sorted(export.exported) == ["best", "final"]
    restored = load_adapter(copy.deepcopy(pristine), export.exported["final"])
    x = torch.randn(5, 8)
    torch.testing.assert_close(restored(x), module(x))


def test_metrics_plot_is_a_png(trained):
    plot = trained[2][4]
    assert plot.path is not None and plot.path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_lora_pro_gradients_refuses_to_double_rewrite():
    from lit_lowrank.optim import LoRAPro

    module = inject_lora(PlainRegressor(), CONFIG)
    with pytest.raises(ValueError, match="second time"):
        LoRAProGradients().on_before_optimizer_step(None, module, LoRAPro(module, lr=0.1))


def test_lora_adapters_unknown_attribute():
    with pytest.raises(ValueError, match="children are \\['body', 'head'\\]"):
        LoRAAdapters(CONFIG, attribute="backbone").setup(None, PlainRegressor(), "fit")
