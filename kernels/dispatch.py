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
:func:`built_by_interpreter` for kernels that call ``tl.sum``-like helpers.

Both optimizers wire their kernels the same way, in ``lit_lowrank.optim`` (kernel modules import nothing from it):
a function beside the torch path (``kernel_passes`` in ``lit_lowrank.optim.lora_pre.adam_kernel``, one
:func:`run_with_fallback` per pass of a batch; ``_kernel_projections`` in ``lit_lowrank.optim.lora_pro.update``)
checks eligibility with :func:`should_use_kernel`, defines the ``launch`` and its torch ``reference``, keys a
:class:`SelfCheck` and calls :func:`run_with_fallback`; it returns None when the torch path must run. Its shape::

    def _kernel_update(use_triton, x, state):
        if not should_use_kernel(use_triton, x, state, kernel=KERNEL):
            return None
        check = SelfCheck(key=(f"x {tuple(x.shape)}",), state=[state],
                          reference=lambda copies: torch_update(x, copies[0]), names=["state"])
        return run_with_fallback(KERNEL, lambda kernel: kernel.fused_update(x, state), check=check)

A launch that writes its inputs and can fail after writing (several kernels in one launch function) passes
``undo=``: the tensors to restore if it fails to compile. LoRA-Pre Adam's two passes are dispatched one by one
instead: only the first writes, and a failure of the second hands that pass, which writes nothing, to torch.

Launches must stay free of host syncs (no ``.item()``, grid sizes from shapes only) so a step can be
captured in a CUDA graph once the kernel has been compiled and autotuned by a first, uncaptured call.

