"""TextBlocksDataModule: blocks from files, folders and the embedded corpus; fixed splits; the HF-datasets path."""
import sys
import time

import pytest
import torch

from lit_lowrank.data import DatasetUnavailableError, TextBlocksDataModule
from lit_lowrank.data.common import load_tokenizer
from lit_lowrank.data.corpus import python_text_corpus, stable_fraction

WORDS = "alpha bravo charlie delta echo foxtrot golf hotel india juliet kilo lima mike november oscar papa".split()


def _write_docs(folder, count=40, words=60):
    texts = {}
    for i in range(count):
        text = " ".join(WORDS[(i + j) % len(WORDS)] for j in range(words)) + f" document {i}."
        name = f"sub/doc{i:02d}.md" if i % 4 == 0 else f"doc{i:02d}.txt"
        (folder / name).parent.mkdir(exist_ok=True)
        (folder / name).write_text(text)
        texts[name] = text
    (folder / "ignored.py").write_text("print('not text')\n" * 100)
    return texts


@pytest.fixture(scope="module")
def tokenizer():
    return load_tokenizer("sentence-transformers/all-MiniLM-L6-v2")


def _count_tokens(tokenizer, texts):
    # one separator ([SEP]; MiniLM has no EOS) after every document
    return sum(len(tokenizer.encode(t, add_special_tokens=False)) + 1 for t in texts)


