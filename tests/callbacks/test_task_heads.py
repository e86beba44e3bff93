"""A head a task adds (fresh init) trains next to the adapters unless the user keeps it frozen."""
import copy
import logging

import lightning as L
import pytest
import torch
from tiny_models import tiny_bert, tiny_vit
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from lit_lowrank import LoRAConfig, inject_lora
from lit_lowrank.adapters import TASK_HEAD_NAMES, lora_modules
from lit_lowrank.callbacks import LoRAAdapters


class Classifier(L.LightningModule):
    """A user's own module around a transformers sequence classifier."""

    def __init__(self):
        super().__init__()
        self.model = tiny_bert(num_labels=3)

    def training_step(self, batch, batch_idx):
        return self.model(input_ids=batch[0], labels=batch[1]).loss

    def configure_optimizers(self):
        return torch.optim.AdamW([p for p in self.parameters() if p.requires_grad], lr=1e-2)


def _fit(module, config):
    data = DataLoader(TensorDataset(torch.randint(3, 128, (8, 10)), torch.randint(0, 3, (8,))), batch_size=4)
    trainer = L.Trainer(max_steps=2, accelerator="cpu", devices=1, logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False,
                        callbacks=[LoRAAdapters(config, attribute="model")])
    trainer.fit(module, train_dataloaders=data)


def test_callbacks_route_trains_the_new_classifier_and_says_so(caplog):
    caplog.set_level(logging.INFO)
    module = Classifier()
    before = copy.deepcopy(module.model.classifier)
    _fit(module, LoRAConfig(r=2, target_modules="all-linear"))
    assert module.model.classifier.weight.requires_grad
    assert not torch.equal(module.model.classifier.weight, before.weight), "the random head must learn"
    assert not module.model.bert.embeddings.word_embeddings.weight.requires_grad
    assert "task heads ['classifier'] are trained fully" in caplog.text


def test_empty_modules_to_save_keeps_the_head_frozen():
    module = Classifier()
    before = copy.deepcopy(module.model.classifier)
    _fit(module, LoRAConfig(r=2, target_modules="all-linear", modules_to_save=[]))
    assert not module.model.classifier.weight.requires_grad
    assert torch.equal(module.model.classifier.weight, before.weight)
    assert module.model.bert.encoder.layer[0].attention.self.query.lora_B.abs().sum() > 0


def test_timm_head_trains_and_an_adapted_head_is_not_also_trained_fully():
    vit = inject_lora(tiny_vit(), LoRAConfig(r=2, target_modules=["qkv"]))
    assert {n for n, p in vit.named_parameters() if p.requires_grad and "lora" not in n} == {"head.weight", "head.bias"}
    adapted = inject_lora(tiny_vit(), LoRAConfig(r=2, target_modules=["qkv", "head"]))
    assert "head" in dict(lora_modules(adapted))
    assert not adapted.head.base_layer.weight.requires_grad


def test_one_list_of_task_heads_and_causal_lm_head_is_not_one():
    assert TASK_HEAD_NAMES == ("classifier", "score", "head") and "lm_head" not in TASK_HEAD_NAMES
    net = nn.Sequential()
    net.body, net.lm_head = nn.Linear(4, 4), nn.Linear(4, 8)
    inject_lora(net, LoRAConfig(r=2))
    assert not net.lm_head.weight.requires_grad


def test_modules_to_save_as_a_string_is_refused():
    with pytest.raises(ValueError, match=r"modules_to_save must be a list.*HINT: write \['classifier'\]"):
        LoRAConfig(modules_to_save="classifier")
