"""Command-line arguments the CLI rewrites before jsonargparse parses them.

jsonargparse 4.53 passes a value for a key inside a nested ``class_path`` (``--model.init_args.backbone.init_args.
name_or_path=null``) on as the text of the already-parsed value, so ``null`` became the string ``"None"`` (then 30 s
of hub retries for a model named "None"), and ``--model.init_args.lora.modules_to_save=null`` failed with a page of
Union errors. The same null inside a config file is parsed correctly, so it is given as one, in place.
"""
from __future__ import annotations

import json

#: YAML's spellings of null; "None" stays a string, as in YAML.
NULLS = frozenset({"null", "Null", "NULL", "~"})
#: The parts whose keys nest into class_paths and dataclasses; trainer.* values keep jsonargparse's own handling
#: (``--trainer.callbacks.monitor=null`` must reach the last callback of the list, which a config cannot address).
NESTED_PARTS = ("model.", "data.")


def with_nulls_as_configs(argv: list[str]) -> list[str]:
    """``argv`` with each ``--model.<key>=null`` / ``--data.<key> null`` replaced, in place, by the inline config
    ``--config '{"model": {...: null}}'`` that sets it.

    Example:
        >>> with_nulls_as_configs(["fit", "--model.init_args.backbone.init_args.name_or_path=null", "--x=null"])
        ['fit', '--config', '{"model": {"init_args": {"backbone": {"init_args": {"name_or_path": null}}}}}', '--x=null']
        >>> with_nulls_as_configs(["fit", "--data.init_args.test_file", "~"])
        ['fit', '--config', '{"data": {"init_args": {"test_file": null}}}']
    """
    rewritten, index = [], 0
    while index < len(argv):
        item = argv[index]
        key, separate = _null_key(item, argv[index + 1] if index + 1 < len(argv) else None)
        if key is None:
            rewritten.append(item)
        else:
            value: dict | None = None
            for part in reversed(key.split(".")):
                value = {part: value}
            rewritten += ["--config", json.dumps(value)]
            index += separate
        index += 1
    return rewritten


def _null_key(item: str, following: str | None) -> tuple[str | None, int]:
    """The dotted key ``item`` sets to null, and 1 when the null is the next argument; (None, 0) otherwise."""
    if not item.startswith(tuple(f"--{part}" for part in NESTED_PARTS)):
        return None, 0
    key, equals, value = item[2:].partition("=")
    if key.endswith(("+", ".help")):  # appending a null, or asking for help: not a value to set
        return None, 0
    if equals:
        return (key, 0) if value in NULLS else (None, 0)
    return (key, 1) if following in NULLS else (None, 0)
