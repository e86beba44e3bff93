"""TextClassificationDataModule (CSV/TSV/JSONL) and DocstringClassificationDataModule: labels, splits, batches."""
import json

import pytest
import torch

from lit_lowrank.data import DocstringClassificationDataModule, TextClassificationDataModule, docstring_classification
from lit_lowrank.data.common import label_vocabulary

ROWS = [("a wonderful, moving film", "pos"), ("dull and far too long", "neg"), ("it was fine i guess", "meh"),
        ("the best thing i have seen this year", "pos"), ("i walked out after ten minutes", "neg")] * 6


def _csv(path, rows, header=("text", "label")):
    lines = [",".join(header)] + [f'"{t}",{y}' for t, y in rows]
    path.write_text("\n".join(lines) + "\n")
    return str(path)


def _jsonl(path, rows, keys=("text", "label")):
    path.write_text("\n".join(json.dumps(dict(zip(keys, row))) for row in rows) + "\n")
    return str(path)


def test_string_labels_map_in_sorted_order_whatever_the_row_order(tmp_path):
    first = TextClassificationDataModule(_csv(tmp_path / "a.csv", ROWS))
    second = TextClassificationDataModule(_csv(tmp_path / "b.csv", ROWS[::-1]))
    assert first.class_names == second.class_names == ["meh", "neg", "pos"] and first.num_classes == 3
    first.setup("fit")
    everything = first.splits["train"] + first.splits["validation"]
    assert sorted(everything) == sorted((t, ["meh", "neg", "pos"].index(y)) for t, y in ROWS)


def test_integer_labels_keep_their_ids_and_given_names_set_the_order(tmp_path):
    rows = [(t, {"pos": 2, "neg": 0, "meh": 1}[y]) for t, y in ROWS]
    dm = TextClassificationDataModule(_jsonl(tmp_path / "t.jsonl", rows), val_file=_csv(tmp_path / "v.csv", rows[:5]))
    assert dm.class_names == ["0", "1", "2"]
    dm.setup()
    assert dm.splits["train"] == rows and dm.splits["validation"] == rows[:5]  # 2 in JSON and "2" in CSV agree
    named = TextClassificationDataModule(_jsonl(tmp_path / "t.jsonl", [(t, y) for t, y in ROWS]),
                                         class_names=["pos", "neg", "meh"])
    named.setup()
    assert {y for t, y in named.splits["train"] if t == ROWS[0][0]} == {0}
    assert (label_vocabulary([10, "9", 100]) == ["9", "10", "100"]
            and label_vocabulary(["b", "10", "a"]) == ["10", "a", "b"])


def test_batches_are_dynamically_padded_tokenizer_output(tmp_path):
    long_text = "word " * 300
    rows = ROWS + [(long_text, "pos")]
    dm = TextClassificationDataModule(_csv(tmp_path / "train.csv", rows), val_file=_csv(tmp_path / "v.csv", ROWS[:3]),
                                      test_file=_csv(tmp_path / "t.csv", [(long_text, "neg"), ("short", "pos")]),
                                      max_length=32, batch_size=3)
    dm.setup()
    batch = next(iter(dm.val_dataloader()))
    assert set(batch) == {"input_ids", "attention_mask", "token_type_ids", "labels"}
    assert batch["labels"].tolist() == [2, 1, 0] and batch["labels"].dtype == torch.long
    lengths = [len(dm.tokenizer.encode(t)) for t, _ in ROWS[:3]]
    assert batch["input_ids"].shape == (3, max(lengths)) and batch["attention_mask"].sum(1).tolist() == lengths
    test = next(iter(dm.test_dataloader()))
    assert test["input_ids"].shape == (2, 32) and test["attention_mask"].sum(1).tolist() == [32, 3]
    assert next(iter(dm.predict_dataloader()))["labels"].tolist() == [1, 2]


def test_tsv_and_held_out_validation_share(tmp_path):
    path = tmp_path / "train.tsv"
    path.write_text("sentence\ttarget\n" + "".join(f"example number {i}\t{i % 2}\n" for i in range(200)))
    dm = TextClassificationDataModule(str(path), text_field="sentence", label_field="target", val_fraction=0.2)
    dm.setup()
    train, val = dm.splits["train"], dm.splits["validation"]
    assert len(train) + len(val) == 200 and 20 < len(val) < 60 and not {t for t, _ in train} & {t for t, _ in val}
    again = TextClassificationDataModule(str(path), text_field="sentence", label_field="target", val_fraction=0.2)
    again.setup()
    assert again.splits == dm.splits


