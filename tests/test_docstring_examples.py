"""The runnable examples in public docstrings stay runnable (every module of the package)."""
import doctest
import importlib
import pkgutil

import pytest

import lit_lowrank

# lit_lowrank.kernels lives in kernels/ (package-dir mapping), outside this walk: tests/kernels covers it.
MODULES = sorted(info.name for info in pkgutil.walk_packages(lit_lowrank.__path__, prefix="lit_lowrank."))


@pytest.mark.parametrize("name", MODULES)
def test_docstring_examples(name):
    module = importlib.import_module(name)
    result = doctest.testmod(module, optionflags=doctest.ELLIPSIS | doctest.NORMALIZE_WHITESPACE)
    assert result.failed == 0, f"{result.failed} docstring example(s) failed in {name}"
