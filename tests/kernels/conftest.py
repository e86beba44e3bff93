"""Kernel tests run Triton's interpreter on CPU tensors: TRITON_INTERPRET must be set before any kernel is imported.

Triton reads the variable when a kernel is decorated (its module is imported), so it is set here, at
collection time, before the tests import ``lit_lowrank.kernels.*``. Tests that need triton skip with
the import error as reason when it cannot be imported (see ``needs_triton`` in the test modules).
"""
import os

os.environ.setdefault("TRITON_INTERPRET", "1")
