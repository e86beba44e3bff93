"""The embedded corpus and the docstring-classification task: deterministic, split as documented, balanced."""
import hashlib
import subprocess
import sys
from collections import Counter

import pytest

from lit_lowrank.data import corpus
from lit_lowrank.data.corpus import (
    CORPUS_VALIDATION_FRACTION,
    DEFAULT_PACKAGES,
    corpus_fingerprint,
    docstring_classification,
    paragraphs,
    python_text_corpus,
    stable_fraction,
)

PINNED = 0.1285597106643376


def _reference_fraction(key: str) -> float:
    # Independent statement of the documented rule: first 8 bytes of SHA-256, big-endian, over 2**64.
    return int(hashlib.sha256(key.encode()).hexdigest()[:16], 16) / 2**64


def test_stable_fraction_is_the_documented_sha256_rule():
    for key in ["", "asyncio/events.py", "pydoc:if", "split:ünïcode"]:
        assert stable_fraction(key) == _reference_fraction(key)
    assert stable_fraction("pydoc:if") == PINNED  # any change of rule would move every split


def test_python_corpus_is_deterministic_ordered_and_split():
    docs = python_text_corpus()
    assert python_text_corpus() is docs  # built once per process (the fresh-interpreter test rebuilds it)
    ids = [d.source for d in docs]
    assert len(set(ids)) == len(ids)
    pydoc = [i for i in ids if i.startswith("pydoc:")]
    stdlib = [i for i in ids if i.startswith("stdlib:")]
    assert ids == pydoc + stdlib and pydoc == sorted(pydoc) and stdlib == sorted(stdlib)
    assert len(pydoc) > 50 and len(stdlib) > 400
    assert all(d.text.strip() for d in docs)
    assert not any(part in ("test", "tests", "site-packages") for i in stdlib for part in i.split("/")[:-1])
    assert "stdlib:json/decoder.py" in ids and "stdlib:asyncio/events.py" in ids
    for d in docs:
        expected = "validation" if _reference_fraction(d.source) < CORPUS_VALIDATION_FRACTION else "train"
        assert d.split == expected
    share = sum(d.split == "validation" for d in docs) / len(docs)
    assert 0.02 < share < 0.10
    assert sum(len(d.text) for d in docs) > 1_000_000  # megabytes of real English


def test_stdlib_document_holds_its_docstrings_in_source_order():
    doc = {d.source: d for d in python_text_corpus()}["stdlib:json/decoder.py"]
    # module docstring first, then the JSONDecodeError class docstring, then JSONDecoder's
    first, second = doc.text.index("Implementation of JSONDecoder"), doc.text.index("Subclass of ValueError")
    assert first == 0 and second < doc.text.index("Simple JSON <https://json.org> decoder")


def test_paragraphs_split_collapse_and_filter():
    text = ("One two three.\n\n  Four five six seven\n  eight nine ten.\n   \nShort one.\n\n"
            ">>> a = 1 + 2 + 3 + 4 + 5 + 6")
    assert paragraphs(text, min_words=4) == ["Four five six seven eight nine ten."]
    assert paragraphs(text, min_words=1)[:2] == ["One two three.", "Four five six seven eight nine ten."]


@pytest.fixture(scope="module")
def task():
    return docstring_classification()


def test_docstring_task_sizes_balance_and_chance(task):
    stats = task.stats()
    assert task.class_names == DEFAULT_PACKAGES and task.num_classes == 9
    assert stats["sizes"] == {"train": 630, "validation": 135, "test": 135}
    for split, per_class in {"train": 70, "validation": 15, "test": 15}.items():
        assert stats["counts"][split] == [per_class] * 9
        assert Counter(ex.label for ex in task.splits()[split]) == {i: per_class for i in range(9)}
        assert stats["majority_rate"][split] == pytest.approx(1 / 9)
    assert stats["chance"] == pytest.approx(1 / 9)


