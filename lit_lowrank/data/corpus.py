"""Real text that ships with Python: the pydoc topics, the standard library's docstrings and its source code.

Nothing is downloaded and no standard-library module is imported: source files are parsed with :mod:`ast`
(importing some modules has side effects). The material depends on the Python version, so every builder
here is deterministic for a given interpreter and exposes a ``fingerprint()`` to tell versions apart.

This module imports only the standard library, so it can be loaded by any Python 3.10+ on its own.

Splits are decided by :func:`stable_fraction`, a SHA-256 of a string id mapped to ``[0, 1)`` (never Python's
salted ``hash()``), so an item's split depends on its id alone: it never moves when other items are added,
removed or capped.
"""
from __future__ import annotations

import ast
import functools
import hashlib
import re
import sysconfig
from collections import Counter
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

#: Fraction of :func:`python_text_corpus` documents held out for validation (by stable hash of their id).
CORPUS_VALIDATION_FRACTION = 0.05

#: Standard-library packages of :func:`docstring_classification`: the ones with at least ~145 distinct docstring
#: paragraphs of >= 8 words on every CPython 3.10-3.13 (tkinter and idlelib have more, but are packaged
#: separately on Debian/Ubuntu, so they are left out of the default).
DEFAULT_PACKAGES: tuple[str, ...] = (
    "asyncio", "email", "http", "importlib", "logging", "multiprocessing", "unittest", "urllib", "xml",
)

#: The file of the standard library that holds the pydoc topics: data (one dict of prose), not code, so
#: :func:`python_source_corpus` has its topics once, as the prose documents of :func:`python_text_corpus`.
PYDOC_TOPICS_FILE = "pydoc_data/topics.py"

#: Folders below the standard library that are not library documentation.
_SKIPPED_DIRS = {"test", "tests", "idle_test", "site-packages", "dist-packages", "__pycache__"}

_DOCUMENTED = (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)


def stable_fraction(key: str) -> float:
    """A number in ``[0, 1)`` fixed by ``key`` on every machine and Python run (SHA-256, not ``hash()``).

    Example:
        >>> stable_fraction("asyncio/events.py") == stable_fraction("asyncio/events.py")
        True
        >>> 0.0 <= stable_fraction("anything") < 1.0
        True
    """
    digest = hashlib.sha256(key.encode("utf-8")).digest()
    return int.from_bytes(digest[:8], "big") / 2.0**64


def stdlib_dir() -> Path:
    """Folder of the running interpreter's standard-library sources (the base one, also inside a venv)."""
    return Path(sysconfig.get_paths()["stdlib"])


@dataclass(frozen=True)
class Document:
    """One text of the embedded corpus.

    Attributes:
        source: stable id, ``"pydoc:<topic>"`` or ``"stdlib:<path relative to the stdlib folder>"``.
        text: the text (docstrings of a file are joined by blank lines, in source order).
        split: ``"train"`` or ``"validation"`` (``stable_fraction(source) < CORPUS_VALIDATION_FRACTION``).
    """

    source: str
    text: str
    split: str


def _split_of(source: str, validation_fraction: float = CORPUS_VALIDATION_FRACTION) -> str:
    return "validation" if stable_fraction(source) < validation_fraction else "train"


def _pydoc_topics(root: Path) -> dict[str, str]:
    # Parsed rather than imported, like everything else here (and topics.py is a single dict literal).
    path = root / PYDOC_TOPICS_FILE
    for node in ast.parse(path.read_bytes()).body:
        if isinstance(node, ast.Assign) and any(getattr(t, "id", None) == "topics" for t in node.targets):
            return ast.literal_eval(node.value)
    raise RuntimeError(f"no `topics = {{...}}` dict found in {path}; this Python's pydoc_data has a new layout")


def _docstrings(node: ast.AST, prefix: str = "") -> Iterator[tuple[str, str]]:
    """(qualified name, docstring) of a module and its classes/functions, depth first in source order."""
    doc = ast.get_docstring(node) if isinstance(node, _DOCUMENTED) else None
    if doc:
        yield prefix, doc
    for child in ast.iter_child_nodes(node):
        if isinstance(child, (ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)):
            yield from _docstrings(child, f"{prefix}.{child.name}" if prefix else child.name)
        elif not isinstance(child, _DOCUMENTED):
            yield from _docstrings(child, prefix)


