"""Every optimizer trains under 32-true, bf16-mixed, bf16-true and fp16 with a GradScaler; its state stays fp32."""
import functools

import lightning as L
import pytest
import torch
from lightning.pytorch.plugins import MixedPrecision
from torch.utils.data import DataLoader

from lit_lowrank import LoRAConfig, optim
from lit_lowrank.backbones import transformers_backbone
from lit_lowrank.tasks import CausalLMTask

TINY_LLAMA = dict(model_type="llama", hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                  num_key_value_heads=2, vocab_size=64, max_position_embeddings=64)
LORA = LoRAConfig(r=4, alpha=8, target_modules="default")
OPTIMIZERS = {
    "lora_pro_efficient": (LORA, functools.partial(optim.LoRAPro, lr=1e-2)),
    "lora_pro_full": (LORA, functools.partial(optim.LoRAPro, lr=1e-2, mode="full")),
    "lora_pre_adam": (None, functools.partial(optim.LoRAPreAdamW, lr=1e-2, rank=4)),
    "lora_pre_muon": (None, functools.partial(optim.LoRAPreMuon, lr=1e-2, rank=4)),
}


def _fp16_with_scaler():
    # Lightning turns precision="16-mixed" into bf16-mixed on CPU; the plugin keeps fp16 autocast + GradScaler.
    return MixedPrecision("16-mixed", "cpu", scaler=torch.amp.GradScaler("cpu", init_scale=2.0**8))


PRECISIONS = {"32-true": {}, "bf16-mixed": {"precision": "bf16-mixed"}, "bf16-true": {"precision": "bf16-true"},
              "16-mixed+GradScaler": {"plugins": [_fp16_with_scaler]}}


def _fit(optimizer_name: str, precision_name: str):
    lora, optimizer = OPTIMIZERS[optimizer_name]
    options = dict(PRECISIONS[precision_name])
    if "plugins" in options:
        options["plugins"] = [make() for make in options["plugins"]]
    L.seed_everything(0, verbose=False)
    task = CausalLMTask(transformers_backbone(config=TINY_LLAMA, tokenizer=False), lora=lora, optimizer=optimizer)
    tokens = torch.randint(0, 64, (12, 16), generator=torch.Generator().manual_seed(0))
    data = DataLoader([{"input_ids": t, "labels": t} for t in tokens], batch_size=4)
    trainer = L.Trainer(accelerator="cpu", devices=1, max_steps=3, logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False, **options)
    before = {n: p.detach().float().clone() for n, p in task.named_parameters() if p.requires_grad}
    trainer.fit(task, train_dataloaders=data)
    return task, trainer, before


@pytest.mark.parametrize("precision", sorted(PRECISIONS))
@pytest.mark.parametrize("optimizer_name", sorted(OPTIMIZERS))
def test_trains_with_fp32_state(optimizer_name, precision):
    task, trainer, before = _fit(optimizer_name, precision)
    trained = dict(task.named_parameters())
    assert all(torch.isfinite(p).all() for p in trained.values())
    assert any(not torch.equal(trained[n].detach().float(), value) for n, value in before.items()), "nothing trained"
    if precision == "bf16-true":
        assert {p.dtype for p in task.parameters()} == {torch.bfloat16}
    state = [v for s in trainer.optimizers[0].state.values() for v in s.values()
             if torch.is_tensor(v) and v.numel() > 1]
    assert state and {v.dtype for v in state} == {torch.float32}
