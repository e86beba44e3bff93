"""How the kernel self-check compares a kernel's outputs with the torch reference's (used by :mod:`.dispatch`).

Pure functions and the tolerances: which error of an output still counts as rounding, the fp32-matmul context the
reference runs in, and the worst output of a launch. The dispatcher decides when to check and what to do with a
failure; this module imports nothing from the project and does not import triton.

Example::

    >>> import torch
    >>> from lit_lowrank.kernels.output_check import output_error
    >>> output_error(torch.tensor([1.0, 2.0]), torch.tensor([1.0, 2.0 + 1e-7]))[0] < 1e-6
    True
"""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Sequence

import torch

__all__ = ["CHECK_RTOL", "CHECK_ULPS", "finite_max", "fp32_matmuls", "output_error", "restore", "tensors",
           "worst_output"]

#: Self-check tolerance per dot precision the dispatcher runs: the largest error of an output, relative to its
#: magnitude (to its displacement for state updated in place), that still counts as rounding. With fp32 products
#: (``ieee``) the kernel tests, run with the check forced, stay below 1e-4 (LoRA-Pre's W after a few steps: its
#: update divides by sqrt(v), which rounding in nearly cancelling entries of m and v reaches); ``tf32x3`` products
#: are ~8x less precise than fp32 FMAs (2^-21 against 2^-24), hence 10x margin for both. An indexing or masking
#: bug is off by far more. Plain tf32 (benchmarks only, never dispatched) would need ~1e-2.
CHECK_RTOL = {"ieee": 1e-3, "tf32x3": 1e-3}
#: bf16 / fp16 outputs are rounded last, so an fp32 rounding difference can flip them by one ulp: allowed, no more.
CHECK_ULPS = 1.0


def output_error(got: torch.Tensor, want: torch.Tensor, scale: torch.Tensor | None = None,
                 rtol: float = CHECK_RTOL["ieee"]) -> tuple[float, float, str]:
    """``(error, tolerance, unit)`` of one kernel output against the reference's; it passes if error <= tolerance.

    fp32: the largest difference over ``scale`` (default ``max |want|``: entries near 0 carry absolute error, as in
    the tests' ``close``), tolerance ``rtol``. bf16 / fp16: the largest difference in ulps of ``want``, tolerance
    :data:`CHECK_ULPS`. Equal entries (the same NaN or inf included) count 0, any other non-finite difference inf.
    """
    got, want = got.detach(), want.detach()
    same = (got == want) | (got.isnan() & want.isnan())
    if want.dtype in (torch.bfloat16, torch.float16):
        ulp = torch.finfo(want.dtype).eps * want.float().abs().clamp_min(torch.finfo(want.dtype).tiny)
        diff, tolerance, unit = (got.float() - want.float()).abs() / ulp, CHECK_ULPS, "ulps"
    else:
        scale = finite_max(want) if scale is None else scale
        diff, tolerance, unit = (got - want).abs() / scale.clamp_min(torch.finfo(want.dtype).tiny), rtol, "relative"
    diff = torch.nan_to_num(torch.where(same, 0.0, diff), nan=float("inf"))
    return (float(diff.max()) if diff.numel() else 0.0), tolerance, unit


def finite_max(values: torch.Tensor) -> torch.Tensor:
    """The largest finite ``|value|`` (0 for none), as a tensor: the scale of an output's error."""
    magnitude = values.detach().abs()
    return torch.where(magnitude.isfinite(), magnitude, 0.0).max() if magnitude.numel() else magnitude.new_zeros(())


_precision_lock = threading.Lock()
_precision_users = [0, "highest"]  # threads inside fp32_matmuls, the precision to restore after the last one


@contextlib.contextmanager
def fp32_matmuls():
    """torch's fp32 matmuls in fp32 (not TF32 / bf16, which ``set_float32_matmul_precision`` may allow): the
    reference of the self-check must be more precise than the kernel's tf32x3. Counted, for threads (test ranks)."""
    with _precision_lock:
        if _precision_users[0] == 0:
            _precision_users[1] = torch.get_float32_matmul_precision()
            torch.set_float32_matmul_precision("highest")
        _precision_users[0] += 1
    try:
        yield
    finally:
        with _precision_lock:
            _precision_users[0] -= 1
            if _precision_users[0] == 0:
                torch.set_float32_matmul_precision(_precision_users[1])


def tensors(result: object) -> list[torch.Tensor]:
    """The tensors a launch returned: one tensor, or those of a tuple / list."""
    if isinstance(result, torch.Tensor):
        return [result]
    if isinstance(result, (tuple, list)):
        return [t for t in result if isinstance(t, torch.Tensor)]
    return []


def worst_output(names: Sequence[str], got: Sequence[torch.Tensor], want: Sequence[torch.Tensor],
                 scales: Sequence[torch.Tensor | None], rtol: float) -> tuple[str, float, float, str] | None:
    """``(name, error, tolerance, unit)`` of the output furthest past its tolerance, or None if all pass."""
    worst = None  # (excess over the tolerance, name, error, tolerance, unit)
    for name, value, expected, scale in zip(names, got, want, scales):
        error, tolerance, unit = output_error(value, expected, scale, rtol)
        if not error <= tolerance and (worst is None or error / tolerance > worst[0]):
            worst = (error / tolerance, name, error, tolerance, unit)
    return None if worst is None else worst[1:]


def restore(state: Sequence[torch.Tensor], values: Sequence[torch.Tensor]) -> None:
    """Copy ``values`` back into ``state`` (in place, without autograd)."""
    with torch.no_grad():
        for tensor, value in zip(state, values):
            tensor.copy_(value)
