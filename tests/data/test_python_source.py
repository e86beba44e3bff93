"""Byte-level tokenizer and the standard-library source corpus of TextBlocksDataModule (tokenizer="bytes",
source="python-source"): ids, separators, the by-file split, the left-out folders."""
import pytest
import torch

from lit_lowrank.data import ByteTokenizer, TextBlocksDataModule, corpus, python_source_corpus
from lit_lowrank.data.corpus import source_split_key, stable_fraction


def test_byte_tokenizer_round_trips_utf8_and_ends_documents():
    tok = ByteTokenizer()
    text = "def f(x):\n    return 'ünï'  # ✓\n"
    ids = tok(text, add_special_tokens=False)["input_ids"]
    assert ids == list(text.encode("utf-8")) and max(ids) < 256 and len(tok) == 257
    assert tok.decode(ids) == text
    assert tok([text, "a"], add_special_tokens=True)["input_ids"] == [ids + [256], [97, 256]]
    assert tok.decode([97, 256, 98]) == "ab" and tok.decode([97, 256], skip_special_tokens=False) == "a<|endoftext|>"
    assert tok.decode(torch.tensor([0xE2, 0x9C])) == "\ufffd"  # a character cut by the end of a generation
    stream = tok.stream(["ab", "", "é"])
    assert stream.dtype == torch.long and stream.tolist() == [97, 98, 256, 256, 0xC3, 0xA9, 256]


def test_bytes_tokenizer_option_of_the_text_blocks(tmp_path):
    texts = {f"doc{i:02d}.txt": f"document {i}: " + "the quick brown fox. " * 10 for i in range(12)}
    for name, text in texts.items():
        (tmp_path / name).write_text(text)
    dm = TextBlocksDataModule(str(tmp_path), tokenizer="bytes", block_size=32, batch_size=4, val_fraction=0.25)
    dm.setup("fit")
    assert dm.vocab_size == 257 and isinstance(dm.tokenizer, ByteTokenizer)
    held_out = [name for name in texts if stable_fraction(name) < 0.25]
    assert held_out  # the split is by file, not the fallback of a stream tail
    expected = b"".join(texts[name].encode() + b"\0" for name in texts if name not in held_out)
    stream = dm.train_blocks.flatten()
    # bytes as ids, EOS (256) between documents: the training blocks are the training files in order
    assert bytes(0 if i == 256 else i for i in stream.tolist()) == expected[: len(stream)]
    assert dm.codec.eos_token_id == 256 and dm.codec.decode(dm.val_blocks[0].tolist()).startswith("document ")
    batch = next(iter(dm.train_dataloader()))
    assert batch["input_ids"].shape == (4, 32) and int(batch["input_ids"].max()) <= 256


def _fake_stdlib(root, modules=40):
    """A tree like the standard library's: modules with docstrings, test folders, site-packages, pydoc topics."""
    for i in range(modules):
        path = root / (f"pkg{i % 3}/mod{i:02d}.py" if i % 2 else f"mod{i:02d}.py")
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(f'"""Docstring of module {i}: marker-doc-{i}."""\n\nCODE_{i} = {i}  # marker-code-{i}\n')
    for folder in ("test", "pkg1/tests", "idlelib/idle_test", "site-packages/thing"):
        (root / folder).mkdir(parents=True, exist_ok=True)
        (root / folder / "left_out.py").write_text('"""marker-excluded docstring."""\nX = 1  # marker-excluded\n')
    (root / "pydoc_data").mkdir()
    (root / "pydoc_data" / "topics.py").write_text("topics = {'if': 'The if statement: marker-topic-if.',\n"
                                                   "          'for': 'The for statement: marker-topic-for.'}\n")


@pytest.fixture
def fake_stdlib(tmp_path, monkeypatch):
    _fake_stdlib(tmp_path)
    monkeypatch.setattr(corpus, "stdlib_dir", lambda: tmp_path)
    return tmp_path


def test_source_corpus_is_code_plus_prose_split_by_file(fake_stdlib):
    docs = python_source_corpus()
    ids = [doc.source for doc in docs]
    code = [i for i in ids if i.startswith("source:")]
    assert code == sorted(code) and len(code) == 40 and ids[:40] == code  # the code first, sorted by path
    assert {"stdlib:mod00.py", "stdlib:pkg1/mod01.py", "pydoc:if", "pydoc:for"} <= set(ids)
    assert not any("left_out" in i for i in ids) and "source:pydoc_data/topics.py" not in ids
    assert all("marker-excluded" not in doc.text for doc in docs)
    for doc in docs:  # split by the file's path relative to the stdlib folder (a topic: by its id)
        key = doc.source.split(":", 1)[1] if doc.source.split(":")[0] in ("source", "stdlib") else doc.source
        assert source_split_key(doc.source) == key
        assert doc.split == ("validation" if stable_fraction(key) < 0.05 else "train")
    by_file = {}
    for doc in docs:
        by_file.setdefault(source_split_key(doc.source), set()).add(doc.split)
    assert all(len(splits) == 1 for splits in by_file.values())  # a file's code and docstrings: one side


def test_python_source_blocks_keep_each_file_on_one_side(fake_stdlib):
    dm = TextBlocksDataModule("python-source", tokenizer="bytes", block_size=16, batch_size=4, val_fraction=0.3)
    dm.setup("fit")
    train, val = (dm.tokenizer.decode(blocks.flatten()) for blocks in (dm.train_blocks, dm.val_blocks))
    paths = [f"pkg{i % 3}/mod{i:02d}.py" if i % 2 else f"mod{i:02d}.py" for i in range(40)]
    held_out = {i for i, path in enumerate(paths) if stable_fraction(path) < 0.3}
    assert 0 < len(held_out) < 40
    found = 0
    for i in range(40):
        for marker in (f"marker-doc-{i}.", f"marker-code-{i}\n"):
            wrong, right = (train, val) if i in held_out else (val, train)
            assert marker not in wrong, f"module {i} is on both sides"
            found += marker in right
    assert found >= 76  # all but a cut-off block tail at the end of each split
    assert "marker-excluded" not in train + val
    assert train.count("marker-topic-if") + val.count("marker-topic-if") == 1  # topics once, as prose


def test_real_python_source_corpus_in_bytes():
    dm = TextBlocksDataModule("python-source", tokenizer="bytes", block_size=256, batch_size=4)
    dm.setup("fit")
    tokens = dm.train_blocks.numel() + dm.val_blocks.numel()
    assert 8e6 < tokens < 30e6  # ~13.7M on CPython 3.11
    assert 0.01 < dm.val_blocks.numel() / tokens < 0.12
    assert dm.vocab_size == 257 and int(dm.train_blocks.max()) == 256