**Self-check.** The kernels are tested in the interpreter, which runs numpy, not the code a GPU compiles. So on
the first call per :class:`SelfCheck` key (kernel, shapes, strides, dtypes, constexpr options, dot precision)
:func:`run_with_fallback` also runs the torch reference on copies of the state and compares every output (see
:func:`output_error`). Beyond :data:`CHECK_RTOL` it warns once for that key, keeps the torch result for the call
and runs torch for that key from then on; other keys keep the kernel. ``LIT_LOWRANK_KERNEL_CHECK`` (or
:func:`set_kernel_check`): ``auto`` (default: on GPUs, off in the interpreter, where the tests compare kernel
and torch themselves and a silent fallback would hide a kernel bug from them), ``1`` (also in the interpreter)
or ``0`` (never). The first call, already uncapturable (compilation, autotuning), then also holds one copy of
the state and syncs with the host once.
"""
from __future__ import annotations

import functools
import importlib
import os
import warnings
from collections.abc import Callable, Hashable, Sequence
from dataclasses import dataclass
from typing import TypeVar

import torch

from lit_lowrank.kernels.output_check import (
    CHECK_RTOL,
    CHECK_ULPS,
    finite_max,
    fp32_matmuls,
    output_error,
    restore,
    tensors,
    worst_output,
)

__all__ = [
    "CHECK_ENV",
    "CHECK_RTOL",
    "CHECK_ULPS",
    "GPU_DOT_PRECISION",
    "KernelFallbackWarning",
    "SelfCheck",
    "UseTriton",
    "built_by_interpreter",
    "dot_precision",
    "fallback_warning",
    "load_kernel_module",
    "output_error",
    "run_with_fallback",
    "set_kernel_check",
    "should_use_kernel",
    "triton_available",
    "validate_use_triton",
    "verified",
]

UseTriton = str | bool
T = TypeVar("T")

#: (kernel, cause) pairs already warned about in this process.
_warned: set[tuple[str, str]] = set()
#: Kernels whose module failed to import or whose first launch raised: torch from then on.
_broken: dict[str, str] = {}
#: Kernels that completed a launch in this process: later errors are real errors and propagate.
_verified: set[str] = set()
#: Self-checked keys: True passed (the kernel runs), False failed (torch runs for that key).
_checked: dict[Hashable, bool] = {}
#: set_kernel_check's override of CHECK_ENV (None: the variable decides).
_check_override: UseTriton | None = None

#: fp32 ``tl.dot`` precision of every kernel on NVIDIA GPUs. Triton's default there is ``tf32`` (inputs rounded to
#: 10 mantissa bits, ~5e-4 relative), which the interpreter does not model: it multiplies in fp32 whatever is asked,
#: so tf32 errors would first show on a GPU. ``tf32x3`` (three tf32 products on tensor cores) is within a few fp32
#: ulps of fp32 FMAs, i.e. what the CPU tests check, at 3x tf32's cost; both kernels stay memory-bound with it up to
#: r ~ 40-66 on an H100 (see each kernel's ``dot_precision``). ``ieee`` (fp32 FMAs) elsewhere: the interpreter,
#: AMD (HIP has no tf32x3).
GPU_DOT_PRECISION = "tf32x3"
#: Environment variable of the self-check: "auto" (default), "1" or "0"; see the module docstring.
CHECK_ENV = "LIT_LOWRANK_KERNEL_CHECK"
_ON, _OFF = ("1", "true", "on", "yes"), ("0", "false", "off", "no")


class KernelFallbackWarning(UserWarning):
    """A Triton kernel was asked for but the torch reference runs instead (same results, slower)."""


def validate_use_triton(value: object, owner: str | None = None, *, missing_kernel: str | None = None) -> UseTriton:
    """``value`` if it is ``"auto"``, ``True`` or ``False``, else a ValueError naming the choices (and ``owner``).

    ``missing_kernel`` is for an optimizer that accepts ``use_triton`` for symmetry but has no kernel (LoRA-Pre Muon
    has no kernel): there ``True`` cannot be honoured, so it warns once per process (:class:`KernelFallbackWarning`,
    keyed by ``missing_kernel``, as for any kernel that cannot run) and the torch path runs, as under ``"auto"``.
    """
    if not (value == "auto" or isinstance(value, bool)):
        where = f"{owner}: invalid" if owner else "invalid"
        raise ValueError(f"{where} use_triton {value!r}; expected 'auto', True or False.")
    if missing_kernel is not None and value is True:
        fallback_warning(missing_kernel, "none", f"{owner or 'this optimizer'} has no Triton kernel. HINT: "
                         "use_triton='auto' or False say the same without this warning.")
    return value  # type: ignore[return-value]


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
                      dtypes: Sequence[torch.dtype] | None = (torch.float32,)) -> bool:
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
                                        "TRITON_INTERPRET=1 before lit_lowrank.kernels is imported (tests do), or run "
                                        "on CUDA.")
        return False
    return True


def dot_precision(device: torch.device, interpreted: bool = False) -> str:
    """The fp32 ``tl.dot`` precision kernels use on ``device``: :data:`GPU_DOT_PRECISION` on NVIDIA, else ``ieee``."""
    if interpreted or device.type != "cuda" or torch.version.hip:
        return "ieee"
    return GPU_DOT_PRECISION


@dataclass(frozen=True)
class SelfCheck:
    """How :func:`run_with_fallback` checks a kernel's first call per ``key`` against the torch reference.

    ``key``: what the kernel was compiled and autotuned for (shapes, strides, dtypes, constexpr options; the
    dispatcher adds the kernel and the dot precision). ``state``: the tensors the step updates in place.
    ``reference(copies)``: the torch path on copies of ``state`` (updated in place), returning what ``launch``
    returns. ``names``: of ``state``'s tensors, then of the returned ones (for the warning).
    """

    key: Hashable
    state: Sequence[torch.Tensor]
    reference: Callable[[list[torch.Tensor]], object]
    names: Sequence[str] = ()


def set_kernel_check(value: UseTriton | None) -> None:
    """Self-check on (``True``, also in the interpreter), off (``False``), ``"auto"``, or None: as :data:`CHECK_ENV`
    says."""
    global _check_override
    if value is not None:
        validate_use_triton(value)
    _check_override = value


def _check_enabled(interpreted: bool) -> bool:
    setting = _check_override if _check_override is not None else os.environ.get(CHECK_ENV, "auto").strip().lower()
    if setting is True or setting in _ON:
        return True
    if setting is False or setting in _OFF:
        return False
    if setting != "auto":
        raise ValueError(f"{CHECK_ENV}={os.environ.get(CHECK_ENV)!r} is not understood. HINT: set it to 1 (check each "
                         "kernel's first call per shape against torch, also in the interpreter), 0 (never) or auto.")
    return not interpreted


def _checked_launch(kernel: str, module, launch: Callable[[object], T], check: SelfCheck, key: Hashable,
                    precision: str) -> T:
    """The first call for ``key``: the reference on copies (which then hold its result), then the kernel, compared."""
    copies = [t.detach().clone() for t in check.state]
    with torch.no_grad(), fp32_matmuls():
        expected = check.reference(copies)
        # In-place state is compared by its displacement: a weight hardly moves in a step, so relative to its
        # magnitude a wrong update would look like rounding. Taken now, before the kernel overwrites the state.
        scales = [finite_max(after - before) for after, before in zip(copies, check.state)]
    try:
        result = launch(module)
    except Exception as error:
        if kernel in _verified:
            raise  # a bug, not a missing toolchain (see run_with_fallback)
        _mark_broken(kernel, error)
        restore(check.state, copies)
        return expected  # type: ignore[return-value]
    _verified.add(kernel)
    rtol = CHECK_RTOL.get(precision, CHECK_RTOL["ieee"])
    outputs = list(zip(tensors(result), tensors(expected)))
    n, named = len(copies), list(check.names)
    names = named[:n] + [f"state[{i}]" for i in range(len(named), n)]
    names += named[n:] + [f"output[{i}]" for i in range(len(named[n:]), len(outputs))]
    worst = worst_output(names, [*check.state, *(g for g, _ in outputs)], [*copies, *(w for _, w in outputs)],
                         [*scales, *(None for _ in outputs)], rtol)
    _checked[key] = worst is None
    if worst is None:
        return result
    name, error, tolerance, unit = worst
    fallback_warning(kernel, f"check {key}", (
        f"its first call for {', '.join(map(str, key[1:-1]))} differs from the torch reference: {name} is off by "
        f"{error:.1e} {unit} (tolerance {tolerance:.0e}, {precision} dots). This call keeps the torch result and "
        f"torch runs for this key from now on (other shapes keep the kernel). HINT: please report this message; "
        f"use_triton=False skips the kernel, {CHECK_ENV}=0 skips this check and keeps the kernel."))
    restore(check.state, copies)
    return expected  # type: ignore[return-value]


def _mark_broken(kernel: str, error: Exception) -> None:
    """A kernel's first launch raised: torch from now on, with one warning."""
    _broken[kernel] = f"its first launch failed ({type(error).__name__}: {error})"
    fallback_warning(kernel, "broken", _broken[kernel])