def test_docstring_task_splits_are_disjoint_and_follow_the_hash_rule(task):
    texts = {split: [ex.text for ex in examples] for split, examples in task.splits().items()}
    for items in texts.values():
        assert len(set(items)) == len(items)
    assert not set(texts["train"]) & set(texts["validation"])
    assert not set(texts["train"]) & set(texts["test"]) and not set(texts["validation"]) & set(texts["test"])
    bounds = {"train": (0.0, 0.7), "validation": (0.7, 0.85), "test": (0.85, 1.0)}
    for split, examples in task.splits().items():
        low, high = bounds[split]
        assert all(low <= _reference_fraction("split:" + ex.text) < high for ex in examples)
        order = [_reference_fraction("order:" + ex.text) for ex in examples]
        assert order == sorted(order)


def test_docstring_task_examples_are_prose_from_their_package(task):
    for examples in task.splits().values():
        for ex in examples:
            assert len(ex.text.split()) >= 8 and ">>>" not in ex.text and ex.text == " ".join(ex.text.split())
            assert ex.source.startswith(DEFAULT_PACKAGES[ex.label] + "/")
    # the source file really contains the paragraph's first words
    ex = task.train[0]
    path = corpus.stdlib_dir() / ex.source.split(":")[0]
    assert " ".join(ex.text.split()[:4]) in " ".join(path.read_text(encoding="utf-8").split())


def test_fingerprints_same_twice_and_in_a_fresh_interpreter(task):
    corpus._docstring_classification.cache_clear()
    rebuilt = docstring_classification(list(DEFAULT_PACKAGES))
    assert rebuilt is not task and rebuilt.fingerprint() == task.fingerprint()
    # corpus.py needs only the standard library: load it on its own, without the package (or torch)
    code = ("import importlib.util, sys; spec = importlib.util.spec_from_file_location('c', sys.argv[1]); "
            "m = importlib.util.module_from_spec(spec); sys.modules['c'] = m; spec.loader.exec_module(m); "
            "print(m.docstring_classification().fingerprint()); "
            "print(m.corpus_fingerprint(m.python_text_corpus())); print('torch' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code, corpus.__file__], capture_output=True, text=True, check=True)
    assert out.stdout.split() == [task.fingerprint(), corpus_fingerprint(python_text_corpus()), "False"]


def test_smaller_cap_keeps_a_prefix_of_every_split(task):
    small = docstring_classification(cap_per_class=40)
    assert small.stats()["sizes"] == {"train": 9 * 28, "validation": 9 * 6, "test": 9 * 6}
    for split, examples in small.splits().items():
        assert {ex.text for ex in examples} <= {ex.text for ex in task.splits()[split]}


def test_paragraph_shared_by_two_packages_is_dropped(monkeypatch, tmp_path):
    shared = "This paragraph is shared by the two packages word for word, so it is ambiguous."
    own = {"alpha": "Alpha has its own paragraph with enough words in it to count.",
           "beta": "Beta has its own paragraph with enough words in it to count too."}
    for package, text in own.items():
        (tmp_path / package / "test").mkdir(parents=True)
        (tmp_path / package / "m.py").write_text(f'"""{text}\n\n{shared}"""\n\ndef f():\n    """{text}"""\n')
        (tmp_path / package / "test" / "t.py").write_text(
            '"""Test folders are skipped even when they hold long prose."""')
    monkeypatch.setattr(corpus, "stdlib_dir", lambda: tmp_path)
    task = corpus._docstring_classification(("alpha", "beta"), 100, 8, (1.0, 0.0, 0.0))
    assert sorted((ex.text, ex.label, ex.source) for ex in task.train) == [
        (own["alpha"], 0, "alpha/m.py"), (own["beta"], 1, "beta/m.py")]


def test_docstring_task_errors_are_clear():
    with pytest.raises(ValueError, match="not a package folder.*HINT"):
        docstring_classification(("asyncio", "no_such_package"))
    with pytest.raises(ValueError, match="two or more distinct"):
        docstring_classification(("asyncio",))
    with pytest.raises(ValueError, match="summing to 1"):
        docstring_classification(fractions=(0.5, 0.2, 0.2))
