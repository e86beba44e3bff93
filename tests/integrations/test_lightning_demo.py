"""The callbacks on Lightning's own demo transformer (lightning.pytorch.demos), left exactly as Lightning ships it:
nn.Transformer's attention and linear layers get adapters, which train, export and reload."""
import copy
import re
from pathlib import Path

import lightning as L
import pytest
import torch
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.demos import LightningTransformer, WikiText2
from lightning.pytorch.loggers import CSVLogger
from torch.utils.data import DataLoader

from lit_lowrank import LoRAConfig, load_adapter
from lit_lowrank.adapters import lora_modules
from lit_lowrank.callbacks import AdapterExport, LoRAAdapters, LoRAProGradients, MetricsPlot, OptimizerStateMonitor
from lit_lowrank.optim import lora_pro_gradients

STEPS = 4
WATCHED = ("transformer.encoder.layers.0.self_attn.q_proj", "transformer.decoder.layers.1.linear2")


class AdapterGradients(Callback):
    """(A, B, grad A, grad B) of the watched adapters at the last step, as this callback's turn sees them."""

    def __init__(self):
        self.seen = {}

    def on_before_optimizer_step(self, trainer, pl_module, optimizer):
        if trainer.global_step == STEPS - 1:
            adapters = dict(lora_modules(pl_module.model))
            self.seen = {name: [t.detach().clone() for t in (adapters[name].lora_A, adapters[name].lora_B,
                                                               adapters[name].lora_A.grad, adapters[name].lora_B.grad)]
                         for name in WATCHED}


@pytest.fixture(scope="module")
def fitted(tmp_path_factory):
    root = tmp_path_factory.mktemp("demo")
    # The demo reads ./data/wikitext-2.txt: a small local text instead of its download.
    (root / "data").mkdir()
    words = [f"w{(7 * i) % 23}" for i in range(700)]
    (root / "data" / "wikitext-2.txt").write_text("\n".join(" ".join(words[i:i + 20]) for i in range(0, 700, 20)))
    with pytest.MonkeyPatch.context() as patch:
        patch.chdir(root)
        torch.manual_seed(0)
        module = LightningTransformer(vocab_size=WikiText2(download=False).vocab_size)
        pristine = copy.deepcopy(module)
        # Its prepare_data and train_dataloader ask for the `requests` package even when the file is there: the
        # same loader without the download, and no prepare_data, are the only changes.
        patch.setattr(module, "prepare_data", lambda: None)
        loader = DataLoader(WikiText2(download=False))
        before, after = AdapterGradients(), AdapterGradients()
        callbacks = [LoRAAdapters(LoRAConfig(r=4, alpha=8, target_modules="all-linear"), attribute="model"),
                     before, LoRAProGradients(), after, OptimizerStateMonitor(every_n_steps=1),
                     MetricsPlot(), AdapterExport(str(root / "adapter"))]
        trainer = L.Trainer(max_steps=STEPS, accelerator="cpu", devices=1, logger=CSVLogger(root),
                            callbacks=callbacks, log_every_n_steps=1, enable_checkpointing=False,
                            enable_progress_bar=False, enable_model_summary=False)
        with pytest.warns(UserWarning, match=r"MetricsPlot: \['train/loss', 'val/loss', 'val/acc'\] were never "
                                             r"logged.*optimizer/state_bytes.*HINT"):
            trainer.fit(module, train_dataloaders=loader)  # the demo's training_step and configure_optimizers
    return trainer, module, pristine, before, after, callbacks[-1]


def test_attention_and_linear_layers_got_adapters_that_trained(fitted):
    trainer, module, _, _, _, _ = fitted
    names = [name for name, _ in lora_modules(module.model)]
    assert trainer.global_step == STEPS
    assert {"transformer.encoder.layers.0.self_attn.v_proj", "transformer.decoder.layers.1.multihead_attn.out_proj",
            "transformer.encoder.layers.1.linear1"} <= set(names)
    assert all(adapter.lora_B.abs().sum() > 0 for _, adapter in lora_modules(module.model))
    assert all(not param.requires_grad for name, param in module.named_parameters() if "lora_" not in name)


def test_lora_pro_rewrote_the_gradients_of_a_module_it_never_saw(fitted):
    _, module, _, before, after, _ = fitted
    scaling = dict(lora_modules(module.model))[WATCHED[0]].scaling
    for name in WATCHED:
        A, B, grad_A, grad_B = before.seen[name]
        expected_A, expected_B = lora_pro_gradients(A, B, grad_A, grad_B, scaling=scaling)
        torch.testing.assert_close(after.seen[name][2], expected_A, rtol=1e-4, atol=1e-7)
        torch.testing.assert_close(after.seen[name][3], expected_B, rtol=1e-4, atol=1e-7)
        assert not torch.allclose(after.seen[name][3], grad_B)


def test_final_adapter_written_after_the_plot_warning_and_reloads_into_the_untouched_demo(fitted):
    _, module, pristine, _, _, export = fitted
    assert sorted(export.exported) == ["final"]
    restored = copy.deepcopy(pristine)
    load_adapter(restored.model, export.exported["final"])
    tokens = torch.randint(0, module.model.vocab_size, (2, 12), generator=torch.Generator().manual_seed(4))
    for network in (module, restored, pristine):
        network.eval()
    with torch.no_grad():
        torch.testing.assert_close(restored(tokens, tokens), module(tokens, tokens))
        assert not torch.allclose(pristine(tokens, tokens), module(tokens, tokens), atol=1e-4)


def test_optimizer_state_monitor_logged_into_the_csv(fitted):
    with open(f"{fitted[0].logger.log_dir}/metrics.csv") as metrics:
        assert "optimizer/state_bytes" in metrics.readline()


def _docs_example(heading):
    """The Python block under ``## heading`` in docs/integrations.md."""
    page = (Path(__file__).resolve().parents[2] / "docs" / "integrations.md").read_text()
    return re.search(rf"## {re.escape(heading)}\n.*?```python\n(.*?)```", page, re.S).group(1)


def test_the_docs_example_runs(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    namespace = {}
    exec(compile(_docs_example("Your own Lightning project"), "docs/integrations.md", "exec"), namespace)
    tokens = torch.randn(5, 16)
    torch.testing.assert_close(namespace["adapted"](tokens), namespace["module"].model(tokens))
    assert next(tmp_path.rglob("metrics.png")).is_file()
