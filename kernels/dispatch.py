"""When to run a Triton kernel instead of the torch reference, and how to fall back without crashing.

Every optimizer with a kernel takes ``use_triton`` (``"auto"``, ``True`` or ``False``) and asks
:func:`should_use_kernel` once per step and tensor stack:

- ``False``: always the torch path.
- ``"auto"``: the kernel for CUDA tensors (when Triton works), the torch path everywhere else.
- ``True``: the kernel wherever it can run: CUDA tensors, or CPU tensors under Triton's interpreter
  (``TRITON_INTERPRET=1`` set before the kernel module is imported; that is how the tests run kernels).

When the kernel cannot run (Triton missing or broken, CPU tensors without the interpreter, a dtype the
kernel does not take) the torch path runs instead, with **one** :class:`KernelFallbackWarning` per
kernel and reason per process (``"auto"`` on CPU is the normal case and does not warn). Nothing here
raises except for an invalid ``use_triton`` value.

A kernel module is a file next to this one that imports triton at its top and defines
``INTERPRETED = built_by_interpreter(its_kernel)`` (CPU tensors are sent to it only when True).
Tests set ``TRITON_INTERPRET=1`` before importing it (``tests/kernels/conftest.py``); see
:func:`built_by_interpreter` for kernels that call ``tl.sum``-like helpers. Adding one (``lora_pre_adam.py``
is wired this way from ``lit_lowrank.optim.lora_pre_adam_update``, with ``undo=`` as its step is two launches)::

    from lit_lowrank.kernels.dispatch import run_with_fallback, should_use_kernel

    def my_update(x, state, use_triton=False):
        if should_use_kernel(use_triton, x, kernel="lora_pre_adam"):
            done = run_with_fallback("lora_pre_adam", lambda mod: mod.fused_update(x, state))
            if done is not None:
                return done
        return torch_update(x, state)  # the reference

Launches must stay free of host syncs (no ``.item()``, grid sizes from shapes only) so a step can be
captured in a CUDA graph once the kernel has been compiled and autotuned by a first, uncaptured call.
"""
from __future__ import annotations

import functools
import importlib
import warnings
from typing import Callable, Optional, Sequence, TypeVar, Union

import torch

__all__ = [
    "KernelFallbackWarning",
    "UseTriton",
    "built_by_interpreter",
    "fallback_warning",
    "load_kernel_module",
    "run_with_fallback",
    "should_use_kernel",
    "triton_available",
    "validate_use_triton",
]

UseTriton = Union[str, bool]
T = TypeVar("T")

#: (kernel, cause) pairs already warned about in this process.
_warned: set[tuple[str, str]] = set()
#: Kernels whose module failed to import or whose first launch raised: torch from then on.
_broken: dict[str, str] = {}
#: Kernels that completed a launch in this process: later errors are real errors and propagate.
_verified: set[str] = set()


class KernelFallbackWarning(UserWarning):
    """A Triton kernel was asked for but the torch reference runs instead (same results, slower)."""


def validate_use_triton(value: object) -> UseTriton:
    """``value`` if it is ``"auto"``, ``True`` or ``False``, else a ValueError naming the choices."""
    if value == "auto" or isinstance(value, bool):
        return value  # type: ignore[return-value]
    raise ValueError(f"use_triton must be 'auto', True or False, got {value!r}")


@functools.cache
def triton_available() -> bool:
    """Whether ``import triton`` works (cached; any exception, not only ImportError, counts as broken)."""
    try:
        import triton  # noqa: F401
    except Exception:  # a half-installed triton can fail with OSError/RuntimeError as well
        return False
    return True


def fallback_warning(kernel: str, cause: str, detail: str) -> None:
    """Warn once per process and ``(kernel, cause)`` that ``kernel`` falls back to torch; ``detail`` says why."""
    if (kernel, cause) in _warned:
        return
    _warned.add((kernel, cause))
    warnings.warn(f"lit_lowrank: Triton kernel {kernel!r} is not used, the torch path runs instead: {detail}",
                  KernelFallbackWarning, stacklevel=3)


def load_kernel_module(kernel: str):
    """``lit_lowrank.kernels.<kernel>``, or None (and one warning) when it (or triton) cannot be imported."""
    if kernel in _broken:
        return None
    if not triton_available():
        _broken[kernel] = "triton cannot be imported. HINT: pip install triton (Linux x86_64), or use_triton=False."
        fallback_warning(kernel, "broken", _broken[kernel])
        return None
    try:
        return importlib.import_module(f"lit_lowrank.kernels.{kernel}")
    except Exception as error:
        _broken[kernel] = f"importing lit_lowrank.kernels.{kernel} failed ({type(error).__name__}: {error})"
        fallback_warning(kernel, "broken", _broken[kernel])
        return None


