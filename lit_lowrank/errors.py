"""Errors that say which configured value a run cannot use and how to fix it.

Raised where the problem is found (a data module's ``setup``, a backbone), wherever the run was started: in Python it
is an ordinary ``ValueError``; ``lit-lowrank`` / ``python cli.py`` print it as one ``error:`` line and exit with
status 2 instead of a traceback, like a configuration error found while parsing.
"""
from __future__ import annotations


class ConfigurationError(ValueError):
    """A configured value this run cannot use; the message names the key and ends with a ``HINT:`` to fix it.

    Example:
        >>> try:
        ...     raise ConfigurationError("data.init_args.image_size=100, but the model takes 224. HINT: unset it")
        ... except ValueError as error:
        ...     print(type(error).__name__, "-", error)
        ConfigurationError - data.init_args.image_size=100, but the model takes 224. HINT: unset it
    """
