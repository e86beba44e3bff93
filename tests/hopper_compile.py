"""Compile Triton kernels ahead of time for an sm_90 (Hopper) GPU on a machine without one.

The interpreter that runs the kernel tests on CPU never lowers a kernel to GPU code, so a config that does not
compile, or does not fit in shared memory, would only show on a GPU. :func:`compile_for_hopper` runs a script
(:data:`PREAMBLE` + the caller's body) in a fresh interpreter without ``TRITON_INTERPRET``; the body calls
``compile_(fn, types, constexprs, num_warps, num_stages)`` and prints ``compiled`` at the end. When this Triton
cannot compile for sm_90 at all (its API or bundled ptxas), the test is skipped with the reason.
"""
import os
import subprocess
import sys

import pytest

PREAMBLE = r"""
import sys
import triton
import triton.language as tl
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource

def compile_(fn, types, constexprs, num_warps=4, num_stages=1):
    names = fn.arg_names
    signature = {name: types.get(name, "constexpr") for name in names}
    attrs = {(i,): [["tt.divisibility", 16]] for i, name in enumerate(names) if types.get(name, "").startswith("*")}
    src = ASTSource(fn=fn, signature=signature,
                    constexprs={(names.index(k),): v for k, v in constexprs.items()}, attrs=attrs)
    return triton.compile(src, target=GPUTarget("cuda", 90, 32),
                          options={"num_warps": num_warps, "num_stages": num_stages})

@triton.jit
def copy(x_ptr, y_ptr, n, BLOCK: tl.constexpr):
    offs = tl.arange(0, BLOCK)
    tl.store(y_ptr + offs, tl.load(x_ptr + offs, mask=offs < n), mask=offs < n)

try:  # the toolchain itself (this Triton's API, its bundled ptxas)
    compile_(copy, {"x_ptr": "*fp32", "y_ptr": "*fp32", "n": "i32"}, {"BLOCK": 64})
except Exception as error:
    print(f"cannot compile for sm_90 here: {type(error).__name__}: {error}")
    sys.exit(3)
"""


def compile_for_hopper(tmp_path, body: str, timeout: float) -> None:
    """Run :data:`PREAMBLE` + ``body`` as a script; skip if the toolchain cannot target sm_90, else require success."""
    script = tmp_path / "compile_for_hopper.py"  # triton.jit needs its kernels in a file
    script.write_text(PREAMBLE + body)
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["TRITON_CACHE_DIR"] = str(tmp_path / "cache")
    done = subprocess.run([sys.executable, str(script)], env=env, capture_output=True, text=True, timeout=timeout)
    if done.returncode == 3:
        pytest.skip(done.stdout.strip())
    assert done.returncode == 0, done.stdout + done.stderr
    assert "compiled" in done.stdout