def run_with_fallback(kernel: str, launch: Callable[[object], T],
                      undo: Sequence[torch.Tensor] = (), check: SelfCheck | None = None) -> T | None:
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

    ``check``: the self-check of the module docstring (when enabled). On the first call per key the reference's
    copies replace ``undo``; for a key that failed it, this returns None (the caller runs torch) without launching.
    """
    module = load_kernel_module(kernel)
    if module is None:
        return None
    if check is not None and _check_enabled(module.INTERPRETED):
        precision = dot_precision(check.state[0].device, module.INTERPRETED)
        key = (kernel, *(check.key if isinstance(check.key, tuple) else (check.key,)), precision)
        if key not in _checked:
            return _checked_launch(kernel, module, launch, check, key, precision)
        if not _checked[key]:
            return None
    if kernel in _verified:
        return launch(module)
    saved = [tensor.detach().clone() for tensor in undo]
    try:
        result = launch(module)
    except Exception as error:
        restore(undo, saved)
        _mark_broken(kernel, error)
        return None
    _verified.add(kernel)
    return result


def verified(kernel: str) -> bool:
    """Whether ``kernel`` completed a launch in this process (its later failures are bugs, and propagate)."""
    return kernel in _verified


def reset() -> None:
    """Forget cached availability, broken kernels and warnings (for tests that simulate a broken triton)."""
    triton_available.cache_clear()
    _warned.clear()
    _broken.clear()
    _verified.clear()
    _checked.clear()
