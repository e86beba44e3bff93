"""AdapterExport(merged=True) writes <dirpath>/merged at the end of fit: a transformers folder that reproduces the
trained model, next to the PEFT-format adapter."""
import lightning as L
import torch
from tiny_models import _tokens, tiny_llama
from torch.utils.data import DataLoader
from transformers import AutoModelForCausalLM

from lit_lowrank import LoRAConfig
from lit_lowrank.backbones import Backbone
from lit_lowrank.callbacks import AdapterExport
from lit_lowrank.tasks import CausalLMTask


def test_merged_export_at_the_end_of_fit(tmp_path):
    ids = _tokens(batch=8)
    batches = DataLoader([{"input_ids": row, "labels": row} for row in ids], batch_size=4)
    task = CausalLMTask(Backbone(tiny_llama(), ["q_proj", "v_proj"]), lora=LoRAConfig(r=4),
                        optimizer=lambda params: torch.optim.AdamW(params, lr=1e-2))
    with torch.no_grad():
        untrained = task.model.eval()(input_ids=ids).logits
    task.model.train()
    export = AdapterExport(str(tmp_path / "adapter"), merged=True)
    trainer = L.Trainer(accelerator="cpu", max_steps=2, logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False, callbacks=[export])
    trainer.fit(task, train_dataloaders=batches)

    assert sorted(export.exported) == ["final", "merged"]
    assert export.exported["merged"] == tmp_path / "adapter" / "merged"
    assert export.format_label("merged") == "merged model: transformers AutoModelFor....from_pretrained"
    plain = AutoModelForCausalLM.from_pretrained(export.exported["merged"]).eval()
    task.model.eval()
    with torch.no_grad():
        torch.testing.assert_close(plain(input_ids=ids).logits, task.model(input_ids=ids).logits, rtol=1e-5, atol=1e-5)
        assert not torch.allclose(plain(input_ids=ids).logits, untrained, atol=1e-3)  # the adapters did train
