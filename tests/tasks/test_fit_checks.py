"""Switches that used to train the wrong thing silently now stop before training, naming the YAML keys to change:
LoRA-Pre on adapters, class counts and vocabularies that do not fit the model, schedules shorter than the run."""
import functools

import lightning as L
import pytest
import torch
from PIL import Image
from torch.utils.data import DataLoader

from lit_lowrank import LoRAConfig
from lit_lowrank.backbones import timm_backbone, transformers_backbone
from lit_lowrank.data import ImageFolderDataModule, TextBlocksDataModule, TextClassificationDataModule
from lit_lowrank.optim import LoRAPreAdamW, LoRAPreMuon, WarmupCosineLR
from lit_lowrank.tasks import CausalLMTask, ImageClassificationTask, SequenceClassificationTask

pytestmark = pytest.mark.usefixtures("one_thread")  # tiny tensors (tests/conftest.py)


def tiny_bert(vocab: int, labels: int = 2):
    return transformers_backbone(config=dict(model_type="bert", hidden_size=16, intermediate_size=32,
                                             num_hidden_layers=1, num_attention_heads=2, vocab_size=vocab,
                                             max_position_embeddings=64),
                                 tokenizer=False, auto_class="AutoModelForSequenceClassification",
                                 model_kwargs=dict(num_labels=labels))


def tiny_llama(vocab: int = 64):
    return transformers_backbone(config=dict(model_type="llama", hidden_size=16, intermediate_size=32,
                                             num_hidden_layers=1, num_attention_heads=2, vocab_size=vocab,
                                             max_position_embeddings=64), tokenizer=False)


def trainer(**options) -> L.Trainer:
    return L.Trainer(accelerator="cpu", devices=1, logger=False, enable_checkpointing=False, enable_progress_bar=False,
                     enable_model_summary=False, num_sanity_val_steps=0, **options)


# ---------------------------------------------------------------------------------------------- LoRA-Pre


@pytest.mark.parametrize("optimizer", [LoRAPreAdamW, LoRAPreMuon], ids=lambda c: c.__name__)
def test_lora_pre_with_adapters_stops_with_the_yaml_keys(optimizer):
    # The README's "one YAML entry" switch from LoRAPro: it used to train the adapters with plain AdamW.
    factory = functools.partial(optimizer, lr=1e-3, rank=2)
    with pytest.raises(ValueError, match=r"model\.init_args\.lora: null.*model\.init_args\.optimizer\.class_path"):
        SequenceClassificationTask(tiny_bert(64), lora=LoRAConfig(r=2, target_modules="default"), optimizer=factory)
    full = SequenceClassificationTask(tiny_bert(64), optimizer=factory)  # full-parameter LoRA-Pre stays fine
    assert any(group["lowrank"] for group in full.configure_optimizers().param_groups)


# ------------------------------------------------------------------------------- classes and vocabulary


def _image_folder(root, classes):
    for split in ("train", "val"):
        for name in classes:
            (root / split / name).mkdir(parents=True)
            for i in range(2):
                Image.new("RGB", (8, 8), color=(40 * i, 0, 0)).save(root / split / name / f"{i}.png")
    return ImageFolderDataModule(str(root / "train"), val_dir=str(root / "val"), image_size=16, batch_size=4)


def test_image_folder_with_fewer_classes_than_the_head_stops_at_setup(tmp_path):
    dm = _image_folder(tmp_path, ["cat", "dog"])
    task = ImageClassificationTask(timm_backbone("vit_tiny_patch16_224", img_size=16, patch_size=8, embed_dim=16,
                                                 depth=1, num_heads=2, num_classes=10))
    with pytest.raises(ValueError, match=r"has 2 classes \(\['cat', 'dog'\]\) but the model's head has 10 outputs\. "
                                         r"HINT: set `model\.init_args\.backbone\.init_args\.num_classes: 2`"):
        trainer(max_steps=1).fit(task, datamodule=dm)