def test_blocks_from_a_folder_follow_the_hash_split(tmp_path, tokenizer):
    texts = _write_docs(tmp_path)
    dm = TextBlocksDataModule(str(tmp_path), block_size=32, batch_size=8, val_fraction=0.25)
    dm.setup("fit")
    held_out = [texts[name] for name in sorted(texts) if stable_fraction(name) < 0.25]
    kept = [texts[name] for name in sorted(texts) if stable_fraction(name) >= 0.25]
    assert 0 < len(held_out) < len(texts)
    assert dm.train_blocks.shape == (_count_tokens(tokenizer, kept) // 32, 32)
    assert dm.val_blocks.shape == (_count_tokens(tokenizer, held_out) // 32, 32)
    batch = next(iter(dm.train_dataloader()))
    assert set(batch) == {"input_ids", "labels"}
    assert batch["input_ids"].shape == (8, 32) and batch["input_ids"].dtype == torch.long
    assert torch.equal(batch["labels"], batch["input_ids"])
    for blocks, docs in ((dm.train_blocks, kept), (dm.val_blocks, held_out)):
        stream = [i for t in docs for i in tokenizer.encode(t, add_special_tokens=False) + [tokenizer.sep_token_id]]
        assert blocks.flatten().tolist() == stream[: blocks.numel()]  # documents in sorted-path order
    assert "print" not in tokenizer.decode(dm.train_blocks.flatten())  # only *.txt / *.md are read
    assert dm.vocab_size == len(tokenizer) and int(dm.train_blocks.max()) < dm.vocab_size


def test_single_file_holds_out_the_tail(tmp_path, tokenizer):
    text = " ".join(WORDS * 30)
    (tmp_path / "one.txt").write_text(text)
    dm = TextBlocksDataModule(str(tmp_path / "one.txt"), block_size=16, val_fraction=0.1)
    dm.setup("fit")
    total = _count_tokens(tokenizer, [text])
    stream = torch.tensor(tokenizer.encode(text, add_special_tokens=False) + [tokenizer.sep_token_id])
    n_val = max(16, -(-total // 10))
    assert len(dm.val_blocks) == n_val // 16 and len(dm.train_blocks) == (total - n_val) // 16
    assert torch.equal(dm.val_blocks.flatten(), stream[total - n_val:][: len(dm.val_blocks) * 16])
    assert torch.equal(dm.train_blocks.flatten(), stream[: len(dm.train_blocks) * 16])


def test_val_source_globs_and_caps(tmp_path):
    _write_docs(tmp_path)
    (tmp_path / "val").mkdir()
    (tmp_path / "val" / "v.txt").write_text(" ".join(WORDS * 10))
    dm = TextBlocksDataModule([str(tmp_path / "*.txt"), str(tmp_path / "sub")], val_source=str(tmp_path / "val"),
                              block_size=16, max_train_blocks=10, max_val_blocks=3, seed=1)
    dm.setup("fit")
    assert dm.train_blocks.shape == (10, 16) and dm.val_blocks.shape == (3, 16)
    same = TextBlocksDataModule([str(tmp_path / "*.txt"), str(tmp_path / "sub")], val_source=str(tmp_path / "val"),
                                block_size=16, max_train_blocks=10, seed=1)
    other = TextBlocksDataModule([str(tmp_path / "*.txt"), str(tmp_path / "sub")], val_source=str(tmp_path / "val"),
                                 block_size=16, max_train_blocks=10, seed=2)
    same.setup(), other.setup()
    assert torch.equal(same.train_blocks, dm.train_blocks) and not torch.equal(other.train_blocks, dm.train_blocks)


def test_training_order_is_seeded(tmp_path):
    _write_docs(tmp_path)
    firsts = []
    for seed in (0, 0, 1):
        dm = TextBlocksDataModule(str(tmp_path), block_size=16, batch_size=4, seed=seed)
        dm.setup("fit")
        loader = dm.train_dataloader()
        epoch1 = next(iter(loader))["input_ids"]
        loader.sampler.set_epoch(1)  # as the Trainer does at each epoch start
        epoch2 = next(iter(loader))["input_ids"]
        assert not torch.equal(epoch1, epoch2)  # a new order every epoch...
        firsts.append(epoch1)
    assert torch.equal(firsts[0], firsts[1]) and not torch.equal(firsts[0], firsts[2])  # ...fixed by the seed
    assert torch.equal(next(iter(dm.val_dataloader()))["input_ids"], dm.val_blocks[:4])  # validation in order


def test_errors_say_what_to_do(tmp_path):
    with pytest.raises(FileNotFoundError, match="matches no file.*HINT"):
        TextBlocksDataModule(str(tmp_path / "missing")).setup()
    (tmp_path / "tiny.txt").write_text("too short")
    with pytest.raises(ValueError, match="fewer than one block.*lower block_size"):
        TextBlocksDataModule(str(tmp_path / "tiny.txt"), block_size=64).setup()
    with pytest.raises(RuntimeError, match="call datamodule.setup"):
        TextBlocksDataModule(str(tmp_path)).train_dataloader()
    with pytest.raises(ValueError, match="val_fraction"):
        TextBlocksDataModule(val_fraction=0.0)


def test_embedded_corpus_blocks_use_the_corpus_split():
    python_text_corpus()  # built (and cached) first, so the timing below is tokenisation only
    dm = TextBlocksDataModule("python", block_size=128, batch_size=4)
    start = time.perf_counter()
    dm.setup("fit")
    seconds = time.perf_counter() - start
    val_docs = [d for d in python_text_corpus() if d.split == "validation"]
    assert val_docs and 200_000 < dm.train_blocks.numel() + dm.val_blocks.numel()
    assert 0.02 < len(dm.val_blocks) / len(dm.train_blocks) < 0.12
    first_val = dm.tokenizer.decode(dm.val_blocks[0][:8])
    assert first_val.split()[0] in val_docs[0].text.lower()
    assert seconds < 30, f"tokenising the embedded corpus took {seconds:.1f} s"
    batch = next(iter(dm.train_dataloader()))
    assert batch["input_ids"].shape == (4, 128) and torch.equal(batch["labels"], batch["input_ids"])


def test_hf_dataset_without_the_datasets_package(monkeypatch):
    monkeypatch.setitem(sys.modules, "datasets", None)  # makes `import datasets` fail
    dm = TextBlocksDataModule(hf_dataset="wikitext", hf_config="wikitext-2-raw-v1")
    with pytest.raises(DatasetUnavailableError, match=r"pip install datasets.*source="):
        dm.prepare_data()


def test_hf_dataset_offline_fails_clearly():
    pytest.importorskip("datasets")
    dm = TextBlocksDataModule(hf_dataset="lit-lowrank-tests/no-such-dataset")
    start = time.perf_counter()
    with pytest.raises(DatasetUnavailableError, match=r"hub is unreachable.*HINT: use local files"):
        dm.setup("fit")
    assert time.perf_counter() - start < 20


def test_hf_dataset_rows_become_documents(monkeypatch):
    datasets = pytest.importorskip("datasets")
    rows = {"train": [" ".join(WORDS * 3) + f" {i}" for i in range(20)], "validation": [" ".join(WORDS * 4)]}
    loaded = datasets.DatasetDict({k: datasets.Dataset.from_dict({"body": v}) for k, v in rows.items()})
    calls = []
    monkeypatch.setattr(datasets, "load_dataset", lambda name, config: calls.append((name, config)) or loaded)
    dm = TextBlocksDataModule(hf_dataset="some/corpus", hf_config="raw", text_field="body", block_size=16)
    dm.setup("fit")
    assert calls == [("some/corpus", "raw")]
    assert len(dm.val_blocks) == (len(dm.tokenizer.encode(rows["validation"][0], add_special_tokens=False)) + 1) // 16
    with pytest.raises(KeyError, match="no column 'text'.*text_field"):
        TextBlocksDataModule(hf_dataset="some/corpus").setup()


def test_max_vocab_keeps_the_most_frequent_training_tokens(tmp_path):
    _write_docs(tmp_path)
    full = TextBlocksDataModule(str(tmp_path), block_size=16, batch_size=4)
    full.setup("fit")
    small = TextBlocksDataModule(str(tmp_path), block_size=16, batch_size=4, max_vocab=12)
    small.setup("fit")
    assert small.vocab_size == 12 and int(small.train_blocks.max()) < 12 and int(small.val_blocks.max()) < 12
    # an independent count of the training tokens: the 11 most frequent (ties by id) keep their identity
    counts = torch.bincount(full.train_blocks.flatten(), minlength=full.vocab_size)
    expected = sorted(range(len(counts)), key=lambda i: (-int(counts[i]), i))[:11]
    assert small.kept_token_ids[1:].tolist() == expected
    restored = small.kept_token_ids[small.train_blocks]
    kept = small.train_blocks != 0
    assert torch.equal(restored[kept], full.train_blocks[kept])
    with pytest.raises(ValueError, match="max_vocab"):
        TextBlocksDataModule(str(tmp_path), max_vocab=1)
