"""``predict`` on the classification tasks writes its predictions (with inputs and label names) and says where."""
import csv
import json

import lightning as L
import pytest
import torch

from lit_lowrank.backbones import open_clip_backbone, timm_backbone, transformers_backbone
from lit_lowrank.callbacks import PredictionWriter
from lit_lowrank.data import DigitsDataModule, ImageFolderDataModule, TextClassificationDataModule
from lit_lowrank.data.images import DIGIT_NAMES
from lit_lowrank.tasks import CLIPTask, ImageClassificationTask, SequenceClassificationTask

pytestmark = pytest.mark.usefixtures("one_thread")  # tiny tensors (tests/conftest.py)


def trainer(root, callbacks=()) -> L.Trainer:
    # logger=False: the log directory is default_root_dir
    return L.Trainer(accelerator="cpu", devices=1, logger=False, enable_checkpointing=False, enable_progress_bar=False,
                     enable_model_summary=False, default_root_dir=str(root), callbacks=list(callbacks))


def read_csv(path):
    with open(path, newline="", encoding="utf-8") as handle:
        return list(csv.DictReader(handle))


def test_sequence_classification_writes_text_prediction_and_label_names(tmp_path, capsys):
    (tmp_path / "train.csv").write_text("text,label\n" + "a good film,pos\na bad film,neg\n" * 5)
    tests = [("loved it, truly", "pos"), ('"quoted", with commas\nand a line break', "neg"), ("meh", "neg")]
    with open(tmp_path / "test.csv", "w", newline="") as handle:
        csv.writer(handle).writerows([("text", "label"), *tests])
    dm = TextClassificationDataModule(str(tmp_path / "train.csv"), test_file=str(tmp_path / "test.csv"), batch_size=2,
                                      max_length=16)
    task = SequenceClassificationTask(transformers_backbone(
        config=dict(model_type="bert", hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2,
                    vocab_size=30522, max_position_embeddings=64),
        tokenizer=False, auto_class="AutoModelForSequenceClassification", model_kwargs=dict(num_labels=2)))
    returned = trainer(tmp_path).predict(task, datamodule=dm)
    rows = read_csv(tmp_path / "predictions.csv")
    expected = [(str(i), text, label) for i, (text, label) in enumerate(tests)]
    assert [(r["index"], r["input"], r["label_name"]) for r in rows] == expected
    assert [int(r["prediction"]) for r in rows] == torch.cat(returned).tolist()
    assert all(r["prediction_name"] == dm.class_names[int(r["prediction"])] for r in rows)
    assert f"Predictions (3 rows) written to {(tmp_path / 'predictions.csv').resolve()}" in capsys.readouterr().out


@pytest.mark.parametrize("make_task", [
    lambda: ImageClassificationTask(timm_backbone("vit_tiny_patch16_224", img_size=16, patch_size=8, embed_dim=16,
                                                  depth=1, num_heads=2, num_classes=10)),
    lambda: CLIPTask(open_clip_backbone(embed_dim=8, vision_cfg=dict(image_size=16, patch_size=8, width=16, layers=1,
                                                                     head_width=8),
                                        text_cfg=dict(context_length=8, width=16, heads=2, layers=1))),
], ids=["timm", "clip"])
def test_image_tasks_write_digit_ids_and_class_names(make_task, tmp_path):
    dm = DigitsDataModule(image_size=16, batch_size=128)
    trainer(tmp_path).predict(make_task(), datamodule=dm, return_predictions=False)
    rows = read_csv(tmp_path / "predictions.csv")
    assert len(rows) == 269 and [r["input"] for r in rows] == [f"digits[{i}]" for i in dm.indices["test"].tolist()]
    assert all(r["label_name"] == DIGIT_NAMES[int(r["label"])] for r in rows)
    assert all(r["prediction_name"] == DIGIT_NAMES[int(r["prediction"])] for r in rows)


def test_a_writer_the_user_configured_is_kept(tmp_path):
    from PIL import Image

    for split in ("train", "test"):
        for name in ("cat", "dog"):
            (tmp_path / split / name).mkdir(parents=True)
            Image.new("RGB", (8, 8)).save(tmp_path / split / name / "0.png")
    train, test = str(tmp_path / "train"), str(tmp_path / "test")
    dm = ImageFolderDataModule(train, val_dir=train, test_dir=test, image_size=16, batch_size=4)
    task = ImageClassificationTask(timm_backbone("vit_tiny_patch16_224", img_size=16, patch_size=8, embed_dim=16,
                                                 depth=1, num_heads=2, num_classes=2))
    mine = PredictionWriter(output_dir=str(tmp_path / "mine"), filename="out.jsonl")
    trainer(tmp_path, [mine]).predict(task, datamodule=dm, return_predictions=False)
    rows = [json.loads(line) for line in (tmp_path / "mine" / "out.jsonl").read_text().splitlines()]
    assert [r["input"] for r in rows] == [str(tmp_path / "test" / n / "0.png") for n in ("cat", "dog")]
    assert [r["label_name"] for r in rows] == ["cat", "dog"] and not (tmp_path / "predictions.csv").exists()


def test_predict_without_a_test_split_names_the_key(tmp_path):
    (tmp_path / "train.csv").write_text("text,label\n" + "a good film,pos\na bad film,neg\n" * 5)
    dm = TextClassificationDataModule(str(tmp_path / "train.csv"))
    dm.setup("predict")
    with pytest.raises(RuntimeError, match=r"no test split \(predict uses the test split too\)\. HINT: set "
                                           r"data\.init_args\.test_file"):
        dm.predict_dataloader()
