"""The runnable examples in public docstrings stay runnable (every module of the package, kernels included)."""
import doctest
import importlib
import os
import pkgutil

import pytest

# Kernel examples run on CPU tensors, through Triton's interpreter; it must be on before a kernel module is imported
# (as in tests/kernels/conftest.py). A run that sets it to 0 (natively, on a GPU) keeps its setting.
os.environ.setdefault("TRITON_INTERPRET", "1")

import lit_lowrank.kernels  # noqa: E402  (binds lit_lowrank too)

# lit_lowrank.kernels lives in kernels/ (a package-dir mapping), outside lit_lowrank's own folder: walked on its own.
KERNEL_MODULES = ["lit_lowrank.kernels"] + [
    info.name for info in pkgutil.walk_packages(lit_lowrank.kernels.__path__, prefix="lit_lowrank.kernels.")]
MODULES = sorted(info.name for info in pkgutil.walk_packages(lit_lowrank.__path__, prefix="lit_lowrank.")) + sorted(
    KERNEL_MODULES)
#: Kernel modules that import triton at their top (the dispatcher and the batched-launch glue do not).
NEEDS_TRITON = [name for name in KERNEL_MODULES if name not in (
    "lit_lowrank.kernels", "lit_lowrank.kernels.dispatch", "lit_lowrank.kernels.batched_launch")]


@pytest.mark.parametrize("name", MODULES)
def test_docstring_examples(name):
    if name in NEEDS_TRITON:
        pytest.importorskip("triton", reason="the kernel modules import triton")
    module = importlib.import_module(name)
    result = doctest.testmod(module, optionflags=doctest.ELLIPSIS | doctest.NORMALIZE_WHITESPACE)
    assert result.failed == 0, f"{result.failed} docstring example(s) failed in {name}"


def test_the_kernel_modules_are_collected():
    assert {"lit_lowrank.kernels.dispatch", "lit_lowrank.kernels.lora_pro_full",
            "lit_lowrank.kernels.lora_pre_adam"} <= set(MODULES)