@functools.cache
def _file_docstrings(path: str) -> tuple[tuple[str, str], ...]:
    try:
        tree = ast.parse(Path(path).read_bytes())
    except (SyntaxError, ValueError, UnicodeDecodeError):
        return ()  # a few test-data files are deliberately not valid Python 3
    return tuple(_docstrings(tree))


def _stdlib_files(package: str | None = None, root: Path | None = None) -> list[tuple[str, Path]]:
    """(posix path relative to the stdlib folder, path) of its .py files, sorted, test folders left out."""
    root = root or stdlib_dir()
    base = root / package if package else root
    files = []
    for path in base.rglob("*.py"):
        rel = path.relative_to(root)
        if _SKIPPED_DIRS.isdisjoint(rel.parts[:-1]) and not any("-" in part for part in rel.parts[:-1]):
            files.append((rel.as_posix(), path))
    return sorted(files)


def python_text_corpus() -> tuple[Document, ...]:
    """The pydoc topics (sorted by name) then one document per standard-library file (sorted by path).

    About 2.3 MB of English (with code snippets) on CPython 3.11; about 5 s to build the first time, cached
    afterwards. ``Document.split`` is the fixed train/validation split (~5% of documents for validation).

    Example:
        >>> docs = python_text_corpus()
        >>> docs[0].source.startswith("pydoc:"), {d.split for d in docs} == {"train", "validation"}
        (True, True)
    """
    return _python_text_corpus(str(stdlib_dir()))


@functools.cache
def _python_text_corpus(root: str) -> tuple[Document, ...]:
    # Cached per folder (not once per process), so a test pointing stdlib_dir() elsewhere gets its own corpus.
    documents = [Document(f"pydoc:{name}", text.strip(), _split_of(f"pydoc:{name}"))
                 for name, text in sorted(_pydoc_topics(Path(root)).items()) if text.strip()]
    for rel, path in _stdlib_files(root=Path(root)):
        text = "\n\n".join(doc for _, doc in _file_docstrings(str(path)))
        if text:
            documents.append(Document(f"stdlib:{rel}", text, _split_of(f"stdlib:{rel}")))
    return tuple(documents)


def source_split_key(doc_id: str) -> str:
    """What decides the split of a document of :func:`python_source_corpus`: the path of its file relative to the
    stdlib folder, shared by the file's code (``source:<path>``) and its docstrings (``stdlib:<path>``); a pydoc
    topic's own id.

    Example:
        >>> source_split_key("source:json/decoder.py"), source_split_key("stdlib:json/decoder.py")
        ('json/decoder.py', 'json/decoder.py')
        >>> source_split_key("pydoc:if")
        'pydoc:if'
    """
    kind, _, rest = doc_id.partition(":")
    return rest if kind in ("source", "stdlib") else doc_id


def python_source_corpus() -> tuple[Document, ...]:
    """The standard library's own Python source, one document per ``.py`` file (id ``source:<path>``, sorted by
    path), then the documents of :func:`python_text_corpus` (pydoc topics and docstrings, as English prose).

    Test folders (``test/``, ``tests/``, ``idle_test/``) and installed packages (``site-packages``) are left out,
    as in :func:`python_text_corpus`, and so is ``pydoc_data/topics.py``: it is the pydoc topics as one dict
    literal, which the prose documents hold already (split topic by topic). Source is read as UTF-8 (undecodable
    bytes would become U+FFFD).

    The split is by file: a document goes to validation when ``stable_fraction(source_split_key(id)) <
    CORPUS_VALIDATION_FRACTION``, i.e. by the hash of its file's path relative to the stdlib folder, so a
    file's code and its docstrings (which are also inside its code) are always on the same side; a pydoc topic
    keeps its split of :func:`python_text_corpus`. About 11.4 MB of code plus 2.3 MB of prose on CPython 3.11
    (732 files); a few seconds to build, cached afterwards.

    Example:
        >>> docs = python_source_corpus()
        >>> docs[0].source.startswith("source:"), {d.split for d in docs} == {"train", "validation"}
        (True, True)
    """
    return _python_source_corpus(str(stdlib_dir()))


