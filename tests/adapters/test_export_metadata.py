"""adapter_config.json names the backbone actually loaded and PEFT's task type, so AutoPeftModel rebuilds it."""
import json
import logging

import pytest
import torch

peft = pytest.importorskip("peft")

from tiny_models import tiny_bert, tiny_clip, tiny_llama, tiny_vit  # noqa: E402

from lit_lowrank import LoRAConfig, inject_lora, save_adapter  # noqa: E402
from lit_lowrank.adapters import is_peft_loadable, peft_task_type  # noqa: E402
from lit_lowrank.backbones import minilm_path, transformers_backbone  # noqa: E402

HUB_DEFAULT = "HuggingFaceTB/SmolLM2-135M"  # what configs/llama_finetune_lora_pro.yaml names


def _perturb(model):
    with torch.no_grad():
        for param in model.parameters():
            if param.requires_grad:
                param.normal_(std=0.2)


@pytest.mark.parametrize("family, auto_class, peft_class, task_type", [
    ("bert", "AutoModelForSequenceClassification", "AutoPeftModelForSequenceClassification", "SEQ_CLS"),
    ("llama", "AutoModelForCausalLM", "AutoPeftModelForCausalLM", "CAUSAL_LM"),
])
def test_auto_peft_model_loads_an_export_of_a_local_backbone(tmp_path, caplog, family, auto_class, peft_class,
                                                             task_type):
    base_dir, adapter_dir = tmp_path / "base", tmp_path / "adapter"
    (tiny_bert() if family == "bert" else tiny_llama()).save_pretrained(base_dir)
    model = transformers_backbone(str(base_dir), auto_class=auto_class, tokenizer=False).model.eval()
    inject_lora(model, LoRAConfig(r=2, target_modules="all-linear"))
    _perturb(model)
    save_adapter(model, adapter_dir, base_model_name_or_path=HUB_DEFAULT)  # a recipe's stale default
    config = json.loads((adapter_dir / "adapter_config.json").read_text())
    assert config["base_model_name_or_path"] == str(base_dir) and config["task_type"] == task_type
    assert HUB_DEFAULT in caplog.text and "is not the model that was trained" in caplog.text
    restored = getattr(peft, peft_class).from_pretrained(str(adapter_dir)).eval()
    ids = torch.randint(3, 128, (2, 10))
    torch.testing.assert_close(restored(input_ids=ids).logits, model(input_ids=ids).logits, rtol=1e-5, atol=1e-5)


def test_bundled_minilm_export_names_its_folder_without_a_warning(tmp_path, caplog):
    caplog.set_level(logging.WARNING)
    backbone = transformers_backbone("sentence-transformers/all-MiniLM-L6-v2", tokenizer=False,
                                     auto_class="AutoModelForSequenceClassification", model_kwargs=dict(num_labels=3))
    inject_lora(backbone.model, LoRAConfig(r=2, target_modules=backbone.lora_targets))
    save_adapter(backbone.model, tmp_path, base_model_name_or_path="sentence-transformers/all-MiniLM-L6-v2")
    config = json.loads((tmp_path / "adapter_config.json").read_text())
    assert config["base_model_name_or_path"] == str(minilm_path()) and config["task_type"] == "SEQ_CLS"
    assert "not the model that was trained" not in caplog.text


def test_task_types_and_given_names_for_models_that_do_not_know_their_source(tmp_path):
    model = inject_lora(tiny_llama(), LoRAConfig(r=2))  # built from a config: the given name is all there is
    config = json.loads((save_adapter(model, tmp_path, base_model_name_or_path="my/llama")
                         / "adapter_config.json").read_text())
    assert config["base_model_name_or_path"] == "my/llama" and config["task_type"] == "CAUSAL_LM"
    from transformers import BertConfig, BertModel

    assert peft_task_type(BertModel(BertConfig(hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
                                               intermediate_size=32))) == "FEATURE_EXTRACTION"
    assert peft_task_type(tiny_vit()) is None and peft_task_type(tiny_clip()) is None
    sharded = tiny_llama()
    sharded.__class__ = type("FSDPLlamaForCausalLM", (type(sharded),), {})  # what FSDP2's fully_shard does
    assert peft_task_type(sharded) == "CAUSAL_LM"


@pytest.mark.parametrize("family, loadable", [("llama", True), ("vit", True), ("clip", False)])
def test_is_peft_loadable_tells_attention_adapters_apart(tmp_path, family, loadable):
    model = {"llama": tiny_llama, "vit": tiny_vit, "clip": tiny_clip}[family]()
    inject_lora(model, LoRAConfig(r=2))
    assert is_peft_loadable(save_adapter(model, tmp_path)) is loadable
