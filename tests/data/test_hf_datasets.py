"""Hugging Face datasets read like files: null fields count as missing (Arrow gives every row every column), local
data_files and sliced splits work, and a loading script or a file that does not parse is reported as such, not as an
unreachable hub. Issue 23, item 3: hf_dataset= kept 24 of 48 mixed rows where train_file= kept 48."""
import json

import pytest

from lit_lowrank.data import InstructionDataModule, TextBlocksDataModule

pytest.importorskip("datasets")


def mixed_rows(tmp_path):
    """24 prompt/response pairs and 24 chats, alternating, in one JSONL file."""
    rows = []
    for i in range(24):
        rows.append({"prompt": f"what is {i} plus one?", "response": f"#### {i + 1}"})
        rows.append({"messages": [{"role": "user", "content": f"what is {i} times two?"},
                                  {"role": "assistant", "content": f"#### {2 * i}"}]})
    path = tmp_path / "mixed.jsonl"
    path.write_text("\n".join(json.dumps(row) for row in rows) + "\n")
    return str(path)


def examples(dm):
    found = dm.read_examples()
    return {split: [ex.messages for ex in rows] for split, rows in found.items()}


def test_mixed_pairs_and_chats_keep_every_row_as_from_the_file(tmp_path):
    path = mixed_rows(tmp_path)
    from_file = examples(InstructionDataModule(train_file=path))
    from_hf = examples(InstructionDataModule(hf_dataset="json", hf_data_files={"train": path}))
    assert len(from_file["train"]) == 48 and from_hf == from_file


def test_sliced_splits(tmp_path):
    path = mixed_rows(tmp_path)
    everything = examples(InstructionDataModule(train_file=path))["train"]
    dm = InstructionDataModule(hf_dataset="json", hf_data_files=path,
                               hf_splits={"train": "train[:75%]", "validation": "train[75%:]"})
    sliced = examples(dm)
    assert sliced == {"train": everything[:36], "validation": everything[36:]}
    dm.setup("fit")  # the validation slice is used as it is, not held out again
    assert len(dm.examples["train"]) == 36 and len(dm.examples["validation"]) == 12
    with pytest.raises(KeyError, match=r"Unknown split \"valid\".*HINT: fix hf_splits"):
        InstructionDataModule(hf_dataset="json", hf_data_files=path, hf_splits={"train": "valid"}).setup("fit")


def test_a_loading_script_is_reported_as_such(tmp_path):
    folder = tmp_path / "scripted"
    folder.mkdir()
    (folder / "scripted.py").write_text("import datasets\n")
    (folder / "train.jsonl").write_text('{"prompt": "a", "response": "b"}\n')
    with pytest.raises(ValueError, match=r"has a loading script.*no longer runs\. HINT: load its data files") as error:
        InstructionDataModule(hf_dataset=str(folder)).setup("fit")
    assert "unreachable" not in str(error.value)


def test_a_file_that_does_not_parse_is_reported_as_such(tmp_path):
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"prompt": "a", "response": "b"}\n{"prompt": oops}\n')
    with pytest.raises(ValueError, match=r"could not read \(parse\) the data files of .*bad\.jsonl.*JSON parse error"
                       ) as error:
        InstructionDataModule(hf_dataset="json", hf_data_files=str(bad)).setup("fit")
    assert "unreachable" not in str(error.value)
    with pytest.raises(FileNotFoundError, match=r"missing\.jsonl.*HINT: check the paths"):
        InstructionDataModule(hf_dataset="json", hf_data_files=str(tmp_path / "missing.jsonl")).setup("fit")


def test_text_blocks_read_local_data_files_with_sliced_splits(tmp_path):
    path = tmp_path / "texts.jsonl"
    path.write_text("".join(json.dumps({"text": f"document number {i} about the quick brown fox. " * 8}) + "\n"
                            for i in range(10)))
    dm = TextBlocksDataModule(hf_dataset="json", hf_data_files=str(path), block_size=16, tokenizer="bytes",
                              hf_splits={"train": "train[:80%]", "validation": "train[80%:]"})
    dm.setup("fit")
    held_out = "".join(json.loads(line)["text"] for line in path.read_text().splitlines()[8:])
    assert dm.val_blocks.numel() == (len(held_out.encode()) + 2) // 16 * 16  # two documents, each ends with EOS
    assert dm.tokenizer.decode(dm.val_blocks[0]) == held_out[:16]