@functools.cache
def _python_source_corpus(root: str) -> tuple[Document, ...]:
    documents = []
    for rel, path in _stdlib_files(root=Path(root)):
        text = path.read_bytes().decode("utf-8", errors="replace")
        if rel != PYDOC_TOPICS_FILE and text.strip():
            documents.append(Document(f"source:{rel}", text, _split_of(rel)))
    prose = [Document(doc.source, doc.text, _split_of(source_split_key(doc.source)))
             for doc in _python_text_corpus(root)]
    return tuple(documents + prose)


def corpus_fingerprint(documents: Sequence[Document]) -> str:
    """SHA-256 (hex, 16 characters) over the documents' ids, splits and texts, in order."""
    sha = hashlib.sha256()
    for doc in documents:
        for part in (doc.source, doc.split, doc.text):
            sha.update(part.encode("utf-8") + b"\0")
    return sha.hexdigest()[:16]


@dataclass(frozen=True)
class LabelledText:
    """One example: ``text`` of class ``label`` (an index into the task's ``class_names``), from ``source``."""

    text: str
    label: int
    source: str


@dataclass(frozen=True)
class TextClassificationSplits:
    """A labelled text task in three fixed splits.

    Attributes:
        class_names: name of each label id.
        train, validation, test: the examples of each split.
    """

    class_names: tuple[str, ...]
    train: tuple[LabelledText, ...]
    validation: tuple[LabelledText, ...]
    test: tuple[LabelledText, ...]

    @property
    def num_classes(self) -> int:
        return len(self.class_names)

    def splits(self) -> dict[str, tuple[LabelledText, ...]]:
        return {"train": self.train, "validation": self.validation, "test": self.test}

    def fingerprint(self) -> str:
        """SHA-256 (hex, 16 characters) over class names and every split's labels and texts, in order."""
        sha = hashlib.sha256("\0".join(self.class_names).encode("utf-8"))
        for name, examples in self.splits().items():
            sha.update(f"\1{name}\1".encode())
            for ex in examples:
                sha.update(f"{ex.label}\0{ex.text}\0".encode())
        return sha.hexdigest()[:16]

    def stats(self) -> dict[str, object]:
        """Examples per class in each split, the chance level ``1/num_classes`` and each split's majority-class rate."""
        counts = {name: [Counter(ex.label for ex in examples)[i] for i in range(self.num_classes)]
                  for name, examples in self.splits().items()}
        return {
            "class_names": list(self.class_names),
            "counts": counts,
            "sizes": {name: len(examples) for name, examples in self.splits().items()},
            "chance": 1.0 / self.num_classes,
            "majority_rate": {name: max(c) / max(sum(c), 1) for name, c in counts.items()},
        }


def paragraphs(docstring: str, min_words: int = 8) -> list[str]:
    """Paragraphs (split on blank lines) with whitespace collapsed, keeping those of ``>= min_words`` words and
    no doctest prompt (``>>>``: code rather than prose).

    Example:
        >>> paragraphs("Short.\\n\\nA longer paragraph that spans\\n    two lines of prose text.", min_words=5)
        ['A longer paragraph that spans two lines of prose text.']
    """
    kept = []
    for block in re.split(r"\n[ \t]*\n", docstring):
        text = " ".join(block.split())
        if len(text.split()) >= min_words and ">>>" not in text:
            kept.append(text)
    return kept


