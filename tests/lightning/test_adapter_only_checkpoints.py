"""Checkpoints of LoRA runs hold only what training changes (checkpoint_trainable_only, on by default with adapters):
the frozen base is rebuilt from the config by load_from_checkpoint, the LightningCLI and a resumed fit, which stays
bitwise the uninterrupted run in a fresh process; a checkpoint that lacks trained tensors, or a rebuilt base that is
not the one trained on, is refused with a message saying why."""
import functools
import json
import subprocess
import sys
from pathlib import Path

import lightning as L
import pytest
import torch
from cli_runs import SHORT, tiny_quickstart
from safetensors.torch import load_file
from tiny_models import _tokens, tiny_bert
from torch import nn
from torch.utils.data import DataLoader

from lit_lowrank import LoRAConfig
from lit_lowrank.backbones import Backbone
from lit_lowrank.cli import LowRankCLI
from lit_lowrank.tasks import SequenceClassificationTask
from lit_lowrank.tasks.frozen_base import FROZEN_BASE_KEY, check_frozen_base, drop_frozen_base

LORA = LoRAConfig(r=4, alpha=8, target_modules="default")
ADAMW = functools.partial(torch.optim.AdamW, lr=1e-2)


def build(seed: int = 0, **options) -> SequenceClassificationTask:
    torch.manual_seed(seed)  # the frozen base of a model built from a config is its seed's random init
    return SequenceClassificationTask(Backbone(tiny_bert(), ["query", "value"]), lora=LORA, optimizer=ADAMW, **options)


def fit(task, path: Path) -> Path:
    ids = _tokens(batch=8)
    rows = [{"input_ids": row, "labels": torch.tensor(i % 3)} for i, row in enumerate(ids)]
    trainer = L.Trainer(accelerator="cpu", max_steps=2, logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False)
    trainer.fit(task, train_dataloaders=DataLoader(rows, batch_size=4))
    trainer.save_checkpoint(path)
    return path


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    """Two-step fits, saved trainable-only (the default with adapters) and in full."""
    out = tmp_path_factory.mktemp("ckpt")
    default, full = build(), build(checkpoint_trainable_only=False)
    return default, fit(default, out / "default.ckpt"), fit(full, out / "full.ckpt")


def test_only_trained_tensors_optimizer_and_rng_are_kept(saved):
    task, default, full = saved
    checkpoint = torch.load(default, weights_only=True)
    trained = {"model." + name for name, p in task.model.named_parameters() if p.requires_grad}
    assert set(checkpoint["state_dict"]) == trained
    assert trained == {key for key in trained if "lora_" in key or ".classifier." in key}
    assert set(checkpoint[FROZEN_BASE_KEY]["fingerprints"]) == set(task.state_dict()) - trained
    assert checkpoint["optimizer_states"] and checkpoint["rng_states"]
    assert set(torch.load(full, weights_only=True)["state_dict"]) == set(task.state_dict())
    assert default.stat().st_size < full.stat().st_size / 3


def test_load_from_checkpoint_rebuilds_the_base_and_restores_exactly(saved):
    task, default, _ = saved
    torch.manual_seed(0)
    loaded = SequenceClassificationTask.load_from_checkpoint(
        default, backbone=Backbone(tiny_bert(), ["query", "value"]), lora=LORA, optimizer=ADAMW)
    for (name, value), (_, again) in zip(task.state_dict().items(), loaded.state_dict().items()):
        assert torch.equal(value, again), name


def test_a_checkpoint_without_a_trained_tensor_is_refused(saved, tmp_path):
    _, default, _ = saved
    checkpoint = torch.load(default, weights_only=True)
    del checkpoint["state_dict"]["model.classifier.weight"]
    torch.save(checkpoint, tmp_path / "partial.ckpt")
    with pytest.raises(ValueError, match=r"lacks 1 that this SequenceClassificationTask trains, e\.g\. "
                                         r"'model\.classifier\.weight'.*HINT"):
        SequenceClassificationTask.load_from_checkpoint(
            tmp_path / "partial.ckpt", backbone=Backbone(tiny_bert(), ["query", "value"]), lora=LORA, optimizer=ADAMW)


