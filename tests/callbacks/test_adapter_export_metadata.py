"""AdapterExport writes the backbone actually loaded, and the run summary only says "PEFT format" when it is."""
import json
from types import SimpleNamespace

import lightning as L
import pytest
from tiny_models import tiny_clip, tiny_llama

from lit_lowrank import LoRAConfig, inject_lora
from lit_lowrank.backbones import transformers_backbone
from lit_lowrank.callbacks import AdapterExport
from lit_lowrank.cli import print_summary

TRAINER = SimpleNamespace(is_global_zero=True, loggers=[], checkpoint_callback=None, callback_metrics={})


class Wrapper(L.LightningModule):
    def __init__(self, model):
        super().__init__()
        self.model = model


def test_stale_recipe_default_is_replaced_by_the_local_folder_loaded(tmp_path):
    tiny_llama().save_pretrained(tmp_path / "base")
    model = transformers_backbone(str(tmp_path / "base"), tokenizer=False).model
    module = Wrapper(inject_lora(model, LoRAConfig(r=2)))
    export = AdapterExport(str(tmp_path / "adapters"), base_model_name_or_path="HuggingFaceTB/SmolLM2-135M")
    config = json.loads((export.export(TRAINER, module, "final") / "adapter_config.json").read_text())
    assert config["base_model_name_or_path"] == str(tmp_path / "base") and config["task_type"] == "CAUSAL_LM"


@pytest.mark.parametrize("family, label", [("llama", "(PEFT format)"), ("clip", "load with lit_lowrank.load_adapter")])
def test_summary_names_the_format_that_was_written(tmp_path, capsys, family, label):
    module = Wrapper(inject_lora(tiny_llama() if family == "llama" else tiny_clip(), LoRAConfig(r=2)))
    export = AdapterExport(str(tmp_path))
    export.export(TRAINER, module, "final")
    print_summary(SimpleNamespace(**vars(TRAINER), callbacks=[export]), None, {})
    line = next(line for line in capsys.readouterr().out.splitlines() if "adapter (final)" in line)
    assert label in line
    if family == "clip":
        assert "PEFT format" not in line