def test_missing_column_unknown_label_and_missing_split_errors(tmp_path):
    path = _csv(tmp_path / "train.csv", ROWS, header=("text", "sentiment"))
    with pytest.raises(KeyError, match=r"column 'label' not found.*\['text', 'sentiment'\].*label_field="):
        TextClassificationDataModule(path).setup()
    with pytest.raises(KeyError, match="column 'body' not found.*text_field="):
        TextClassificationDataModule(path, text_field="body", label_field="sentiment").setup()
    val = _csv(tmp_path / "val.csv", [("odd one", "surprised")])
    with pytest.raises(ValueError, match=r"labels \['surprised'\].*class_names"):
        TextClassificationDataModule(_csv(tmp_path / "t.csv", ROWS), val_file=val,
                                     class_names=["meh", "neg", "pos"]).setup()
    dm = TextClassificationDataModule(_csv(tmp_path / "t.csv", ROWS))
    dm.setup()
    with pytest.raises(RuntimeError, match="no test split.*test_file"):
        dm.test_dataloader()
    (tmp_path / "x.parquet").write_bytes(b"PAR1")
    with pytest.raises(ValueError, match="expected a .csv, .tsv or .jsonl"):
        _ = TextClassificationDataModule(str(tmp_path / "x.parquet")).class_names
    (tmp_path / "bad.jsonl").write_text('{"text": "a", "label": 1}\nnot json\n')
    with pytest.raises(FileNotFoundError, match="does not exist"):
        _ = TextClassificationDataModule(str(tmp_path / "nope.csv")).class_names
    with pytest.raises(ValueError, match="bad.jsonl:2 is not valid JSON"):
        TextClassificationDataModule(str(tmp_path / "bad.jsonl")).setup()


def test_docstring_datamodule_matches_the_task():
    dm = DocstringClassificationDataModule(batch_size=16, max_length=64)
    assert dm.num_classes == 9 and dm.class_names[0] == "asyncio"  # known before setup
    dm.setup("fit")
    task = docstring_classification()
    assert dm.fingerprint == task.fingerprint()
    assert {k: len(v) for k, v in dm.splits.items()} == {"train": 630, "validation": 135, "test": 135}
    batch = next(iter(dm.train_dataloader()))
    assert set(batch) == {"input_ids", "attention_mask", "token_type_ids", "labels"}
    assert batch["input_ids"].shape[0] == 16 and batch["input_ids"].shape[1] <= 64
    assert batch["labels"].min() >= 0 and batch["labels"].max() < 9
    test = next(iter(dm.test_dataloader()))
    assert test["labels"].tolist() == [ex.label for ex in task.test[:16]]


def test_docstring_datamodule_uncapped_with_a_large_test_share():
    """The fine-tuning benchmark's split: every paragraph of the 9 packages, 55% of them for test."""
    fractions = (0.35, 0.10, 0.55)
    dm = DocstringClassificationDataModule(cap_per_class=None, fractions=fractions)
    dm.setup("fit")
    task = docstring_classification(cap_per_class=10**9, fractions=fractions)
    assert dm.fingerprint == task.fingerprint()
    sizes = {split: len(examples) for split, examples in dm.splits.items()}
    assert sizes["test"] >= 1000 and sizes["test"] > sizes["train"] > sizes["validation"] > 200
    texts = {split: {text for text, _ in examples} for split, examples in dm.splits.items()}
    assert not (texts["train"] & texts["test"]) and not (texts["validation"] & texts["test"])
    # a paragraph's split depends on its text alone: the capped default task's test paragraphs stay test ones
    assert {ex.text for ex in docstring_classification().test} <= texts["test"]


def test_docstring_datamodule_rejects_a_cap_below_one():
    with pytest.raises(ValueError, match="cap_per_class must be a positive"):
        DocstringClassificationDataModule(cap_per_class=0)