def test_another_base_is_refused(saved):
    _, default, _ = saved
    torch.manual_seed(1)  # another random init than the one trained on
    with pytest.raises(ValueError, match=r"frozen base weights of this SequenceClassificationTask are not the ones "
                                         r"it was trained on.*HINT: .*seed"):
        SequenceClassificationTask.load_from_checkpoint(
            default, backbone=Backbone(tiny_bert(), ["query", "value"]), lora=LORA, optimizer=ADAMW)


def test_a_plain_state_dict_load_still_refuses_missing_keys(saved):
    task, default, _ = saved
    state = torch.load(default, weights_only=True)["state_dict"]
    with pytest.raises(RuntimeError, match="Missing key"):
        build().load_state_dict(state)  # only right after on_load_checkpoint may the base be missing


def test_the_fingerprint_accepts_the_base_in_bf16_and_refuses_another_init():
    def task(seed, dtype=torch.float32):
        torch.manual_seed(seed)
        holder = nn.Module()
        holder.model = nn.Sequential(nn.Linear(64, 64), nn.LayerNorm(64)).to(dtype).requires_grad_(False)
        return holder

    checkpoint = {"state_dict": task(0, torch.bfloat16).state_dict()}  # trained with precision: bf16-true
    drop_frozen_base(task(0, torch.bfloat16), checkpoint, cache={})
    assert checkpoint["state_dict"] == {}
    assert check_frozen_base(task(0), checkpoint) == {"model.0.weight", "model.0.bias", "model.1.weight",
                                                      "model.1.bias"}
    with pytest.raises(ValueError, match=r"\(2 differ; 'model.0.weight' has other values\)"):  # not LayerNorm's 1/0
        check_frozen_base(task(1), checkpoint)


def test_lightning_cli_checkpoint_loads_and_evaluates_with_the_rebuilt_base(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    cli = LowRankCLI(args=["fit", *tiny_quickstart(tmp_path), *SHORT, "--test_after_fit=false"])
    best = cli.trainer.checkpoint_callback.best_model_path
    checkpoint = torch.load(best, weights_only=True)
    assert (FROZEN_BASE_KEY in checkpoint
            and "model.bert.embeddings.word_embeddings.weight" not in checkpoint["state_dict"])
    # the saved hyper-parameters rebuild the backbone; its random init needs the run's seed (seed_everything: 0)
    L.seed_everything(0)
    loaded = SequenceClassificationTask.load_from_checkpoint(best)
    expected = {**cli.model.state_dict(), **checkpoint["state_dict"]}  # the run's base, the best step's training
    for name, value in loaded.state_dict().items():
        assert torch.equal(value, expected[name]), name
    tested = LowRankCLI(args=["test", *tiny_quickstart(tmp_path), *SHORT, "--ckpt_path", best])
    assert "test/acc" in tested.trainer.callback_metrics


SCRIPT = Path(__file__).with_name("resume_run.py")
CASE = "lora_pro_full"  # the largest optimizer state of the LoRA cases


@pytest.mark.slow
def test_a_trainable_only_checkpoint_resumes_bitwise_in_a_fresh_process(tmp_path):
    for phase in ("straight", "first", "resume"):
        result = subprocess.run([sys.executable, str(SCRIPT), "--phase", phase, "--cases", CASE,
                                 "--out", str(tmp_path)],
                                capture_output=True, text=True, timeout=900, cwd=SCRIPT.parent)
        assert result.returncode == 0, f"{phase} failed:\n{result.stderr[-6000:]}"
    for checkpoint_file in (tmp_path / "first" / CASE).rglob("*.ckpt"):
        checkpoint = torch.load(checkpoint_file, weights_only=True)
        assert FROZEN_BASE_KEY in checkpoint, checkpoint_file
        assert all("lora_" in key for key in checkpoint["state_dict"]), checkpoint_file
    straight = json.loads((tmp_path / f"straight-{CASE}.json").read_text())
    final = load_file(tmp_path / f"straight-{CASE}.safetensors")
    for point in ("mid0", "end0", "mid1"):
        resumed = json.loads((tmp_path / f"resume-{point}-{CASE}.json").read_text())
        assert resumed and resumed == {step: straight[step] for step in resumed}, point
        again = load_file(tmp_path / f"resume-{point}-{CASE}.safetensors")
        for name, value in final.items():
            assert torch.equal(again[name], value), (point, name)