def test_tokenizer_larger_than_the_embedding_stops_at_setup(tmp_path):
    # The bundled MiniLM tokenizer (30522 ids) against a 128-row embedding: a bare IndexError in forward before.
    (tmp_path / "train.csv").write_text("text,label\n" + "a good film,pos\na bad film,neg\n" * 10)
    dm = TextClassificationDataModule(str(tmp_path / "train.csv"), batch_size=4, max_length=16)
    task = SequenceClassificationTask(tiny_bert(128))
    with pytest.raises(ValueError, match=r"token ids up to 30521 \(vocabulary 30522\).*only 128 rows.*"
                                         r"data\.init_args\.tokenizer.*config\.vocab_size: 30522"):
        trainer(max_steps=1).fit(task, datamodule=dm)


def test_causal_lm_vocabulary_is_checked_against_max_vocab(tmp_path):
    (tmp_path / "a.txt").write_text("the quick brown fox jumps over the lazy dog. " * 20)
    dm = TextBlocksDataModule(str(tmp_path), block_size=8, batch_size=4, max_vocab=100)
    with pytest.raises(ValueError, match=r"vocabulary 100\).*only 64 rows.*data\.init_args\.max_vocab: 64"):
        trainer(max_steps=1).validate(CausalLMTask(tiny_llama(64)), datamodule=dm)


# ---------------------------------------------------------------------------------------------- schedules


def _lm_run(scheduler, **options):
    task = CausalLMTask(tiny_llama(), optimizer=functools.partial(torch.optim.AdamW, lr=1e-2), scheduler=scheduler)
    tokens = torch.randint(0, 64, (12, 8), generator=torch.Generator().manual_seed(0))
    run = trainer(**options)
    run.fit(task, train_dataloaders=DataLoader([{"input_ids": t, "labels": t} for t in tokens], batch_size=4))
    return run


def test_unset_total_steps_follows_the_run():
    # 12 examples / 4 per batch x 3 epochs = 9 optimizer steps; the old default (1000) left the cosine at its top.
    run = _lm_run(functools.partial(WarmupCosineLR, warmup_steps=2, min_ratio=0.1), max_epochs=3)
    scheduler = run.lr_scheduler_configs[0].scheduler
    assert scheduler.total_steps == run.estimated_stepping_batches == 9
    assert run.optimizers[0].param_groups[0]["lr"] == pytest.approx(1e-3)  # decayed to min_ratio exactly at the end
    accumulated = _lm_run(functools.partial(WarmupCosineLR, warmup_steps=1), max_epochs=3, accumulate_grad_batches=3)
    assert accumulated.lr_scheduler_configs[0].scheduler.total_steps == 3


def test_explicit_total_steps_shorter_than_the_run_stops_naming_both_keys():
    # The quickstart with more epochs: every step after total_steps trained at min_ratio x lr (0 by default).
    with pytest.raises(ValueError, match=r"takes 9 optimizer steps.*total_steps is 5.*last 4 steps.*"
                                         r"model\.init_args\.scheduler\.init_args\.total_steps.*trainer\.max_epochs"):
        _lm_run(functools.partial(WarmupCosineLR, warmup_steps=2, total_steps=5), max_epochs=3)
    run = _lm_run(functools.partial(WarmupCosineLR, warmup_steps=2, total_steps=5), max_steps=5)  # fits: fine
    assert run.lr_scheduler_configs[0].scheduler.total_steps == 5


def test_unset_total_steps_outside_a_trainer_says_what_to_do():
    optimizer = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=1.0)
    scheduler = WarmupCosineLR(optimizer, warmup_steps=1)
    optimizer.step()
    scheduler.step()  # step 1 = end of warm-up: still defined
    optimizer.step()
    with pytest.raises(RuntimeError, match="total_steps=None.*HINT: pass total_steps"):
        scheduler.step()
