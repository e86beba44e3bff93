"""TextBlocksDataModule for test and predict: a test source or the validation blocks (with a warning), prompts to
continue, documents left out by pattern, and the compacted vocabulary saved with checkpoints."""
import pytest
import torch

from lit_lowrank.data import TextBlocksDataModule
from lit_lowrank.data.codec import load_kept_token_ids

TEXT = "the quick brown fox jumps over the lazy dog. " * 30


@pytest.fixture
def folder(tmp_path):
    (tmp_path / "docs").mkdir()
    for name in ("a", "b", "c", "d"):
        (tmp_path / "docs" / f"{name}.txt").write_text(f"{name} {TEXT}")
    (tmp_path / "held_out.txt").write_text("a lazy dog sleeps. " * 40)
    return tmp_path


def test_test_split_reads_test_source_and_otherwise_warns_it_uses_validation(folder):
    dm = TextBlocksDataModule(str(folder / "docs"), test_source=str(folder / "held_out.txt"), block_size=16,
                              batch_size=4)
    dm.setup("test")
    first = next(iter(dm.test_dataloader()))["input_ids"][0]
    assert dm.tokenizer.decode(first).startswith("a lazy dog sleeps")
    without = TextBlocksDataModule(str(folder / "docs"), block_size=16, batch_size=4)
    without.setup("test")
    with pytest.warns(UserWarning, match="no test_source: testing on the validation blocks"):
        loader = without.test_dataloader()
    assert torch.equal(next(iter(loader))["input_ids"], next(iter(without.val_dataloader()))["input_ids"])


def test_predict_continues_given_prompts_or_the_first_quarter_of_validation_blocks(folder):
    dm = TextBlocksDataModule(str(folder / "docs"), block_size=16, batch_size=8, max_vocab=40)
    dm.setup("predict")
    batch = next(iter(dm.predict_dataloader()))
    assert batch["prompt_input_ids"].shape[1] == 4  # a quarter of a block
    block = dm.val_blocks[0].tolist()
    assert batch["prompts"][0] == dm.codec.decode(block[:4]) and batch["references"][0] == dm.codec.decode(block[4:])
    given = TextBlocksDataModule(str(folder / "docs"), block_size=16, batch_size=8, max_vocab=40,
                                 predict_prompts=["the lazy", "a quick brown fox"])
    given.setup("predict")
    batch = next(iter(given.predict_dataloader()))
    assert batch["prompts"] == ["the lazy", "a quick brown fox"] and batch["references"] == [None, None]
    assert batch["prompt_attention_mask"].tolist() == [[0, 0, 1, 1], [1, 1, 1, 1]]  # left-padded
    assert given.codec.decode(batch["prompt_input_ids"][1].tolist()) == "a quick brown fox"


def test_exclude_leaves_documents_out_and_refuses_a_pattern_that_matches_nothing(folder):
    dm = TextBlocksDataModule(str(folder / "docs"), exclude=["a.*", "c.*"], block_size=16, batch_size=4)
    assert [doc_id for doc_id, _ in dm._without_excluded([("a.txt", ""), ("b.txt", ""), ("c.txt", "")])] == ["b.txt"]
    dm.setup("fit")
    texts = dm.tokenizer.decode(torch.cat([dm.train_blocks.flatten(), dm.val_blocks.flatten()]))
    assert "b the" in texts and "a the" not in texts and "c the" not in texts
    with pytest.raises(ValueError, match=r"exclude pattern 'stdlib:nothing/\*' matches no document"):
        TextBlocksDataModule(str(folder / "docs"), exclude=["stdlib:nothing/*"], block_size=16).setup("fit")


def test_the_compacted_vocabulary_is_saved_with_checkpoints_and_read_back(folder, tmp_path):
    dm = TextBlocksDataModule(str(folder / "docs"), block_size=16, batch_size=4, max_vocab=30)
    dm.setup("fit")
    path = tmp_path / "run.ckpt"
    torch.save({"state_dict": {}, "TextBlocksDataModule": dm.state_dict()}, path)
    assert load_kept_token_ids(str(path)) == dm.kept_token_ids.tolist()
    assert TextBlocksDataModule(str(folder / "docs")).state_dict() == {}  # nothing to save without max_vocab
    torch.save({"state_dict": {}}, path)
    with pytest.raises(ValueError, match="holds no compacted vocabulary"):
        load_kept_token_ids(str(path))
