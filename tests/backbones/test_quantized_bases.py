"""QLoRA: transformers_backbone(quantization_config=...) loads a bitsandbytes 4/8-bit base; LoRA (AdamW), LoRA-Pro
efficient and LoRA-Pro full train its adapters while the quantized weights stay as loaded; a Lightning fit with
gradient checkpointing saves trainable-only checkpoints that load onto a re-quantized base, and exports a merged,
dequantized model. Skipped, with the error, where bitsandbytes' layers cannot run."""
import functools

import lightning as L
import pytest
import torch
from bnb_support import QUANTIZED_HIDDEN, matmul_tolerance, require_bnb
from tiny_models import _tokens, tiny_llama
from torch.utils.data import DataLoader
from transformers import AutoModelForSequenceClassification, LlamaConfig, LlamaForSequenceClassification

from lit_lowrank import LoRAConfig
from lit_lowrank.backbones import transformers_backbone
from lit_lowrank.callbacks import AdapterExport
from lit_lowrank.optim import LoRAPro
from lit_lowrank.tasks import CausalLMTask, SequenceClassificationTask
from lit_lowrank.tasks.frozen_base import FROZEN_BASE_KEY

QUANTIZED = {4: {"load_in_4bit": True, "bnb_4bit_quant_type": "nf4", "bnb_4bit_compute_dtype": "float32"},
             8: {"load_in_8bit": True}}
METHODS = {"lora_adamw": functools.partial(torch.optim.AdamW, lr=1e-2),
           "lora_pro_efficient": functools.partial(LoRAPro, lr=1e-2, mode="efficient"),
           "lora_pro_full": functools.partial(LoRAPro, lr=1e-2, mode="full")}


def quantized_state(model) -> dict:
    return {name: tensor.clone() for name, tensor in model.state_dict().items() if not tensor.is_floating_point()}


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("bits", [4, 8])
def test_lora_methods_train_the_adapters_of_a_quantized_base(tmp_path, bits, method):
    require_bnb(bits)
    tiny_llama().save_pretrained(tmp_path)
    backbone = transformers_backbone(str(tmp_path), tokenizer=False, quantization_config=QUANTIZED[bits])
    task = CausalLMTask(backbone, lora=LoRAConfig(r=4, target_modules="default"), optimizer=METHODS[method])
    layer = task.model.model.layers[0].self_attn.q_proj.base_layer
    assert type(layer).__name__ == ("Linear4bit" if bits == 4 else "Linear8bitLt")
    frozen = quantized_state(task.model)
    assert frozen  # packed 4-bit / int8 weights
    optimizer = task.configure_optimizers()
    ids = _tokens()
    losses = []
    for _ in range(3):
        optimizer.zero_grad()
        loss = task.training_step({"input_ids": ids, "labels": ids}, 0)
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    assert losses[2] < losses[0]
    for name, tensor in quantized_state(task.model).items():
        assert torch.equal(tensor, frozen[name]), name
    assert all(p.dtype == torch.float32 for n, p in task.model.named_parameters() if "lora_" in n)


@pytest.mark.parametrize("bits", [4, 8])
def test_qlora_fit_checkpoint_and_merged_export(tmp_path, bits):
    require_bnb(bits)
    config = LlamaConfig(hidden_size=QUANTIZED_HIDDEN, intermediate_size=2 * QUANTIZED_HIDDEN, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, vocab_size=128, pad_token_id=0, num_labels=3)
    LlamaForSequenceClassification(config).save_pretrained(tmp_path / "base")

    def backbone():  # quantized again from the saved weights, as a rebuilt run does
        return transformers_backbone(str(tmp_path / "base"), auto_class="AutoModelForSequenceClassification",
                                     tokenizer=False, quantization_config=QUANTIZED[bits])

    lora = LoRAConfig(r=4, target_modules="default")
    trained = SequenceClassificationTask(backbone(), lora=lora, optimizer=METHODS["lora_pro_full"],
                                         gradient_checkpointing=True)
    ids = _tokens(batch=8)
    rows = [{"input_ids": row, "labels": torch.tensor(i % 3)} for i, row in enumerate(ids)]
    export = AdapterExport(str(tmp_path / "export"), merged=True)
    trainer = L.Trainer(accelerator="cpu", max_steps=2, logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False, callbacks=[export])
    trainer.fit(trained, train_dataloaders=DataLoader(rows, batch_size=4))
    trainer.save_checkpoint(tmp_path / "run.ckpt")

    checkpoint = torch.load(tmp_path / "run.ckpt", weights_only=True)
    assert FROZEN_BASE_KEY in checkpoint
    assert all("lora_" in key or ".score." in key for key in checkpoint["state_dict"])
    loaded = SequenceClassificationTask.load_from_checkpoint(tmp_path / "run.ckpt", backbone=backbone(), lora=lora,
                                                             optimizer=METHODS["lora_pro_full"])
    for name, value in checkpoint["state_dict"].items():
        assert torch.equal(loaded.state_dict()[name], value), name

    plain = AutoModelForSequenceClassification.from_pretrained(export.exported["merged"]).eval()
    trained.model.eval()
    with torch.no_grad():
        tolerance = matmul_tolerance(bits)  # the quantized model's own matmul rounding
        torch.testing.assert_close(plain(input_ids=ids).logits, trained.model(input_ids=ids).logits,
                                   rtol=tolerance, atol=tolerance)


def test_quantization_needs_pretrained_weights_and_known_fields(tmp_path):
    with pytest.raises(ValueError, match="needs pretrained weights.*HINT: save_pretrained"):
        transformers_backbone(config=dict(model_type="llama", hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                                          num_attention_heads=2, vocab_size=50),
                              quantization_config={"load_in_4bit": True})
    with pytest.raises(ValueError, match=r"unknown entries \['load_in_4bits'\].*HINT"):
        transformers_backbone(str(tmp_path), quantization_config={"load_in_4bits": True})
    with pytest.raises(ValueError, match="neither load_in_4bit nor load_in_8bit is true"):
        transformers_backbone(str(tmp_path), quantization_config={"bnb_4bit_quant_type": "nf4"})


@pytest.mark.parametrize("bits", [4, 8])
def test_merge_lora_on_a_quantized_base_says_to_use_export_merged(tmp_path, bits):
    require_bnb(bits)
    from lit_lowrank import merge_lora

    tiny_llama().save_pretrained(tmp_path)
    backbone = transformers_backbone(str(tmp_path), tokenizer=False, quantization_config=QUANTIZED[bits])
    task = CausalLMTask(backbone, lora=LoRAConfig(r=4, target_modules="default"))
    before = quantized_state(task.model)
    with pytest.raises(ValueError, match="quantized.*HINT: lit_lowrank.export_merged"):
        merge_lora(task.model)
    after = quantized_state(task.model)
    assert before.keys() == after.keys() and all(torch.equal(before[k], after[k]) for k in before)
