r"""The one rule for name patterns, wherever a user names modules or parameters.

It serves ``LoRAConfig(target_modules=..., exclude_modules=..., modules_to_save=...)`` and
``lowrank_param_groups(include=..., exclude=...)``:

- a string is a regular expression that must match the **whole** name (``re.fullmatch``, as PEFT does):
  ``r".*\.q_proj"`` selects ``model.layers.0.self_attn.q_proj``, ``"q_proj"`` alone does not;
- a list holds exact names or name suffixes that start after a ``.``: ``["q_proj"]`` selects
  ``model.layers.0.self_attn.q_proj`` but not ``model.layers.0.self_attn.kq_proj``.
"""
from __future__ import annotations

import re
from collections.abc import Sequence

#: A regex over whole names, a list of names or name suffixes, or None (selects nothing).
Pattern = str | Sequence[str] | None


def name_matches(name: str, pattern: Pattern) -> bool:
    r"""Whether ``pattern`` selects ``name`` (the rule: module docstring).

    Example:
        >>> name = "model.layers.0.self_attn.q_proj"
        >>> name_matches(name, ["q_proj"]), name_matches(name, r".*\.q_proj"), name_matches(name, "q_proj")
        (True, True, False)
    """
    if pattern is None:
        return False
    if isinstance(pattern, str):
        return re.fullmatch(pattern, name) is not None
    return any(name == key or name.endswith("." + key) for key in pattern)
