"""Hugging Face datasets by name, folder or local data files, with split slicing, and errors that say what failed.

A dataset that cannot be loaded fails for one of several reasons, and each gets its own message: the ``datasets``
package is missing; a folder holds a loading script, which ``datasets`` 4 and later no longer run; a data file
does not parse; a data file or split does not exist; or the hub is unreachable (the only case reported as such).
"""
from __future__ import annotations

from pathlib import Path
from typing import Any


class DatasetUnavailableError(OSError):
    """A dataset could not be loaded (the hub is unreachable, or the ``datasets`` package is missing)."""


def load_hf_splits(name: str, config: str | None = None, data_files: Any = None,
                   splits: dict[str, str] | None = None, hint: str = "use local files instead") -> dict[str, Any]:
    """``{split: datasets.Dataset}``: the dataset's own splits, or with ``splits`` (``{ours: theirs}``) the ones
    named there, where ``theirs`` may slice (``"train[:90%]"``, ``"train[90%:]"``).

    Args:
        name: hub name, local folder, or a packaged builder (``"json"``, ``"csv"``, ``"parquet"``) for data_files.
        config: the dataset's configuration name.
        data_files: local files, as ``datasets.load_dataset(data_files=...)`` takes them (a path, a list, or
            ``{split: path or list}``).
        splits: which splits to load, under which of our names.
        hint: what to do instead, ending the message when the hub is unreachable.

    Example:
        >>> import json, os, tempfile
        >>> path = os.path.join(tempfile.mkdtemp(), "rows.jsonl")
        >>> _ = open(path, "w").write("\\n".join(json.dumps({"text": str(i)}) for i in range(10)))
        >>> loaded = load_hf_splits("json", data_files=path, splits={"train": "train[:80%]",
        ...                                                          "validation": "train[80%:]"})
        >>> {split: rows.num_rows for split, rows in loaded.items()}
        {'train': 8, 'validation': 2}
    """
    try:
        import datasets
    except ImportError as error:
        raise DatasetUnavailableError(f"hf_dataset={name!r} needs the `datasets` package, which is not installed. "
                                      f"HINT: `pip install datasets`, or {hint}") from error
    options: dict[str, Any] = {}
    if data_files is not None:
        options["data_files"] = data_files
    if splits:
        options["split"] = list(splits.values())
    try:
        loaded = datasets.load_dataset(name, config, **options)
    except Exception as error:  # datasets raises ConnectionError, FileNotFoundError, DatasetNotFoundError, ...
        raise _explained(error, name, config, data_files, hint) from error
    return dict(zip(splits, loaded)) if splits else dict(loaded)


def _explained(error: Exception, name: str, config: str | None, data_files: Any, hint: str) -> Exception:
    files = f", data_files {data_files!r}" if data_files else ""
    what = f"the Hugging Face dataset {name!r} (config {config!r}{files})"
    text = str(error).splitlines()[0][:300] if str(error) else type(error).__name__
    if "scripts are no longer supported" in text:
        return ValueError(
            f"could not load {what}: it has a loading script ({text}), which the installed `datasets` no longer runs. "
            "HINT: load its data files instead (hf_dataset: json, csv or parquet with hf_data_files: <files>), or "
            "convert them to .jsonl/.csv and use train_file=...")
    if _is_parse_error(error):
        cause = error.__cause__ or error.__context__ or error
        detail = (str(cause).splitlines() or [""])[0][:300]
        return ValueError(f"could not read (parse) the data files of {what}: {type(cause).__name__}: {detail}. "
                          "HINT: fix the file (a .jsonl file holds one JSON object per line), or read it with "
                          "train_file=..., which skips bad rows and lists them")
    if isinstance(error, ValueError) and ("split" in text.lower() or "instruction format" in text):
        return KeyError(f"{what}: {text}. HINT: fix hf_splits: each value names a split of the dataset, optionally "
                        "sliced, e.g. {train: 'train[:90%]', validation: 'train[90%:]'}")
    if isinstance(error, FileNotFoundError) and (data_files is not None or Path(name).exists()):
        return FileNotFoundError(f"could not load {what}: {text} (working directory: {Path.cwd()}). HINT: check "
                                 "the paths in hf_dataset / hf_data_files")
    return DatasetUnavailableError(
        f"could not load {what}: the dataset hub is unreachable from here, the name is wrong, or it is not in the "
        f"local cache ({type(error).__name__}: {text[:200]}). HINT: {hint}")


def _is_parse_error(error: BaseException) -> bool:
    try:
        from datasets.exceptions import DatasetGenerationError
    except ImportError:  # an older datasets
        return False
    return isinstance(error, DatasetGenerationError)
