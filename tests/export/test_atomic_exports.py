"""export_merged, save_adapter and AdapterExport leave one consistent, loadable folder, whatever happened before or
during the write (issue 22, items 3 to 5), checked by loading with transformers and peft themselves."""
import copy
from pathlib import Path
from types import SimpleNamespace

import lightning as L
import pytest
import torch
import transformers.modeling_utils
from tiny_models import _tokens, tiny_llama, tiny_vit, with_random_adapters
from transformers import AutoModelForCausalLM

import lit_lowrank.adapters.peft_io
import lit_lowrank.export
from lit_lowrank import LoRAConfig, export_merged, inject_lora, save_adapter
from lit_lowrank.atomic import foreign_files
from lit_lowrank.callbacks import AdapterExport
from lit_lowrank.export import EXPORT_RECORD, MODEL_FILE

peft = pytest.importorskip("peft")
IDS = _tokens()


@pytest.fixture(scope="module")
def llamas():
    """A base and two differently adapted copies of it, told apart by their outputs."""
    base = tiny_llama().eval()
    return base, with_random_adapters(copy.deepcopy(base), seed=1), with_random_adapters(copy.deepcopy(base), seed=2)


def logits(model):
    with torch.no_grad():
        return model(input_ids=IDS).logits


def assert_loads_as(directory, model):
    torch.testing.assert_close(logits(AutoModelForCausalLM.from_pretrained(directory).eval()), logits(model),
                               rtol=1e-5, atol=1e-5)


def assert_adapter_loads_as(directory, base, model):
    torch.testing.assert_close(logits(peft.PeftModel.from_pretrained(copy.deepcopy(base), directory).eval()),
                               logits(model), rtol=1e-5, atol=1e-5)


def contents(directory):
    return {path.name: path.read_bytes() for path in Path(directory).iterdir()}


def no_leftovers(parent):
    return [path.name for path in Path(parent).iterdir() if ".partial-" in path.name] == []


# item 3: a folder holding an adapter (or anything else) is refused, never cleared


def test_export_merged_refuses_a_folder_holding_an_adapter(tmp_path, llamas):
    base, model, _ = llamas
    save_adapter(model, tmp_path / "out")
    before = contents(tmp_path / "out")
    with pytest.raises(ValueError, match=r"out holds files .*'adapter_config.json'.*second time.*HINT: export into a "
                                         r"new or empty folder"):
        export_merged(model, tmp_path / "out")
    assert contents(tmp_path / "out") == before and no_leftovers(tmp_path)
    assert_adapter_loads_as(tmp_path / "out", base, model)
    export_merged(model, tmp_path / "new")
    assert_loads_as(tmp_path / "new", model)  # with peft installed: nothing in it applies the adapter again


def test_export_merged_replaces_its_own_export_but_not_files_added_to_it(tmp_path, llamas):
    _, first, second = llamas
    export_merged(first, tmp_path / "out")
    (tmp_path / "out" / "notes.txt").write_text("mine")
    with pytest.raises(ValueError, match=r"\['notes.txt'\].*HINT"):
        export_merged(second, tmp_path / "out")
    assert (tmp_path / "out" / "notes.txt").read_text() == "mine"
    assert_loads_as(tmp_path / "out", first)
    (tmp_path / "out" / "notes.txt").unlink()
    export_merged(second, tmp_path / "out")
    assert_loads_as(tmp_path / "out", second)


def test_save_adapter_replaces_an_adapter_but_refuses_a_merged_model(tmp_path, llamas):
    base, first, second = llamas
    save_adapter(first, tmp_path / "adapter")
    save_adapter(second, tmp_path / "adapter")
    assert_adapter_loads_as(tmp_path / "adapter", base, second)
    export_merged(first, tmp_path / "merged")
    with pytest.raises(ValueError, match=r"merged holds files other than an adapter's: .*'config.json'.*HINT"):
        save_adapter(second, tmp_path / "merged")
    assert_loads_as(tmp_path / "merged", first)


# item 4: an export over an older one holds exactly one model