def docstring_classification(
    packages: Sequence[str] = DEFAULT_PACKAGES,
    cap_per_class: int = 100,
    min_words: int = 8,
    fractions: tuple[float, float, float] = (0.7, 0.15, 0.15),
) -> TextClassificationSplits:
    """Which standard-library package does this docstring paragraph come from?

    Recipe (deterministic for a given Python version):

    1. every docstring of every ``.py`` file under ``<stdlib>/<package>/`` (test folders excluded) is split into
       paragraphs on blank lines; paragraphs of fewer than ``min_words`` words or with ``>>>`` are dropped;
    2. duplicates are removed; a paragraph found in two or more packages is dropped altogether (its label would
       be ambiguous);
    3. each paragraph goes to train/validation/test by ``stable_fraction("split:" + text)`` against
       ``fractions``, so its split never depends on the other paragraphs or on the cap;
    4. each class keeps at most ``round(cap * fraction)`` paragraphs per split (validation and test rounded,
       train the rest), the first in ``stable_fraction("order:" + text)`` order, which is also the order of
       every split.

    Label ids follow the order of ``packages``. With the defaults on CPython 3.10-3.13 every class has
    70/15/15 examples: 630/135/135 in all, 9 classes, chance level and majority-class rate both 1/9 = 11.1%.
    Some paragraphs name their package (``asyncio``, ``logger``...), so a few examples are easy.

    Args:
        packages: standard-library package folders, one class each.
        cap_per_class: most examples per class over the three splits.
        min_words: shortest paragraph kept, in whitespace-separated words.
        fractions: train, validation and test shares (sum to 1).

    Example:
        >>> task = docstring_classification(("json", "http"), cap_per_class=20)
        >>> task.class_names, task.stats()["sizes"]
        (('json', 'http'), {'train': 28, 'validation': 6, 'test': 6})
    """
    return _docstring_classification(tuple(packages), cap_per_class, min_words, tuple(fractions))


@functools.lru_cache(maxsize=16)
def _docstring_classification(
    packages: tuple[str, ...], cap_per_class: int, min_words: int, fractions: tuple[float, ...]
) -> TextClassificationSplits:
    if len(packages) < 2 or len(set(packages)) != len(packages):
        raise ValueError(f"docstring_classification needs two or more distinct packages, got {list(packages)}")
    if len(fractions) != 3 or abs(sum(fractions) - 1.0) > 1e-6 or min(fractions) < 0:
        raise ValueError(f"fractions are (train, validation, test) shares summing to 1, got {fractions}")
    found: dict[str, dict[str, str]] = {}  # package -> paragraph -> source
    for package in packages:
        if not (stdlib_dir() / package).is_dir():
            raise ValueError(f"{package!r} is not a package folder of this Python's standard library "
                             f"({stdlib_dir()}). HINT: choose from e.g. {list(DEFAULT_PACKAGES)}")
        kept: dict[str, str] = {}
        for rel, path in _stdlib_files(package):
            for qualname, doc in _file_docstrings(str(path)):
                for text in paragraphs(doc, min_words):
                    kept.setdefault(text, f"{rel}:{qualname}" if qualname else rel)
        if not kept:
            raise ValueError(f"package {package!r} has no docstring paragraph of >= {min_words} words")
        found[package] = kept
    owners = Counter(text for kept in found.values() for text in kept)
    cut_val = fractions[0]
    cut_test = fractions[0] + fractions[1]
    caps = {"validation": round(cap_per_class * fractions[1]), "test": round(cap_per_class * fractions[2])}
    caps["train"] = cap_per_class - caps["validation"] - caps["test"]
    splits: dict[str, list[tuple[float, LabelledText]]] = {"train": [], "validation": [], "test": []}
    for label, package in enumerate(packages):
        buckets: dict[str, list[tuple[float, LabelledText]]] = {"train": [], "validation": [], "test": []}
        for text, source in found[package].items():
            if owners[text] > 1:
                continue
            where = stable_fraction("split:" + text)
            split = "train" if where < cut_val else "validation" if where < cut_test else "test"
            buckets[split].append((stable_fraction("order:" + text), LabelledText(text, label, source)))
        for split, items in buckets.items():
            splits[split].extend(sorted(items, key=lambda item: item[0])[:caps[split]])
    ordered = {split: tuple(ex for _, ex in sorted(items, key=lambda item: item[0])) for split, items in splits.items()}
    return TextClassificationSplits(packages, ordered["train"], ordered["validation"], ordered["test"])