def built_by_interpreter(fn: object, uses_triton_helpers: bool = False) -> bool:
    """True when ``fn`` (a ``triton.jit`` function, possibly autotuned) runs in Triton's CPU interpreter.

    Triton reads ``TRITON_INTERPRET`` when a function is *decorated*: a kernel module imported before the
    variable was set is compiled for the GPU. Triton's own jitted helpers (``tl.zeros``, ``tl.sum``,
    ``tl.max``... in ``triton.language.standard``) are decorated when triton itself is imported, which
    ``import lightning`` already does; a kernel that calls them (``uses_triton_helpers=True``) runs in the
    interpreter only if the variable was set before that, e.g. at the top of the tests' root conftest.
    """
    from triton.runtime.interpreter import InterpretedFunction

    while not isinstance(fn, InterpretedFunction) and hasattr(fn, "fn"):
        fn = fn.fn
    if not isinstance(fn, InterpretedFunction):
        return False
    if uses_triton_helpers:
        import triton.language.standard as helpers

        return isinstance(helpers.zeros, InterpretedFunction)
    return True


def should_use_kernel(use_triton: UseTriton, *tensors: torch.Tensor, kernel: str,
                      dtypes: Optional[Sequence[torch.dtype]] = (torch.float32,)) -> bool:
    """Whether ``kernel`` should run on ``tensors`` (all on one device) under ``use_triton``.

    ``dtypes`` are the dtypes the kernel accepts (None: any). Returns False, warning once, where the
    kernel was asked for (``True``, or ``"auto"`` on CUDA) but cannot run; never raises for that.
    """
    use_triton = validate_use_triton(use_triton)
    if use_triton is False or not tensors:
        return False
    on_cuda = all(t.is_cuda for t in tensors)
    if use_triton == "auto" and not on_cuda:
        return False
    if any(type(t) not in (torch.Tensor, torch.nn.Parameter) for t in tensors):  # DTensor and other wrappers
        if use_triton is True:
            found = sorted({type(t).__name__ for t in tensors} - {"Tensor", "Parameter"})
            fallback_warning(kernel, "subclass", f"it takes plain tensors, got {found}")
        return False
    if dtypes is not None and any(t.dtype not in dtypes for t in tensors):
        if use_triton is True:
            found = sorted({str(t.dtype) for t in tensors})
            fallback_warning(kernel, "dtype", f"it takes {[str(d) for d in dtypes]}, got {found}")
        return False
    module = load_kernel_module(kernel)
    if module is None:
        return False
    if not on_cuda and not module.INTERPRETED:
        fallback_warning(kernel, "cpu", "use_triton=True on CPU tensors needs Triton's interpreter. HINT: set "
                                        "TRITON_INTERPRET=1 before lit_lowrank.kernels is imported (tests do), or run on CUDA.")
        return False
    return True


def run_with_fallback(kernel: str, launch: Callable[[object], T],
                      undo: Sequence[torch.Tensor] = ()) -> Optional[T]:
    """``launch(module)`` for the kernel module, or None (one warning) if it cannot be loaded or its first launch fails.

    Compilation happens inside the first launch, so a broken toolchain (no C compiler, ptxas errors)
    surfaces there: that launch must not have modified anything yet for the torch fallback to be
    exact, which holds for kernels that compile before they write (all Triton kernels; the first
    launch of an update is before any in-place write). After one success, errors propagate: they are
    bugs, not a missing toolchain.

    ``undo``: tensors ``launch`` may have updated in place before it fails, for a ``launch`` made of several
    kernels where a later one compiles after an earlier one wrote (e.g. ``lora_pre_adam``'s second pass).
    Only for the first, unverified launch they are copied beforehand and restored if it raises, so the torch
    fallback starts from the same values; verified launches copy nothing.
    """
    module = load_kernel_module(kernel)
    if module is None:
        return None
    if kernel in _verified:
        return launch(module)
    saved = [tensor.detach().clone() for tensor in undo]
    try:
        result = launch(module)
    except Exception as error:
        with torch.no_grad():
            for tensor, copy in zip(undo, saved):
                tensor.copy_(copy)
        _broken[kernel] = f"its first launch failed ({type(error).__name__}: {error})"
        fallback_warning(kernel, "broken", _broken[kernel])
        return None
    _verified.add(kernel)
    return result


def reset() -> None:
    """Forget cached availability, broken kernels and warnings (for tests that simulate a broken triton)."""
    triton_available.cache_clear()
    _warned.clear()
    _broken.clear()
    _verified.clear()