def test_an_export_over_a_sharded_one_leaves_no_stale_file(tmp_path, llamas):
    _, first, second = llamas
    export_merged(first, tmp_path / "out", max_shard_size="20KB")
    sharded = sorted(contents(tmp_path / "out"))
    assert "model.safetensors.index.json" in sharded and len([n for n in sharded if n.startswith("model-")]) > 1
    export_merged(second, tmp_path / "out")
    export_merged(second, tmp_path / "fresh")
    assert sorted(contents(tmp_path / "out")) == sorted(contents(tmp_path / "fresh"))
    assert "model.safetensors.index.json" not in contents(tmp_path / "out")
    assert_loads_as(tmp_path / "out", second)
    export_merged(first, tmp_path / "out", max_shard_size="20KB")  # and back: no single-file model left over
    assert sorted(contents(tmp_path / "out")) == sharded
    assert_loads_as(tmp_path / "out", first)
    assert foreign_files(tmp_path / "out", ours=sharded) == [] and EXPORT_RECORD in sharded


# item 5: a write that fails midway leaves the previous export loadable


def half_then_disk_full(real_save_file):
    """A safetensors save_file that writes half the file and then fails, as on a full disk."""
    def save_file(tensors, filename, metadata=None):
        real_save_file(tensors, filename, metadata=metadata)
        data = Path(filename).read_bytes()
        Path(filename).write_bytes(data[:len(data) // 2])
        raise OSError(28, "No space left on device")
    return save_file


def test_a_failed_transformers_export_leaves_the_previous_one(tmp_path, llamas, monkeypatch):
    _, first, second = llamas
    export_merged(first, tmp_path / "out", max_shard_size="20KB")
    before = contents(tmp_path / "out")
    monkeypatch.setattr(transformers.modeling_utils, "safe_save_file",
                        half_then_disk_full(transformers.modeling_utils.safe_save_file))
    with pytest.raises(OSError, match="No space left"):
        export_merged(second, tmp_path / "out")
    assert contents(tmp_path / "out") == before and no_leftovers(tmp_path)
    assert_loads_as(tmp_path / "out", first)


def test_a_failed_state_dict_export_leaves_the_previous_one(tmp_path, monkeypatch):
    from safetensors.torch import load_file

    base = tiny_vit().eval()
    first, second = (with_random_adapters(copy.deepcopy(base), ["qkv", "fc1"], seed) for seed in (1, 2))
    export_merged(first, tmp_path / "out")
    monkeypatch.setattr(lit_lowrank.export, "save_file", half_then_disk_full(lit_lowrank.export.save_file))
    with pytest.raises(OSError, match="No space left"):
        export_merged(second, tmp_path / "out")
    assert no_leftovers(tmp_path)
    plain = copy.deepcopy(base)
    plain.load_state_dict(load_file(tmp_path / "out" / MODEL_FILE))
    images = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(plain(images), first(images), rtol=1e-5, atol=1e-5)


def test_a_failed_best_adapter_rewrite_leaves_the_previous_best(tmp_path, llamas, monkeypatch):
    base, first, second = llamas
    export = AdapterExport(str(tmp_path / "adapter"))
    trainer = SimpleNamespace(is_global_zero=True)
    export.export(trainer, first, "best")
    monkeypatch.setattr(lit_lowrank.adapters.peft_io, "save_file",
                        half_then_disk_full(lit_lowrank.adapters.peft_io.save_file))
    with pytest.raises(OSError, match="No space left"):
        export.export(trainer, second, "best")
    assert no_leftovers(tmp_path / "adapter")
    assert_adapter_loads_as(tmp_path / "adapter" / "best", base, first)
    monkeypatch.undo()
    export.export(trainer, second, "best")
    assert_adapter_loads_as(tmp_path / "adapter" / "best", base, second)


class TinyAdapted(L.LightningModule):
    def __init__(self):
        super().__init__()
        self.net = inject_lora(torch.nn.Sequential(torch.nn.Linear(4, 4)), LoRAConfig(r=2, target_modules=["0"]))

    def training_step(self, batch, batch_idx):
        return self.net(batch).sum()

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.1)


def test_adapter_export_refuses_a_foreign_folder_before_training(tmp_path):
    (tmp_path / "adapter" / "merged").mkdir(parents=True)
    (tmp_path / "adapter" / "merged" / "notes.txt").write_text("mine")
    module = TinyAdapted()
    trainer = L.Trainer(accelerator="cpu", max_steps=2, logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False,
                        callbacks=[AdapterExport(str(tmp_path / "adapter"), merged=True)])
    with pytest.raises(ValueError, match=r"merged holds files .*'notes.txt'"):
        trainer.fit(module, train_dataloaders=torch.utils.data.DataLoader(torch.randn(8, 4), batch_size=4))
    assert trainer.global_step == 0
    assert (tmp_path / "adapter" / "merged" / "notes.txt").read_text() == "mine"
