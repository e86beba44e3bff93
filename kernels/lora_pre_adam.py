"""Fused LoRA-Pre Adam passes: a batch of L same-shape matrices' parameter updates and the factors' skinny
products, in two launches whatever L is.

A leaf: this module imports torch, triton, :mod:`lit_lowrank.kernels.dispatch`,
:mod:`lit_lowrank.kernels.batched_launch` (the host-side glue of a batched launch: pointer tables, their checks,
scratch buffers) and :mod:`lit_lowrank.kernels.lora_pre_adam_jit` (the kernels and their tilings, with the two
passes' arithmetic in its docstring) only; it holds the autotuning glue and the two launchers. The step around the
two passes (pseudo-inverses, factor updates, the skip flag, FSDP2 sums) is the optimizer's
(``lit_lowrank.optim.lora_pre``), which calls :func:`first_pass` and :func:`second_pass` as its Triton backend and
checks them against its torch backends. ``m_t`` and ``v_t`` are formed a register tile at a time and never
stored. Pass 1 (``_first_pass``) updates W and returns ``[g A_pinv^T, |g| V_A_pinv^T]``; pass 2
(``_second_pass``, reads only ``g``) returns ``[B_pinv g, V_B_pinv |g|]``; each sums its split-K partials with one
``torch.sum``.

**Batching.** The fp32 factors and pseudo-inverses arrive stacked (``(2, L, ...)``: the optimizer batches its
r x r work too), so a program finds its layer's by an offset. The parameters and gradients are the model's own,
separate tensors, which must not be copied into a stack (that would double the traffic of a memory-bound
step): the kernels take *pointer tables*, (L,) int64 tensors of their addresses on the device, load their layer's
entry and cast it to a pointer of W's (G's) dtype. All L share one dtype and one stride pair (per role), as the
kernels are specialised on them. A table is cached per tuple of addresses
(:func:`~lit_lowrank.kernels.batched_launch.pointer_table`): parameters never move, gradients rarely do, so a
steady state builds none; a new one is copied from pinned memory without a host sync. The addresses' 16-byte
alignment, which Triton sees for tensor arguments but not for a loaded pointer, is passed as a constexpr and
restored with ``tl.multiple_of``, so the loads of W and g stay vectorised.

Memory traffic, and why Jacobi runs the same two passes: docs/design.md.

The configs tried on GPU differ only in the tile size that does not reduce (BLOCK_M in pass 1, BLOCK_N in
pass 2), warps and stages; the reduction tiling is fixed, so the slots and the order in which they are summed do
not depend on the config autotuning picks (bitwise equality across configs is not verified on a GPU: the MMA
instructions may differ with the tile). The autotune key leaves L out (the layer axis does not change a program's
work). Autotuning times the first pass by running it, i.e. by updating W: :func:`_autotune_pre_hook` and
:func:`_autotune_post_hook` put the L parameters back after each timing run, so the real launch finds them
untouched. Launches need no host sync (grids from shapes only). The step's scalars are kernel arguments (Python
floats), or, for the optimizer's device-side skip, computed in-kernel in fp64 from each layer's step count and
finite flag in device memory (``lora_pre_adam_jit._step_scalars``, the optimizer's ``adam_step_tensors`` line by
line); then a skipped layer's W is not stored, and nothing is read on the host. ``lr`` and the betas stay kernel
arguments, so a CUDA graph captured around a step would freeze them.

The kernels call only Triton builtins, so ``TRITON_INTERPRET=1`` need only be set before this module is imported.
"""
from __future__ import annotations

import threading
from collections.abc import Sequence

import torch
import triton

from lit_lowrank.kernels.batched_launch import Scratch, allocate, fp32_stack, pointer_batch
from lit_lowrank.kernels.dispatch import built_by_interpreter
from lit_lowrank.kernels.dispatch import dot_precision as _dot_precision
from lit_lowrank.kernels.lora_pre_adam_jit import (
    FIRST_PASS_CONFIGS,
    FIRST_PASS_REDUCTION,
    INTERPRETER_FIRST,
    INTERPRETER_SECOND,
    MAX_BLOCK_R,
    MAX_TILE_TIMES_RANK,
    SECOND_PASS_CONFIGS,
    SECOND_PASS_REDUCTION,
    TL_DTYPES,
    UNUSED_INPUTS,
    _first_pass,
    _second_pass,
)

__all__ = ["INTERPRETED", "dot_precision", "first_pass", "second_pass"]


def _prune_first(configs, named_args, **kwargs):
    """Triton's ``early_config_prune`` hook: ``named_args`` are the positional arguments, ``kwargs`` the rest."""
    return _fitting(configs, "BLOCK_M", {**named_args, **kwargs}["R_PAD"])


def _prune_second(configs, named_args, **kwargs):
    return _fitting(configs, "BLOCK_N", {**named_args, **kwargs}["R_PAD"])


def _fitting(configs, block: str, r_pad: int):
    """Configs whose accumulators fit (BLOCK x R_PAD <= MAX_TILE_TIMES_RANK), at least the smallest tile."""
    smallest = min(c.kwargs[block] for c in configs)
    return [c for c in configs if c.kwargs[block] * r_pad <= MAX_TILE_TIMES_RANK or c.kwargs[block] == smallest]


#: The parameters of the first pass being launched in this thread, and their copies while autotuning times it:
#: the kernel reaches W through a pointer table, which Triton's ``restore_value`` cannot see through.
_launching = threading.local()


def _autotune_pre_hook(kwargs, reset_only=False):
    """Before each timing run: copy the parameters once (the first run finds them as the caller left them)."""
    if not reset_only and getattr(_launching, "copies", None) is None:
        _launching.copies = [param.clone() for param in _launching.params]


def _autotune_post_hook(kwargs, exception):
    """After each timing run (also a failed one): the parameters as they were, so the real launch starts there."""
    for param, copy in zip(_launching.params, _launching.copies or (), strict=False):
        param.copy_(copy)


INTERPRETED = built_by_interpreter(_first_pass) and built_by_interpreter(_second_pass)
# L is left out of the keys: the layer axis adds programs, not work per program. The dtypes of W and g are
# constexprs, not tensor arguments, so they are named (Triton keys on tensor arguments' dtypes by itself).
_first_autotuned = None if INTERPRETED else triton.autotune(
    configs=FIRST_PASS_CONFIGS, key=["p", "q", "r", "DOT_PRECISION", "W_DTYPE", "G_DTYPE"],
    pre_hook=_autotune_pre_hook, post_hook=_autotune_post_hook,
    prune_configs_by={"early_config_prune": _prune_first},
)(_first_pass)
_second_autotuned = None if INTERPRETED else triton.autotune(
    configs=SECOND_PASS_CONFIGS, key=["p", "q", "r", "DOT_PRECISION", "G_DTYPE"],
    prune_configs_by={"early_config_prune": _prune_second},
)(_second_pass)


def dot_precision(device: torch.device) -> str:
    """Default fp32 ``tl.dot`` precision: ``tf32x3`` (fp32-level, on tensor cores) on NVIDIA, ``ieee`` elsewhere.

    A step does 12 r flops per weight entry (four K = r products in pass 1, two in pass 2) against 16 bytes of
    traffic (fp32 W and g) or 8 (bf16). On an H100 SXM (3.35 TB/s) that stays memory-bound up to r ~ 27 / 13 with
    fp32 FMAs (``ieee``, 67 TFLOP/s), r ~ 66 / 33 with ``tf32x3`` (three tf32 products, ~165 TFLOP/s effective)
    and r ~ 200 / 100 with plain ``tf32`` (495 TFLOP/s), by datasheet arithmetic. ``tf32x3`` is the default as it
    keeps fp32-level agreement with the torch path; ``tf32`` rounds the factors and ``g`` to 10 mantissa bits
    (~1e-3 relative) in ``m``, ``v`` and the factor updates. The GPU benchmark reports both. One choice for all
    kernels: :func:`lit_lowrank.kernels.dispatch.dot_precision`.
    """
    return _dot_precision(device, INTERPRETED)


def _r_pad(r: int) -> int:
    return max(16, triton.next_power_of_2(r))


def _step_arguments(host_scalars, device_step, layers: int, unused: torch.Tensor):
    """The first pass's step arguments: ``(steps, oks, (rho, -step_size, eps_hat, floor), inputs, constexprs)``.

    Off the device-side step the count and flag pointers are never read (``unused`` stands in for them) and
    neither are the in-kernel inputs; on it, the host scalars are unused."""
    if (host_scalars is None) == (device_step is None):
        raise ValueError("first_pass: exactly one of host_scalars and device_step")
    if device_step is None:
        rho, step_size, eps_hat, floor = host_scalars
        constants = dict(FLOOR=floor != 0.0, STEP_ON_DEVICE=False, DEBIAS=False, BOUND=0)
        return unused, unused, (rho, -step_size, eps_hat, floor), UNUSED_INPUTS, constants
    steps, oks, inputs, debias, bound = device_step
    if len(inputs) != len(UNUSED_INPUTS):
        raise ValueError(f"device_step: {len(UNUSED_INPUTS)} float inputs expected, got {len(inputs)}")
    # One entry per layer, read at ``ptr + layer``: contiguous (a no-op for the optimizer's stacked counts).
    steps, oks = steps.reshape(layers).contiguous(), oks.reshape(layers).contiguous().view(torch.uint8)
    constants = dict(FLOOR=int(bound) != 0, STEP_ON_DEVICE=True, DEBIAS=bool(debias), BOUND=int(bound))
    return steps, oks, (0.0, 0.0, 0.0, 0.0), tuple(float(x) for x in inputs), constants


def first_pass(params: Sequence[torch.Tensor], grads: Sequence[torch.Tensor], left: torch.Tensor,
               right: torch.Tensor, right_pinvs: torch.Tensor, *, kappa: float, decay: float | None,
               host_scalars: tuple[float, float, float, float] | None = None,
               device_step: tuple[torch.Tensor, torch.Tensor, Sequence[float], bool, int] | None = None,
               precision: str | None = None, scratch: Scratch | None = None) -> torch.Tensor:
    """Update the L ``params`` in place and return ``[g A_pinv^T, |g| V_A_pinv^T]``, ``(2, L, p, r)`` fp32.

    ``params``, ``grads``: L p x q matrices (each role one dtype among fp32/bf16/fp16 and one stride pair);
    ``left``: ``(2, L, p, r)`` = ``[B, V_B]``; ``right``, ``right_pinvs``: ``(2, L, r, q)`` = ``[A, V_A]``,
    ``[A_pinv, V_A_pinv]``, all fp32. ``decay``: ``1 - lr * weight_decay`` (None: no weight decay). Exactly one of
    ``host_scalars`` = ``(rho, step_size, eps_hat, floor)`` (floor 0: no bound), shared by the layers, and
    ``device_step`` = ``(steps, oks, inputs, debias, bound)``: (L,) fp32 step counts and (L,) bool flags on the
    device, the ten float fields of the optimizer's ``DeviceStepInputs``, its ``debias`` and ``bound`` code; then
    each layer's scalars are computed in-kernel and a layer whose flag is False keeps its W (nothing read on the
    host). ``scratch``: a buffer provider (None: allocate); the result may be a view of its buffer, valid until
    the next call. One launch (plus one ``torch.sum``) whatever L is.
    """
    layers, (p, q), r = len(params), params[0].shape, right.shape[2]
    left = fp32_stack(left, (2, layers, p, r), "left")
    right = fp32_stack(right, (2, layers, r, q), "right")
    right_pinvs = fp32_stack(right_pinvs, (2, layers, r, q), "right_pinvs")
    w_tab, w_dtype, w_aligned = pointer_batch(params, "params")
    g_tab, g_dtype, g_aligned = pointer_batch(grads, "grads")
    if grads[0].shape != params[0].shape:
        raise ValueError(f"grads: shape {tuple(params[0].shape)} expected, got {tuple(grads[0].shape)}")
    device = params[0].device
    constants = dict(r=r, R_PAD=_r_pad(r), DECAY=decay is not None, W_DTYPE=TL_DTYPES[w_dtype],
                     G_DTYPE=TL_DTYPES[g_dtype], W_ALIGNED=w_aligned, G_ALIGNED=g_aligned,
                     DOT_PRECISION=precision or dot_precision(device), SOFT_BF16=INTERPRETED)
    if _first_autotuned is None:  # interpreted
        kernel, constants = _first_pass, {**constants, **INTERPRETER_FIRST}
        slot_cols = INTERPRETER_FIRST["BLOCK_N"] * INTERPRETER_FIRST["COL_TILES"]
    else:
        kernel, constants["BLOCK_R"] = _first_autotuned, min(MAX_BLOCK_R, constants["R_PAD"])
        slot_cols = FIRST_PASS_REDUCTION["BLOCK_N"] * FIRST_PASS_REDUCTION["COL_TILES"]
    slots = triton.cdiv(q, slot_cols)
    scratch = scratch or allocate
    partials = scratch("kernel_left_partials", (slots, 2, layers, p, r), torch.float32, device)
    steps, oks, scalars, inputs, step_constants = _step_arguments(host_scalars, device_step, layers, partials)

    def grid(meta):
        return triton.cdiv(p, meta["BLOCK_M"]), slots, layers

    _launching.params, _launching.copies = params, None  # for the autotuner's hooks (its first call per key)
    try:
        kernel[grid](
            w_tab, g_tab, left, right, right_pinvs, partials, steps, oks,
            p, q, *params[0].stride(), *grads[0].stride(),
            kappa, *scalars[:3], 1.0 if decay is None else decay, scalars[3], *inputs,
            **constants, **step_constants,
        )
    finally:
        _launching.params = _launching.copies = None
    sums = scratch("kernel_left_sums", (2, layers, p, r), torch.float32, device)
    return torch.sum(partials, dim=0, out=sums)


def second_pass(grads: Sequence[torch.Tensor], left_pinvs: torch.Tensor, *, precision: str | None = None,
                scratch: Scratch | None = None) -> torch.Tensor:
    """``[B_pinv g, V_B_pinv |g|]``, ``(2, L, r, q)`` fp32, from ``left_pinvs`` ``(2, L, r, p)`` fp32 =
    ``[B_pinv, V_B_pinv]`` and the L p x q ``grads``. One launch (plus one ``torch.sum``) whatever L is; the result
    may be a view of a ``scratch`` buffer, valid until the next call."""
    layers, (p, q), r = len(grads), grads[0].shape, left_pinvs.shape[2]
    left_pinvs = fp32_stack(left_pinvs, (2, layers, r, p), "left_pinvs")
    g_tab, g_dtype, g_aligned = pointer_batch(grads, "grads")
    device = grads[0].device
    constants = dict(r=r, R_PAD=_r_pad(r), G_DTYPE=TL_DTYPES[g_dtype], G_ALIGNED=g_aligned,
                     DOT_PRECISION=precision or dot_precision(device))
    if _second_autotuned is None:  # interpreted
        kernel, constants = _second_pass, {**constants, **INTERPRETER_SECOND}
        slot_rows = INTERPRETER_SECOND["BLOCK_M"] * INTERPRETER_SECOND["ROW_TILES"]
    else:
        kernel = _second_autotuned
        slot_rows = SECOND_PASS_REDUCTION["BLOCK_M"] * SECOND_PASS_REDUCTION["ROW_TILES"]
    slots = triton.cdiv(p, slot_rows)
    scratch = scratch or allocate
    partials = scratch("kernel_right_partials", (slots, 2, layers, r, q), torch.float32, device)

    def grid(meta):
        return triton.cdiv(q, meta["BLOCK_N"]), slots, layers

    kernel[grid](g_tab, left_pinvs, partials, p, q, *grads[0].stride(), **constants)
    sums = scratch("kernel_right_sums", (2, layers, r, q), torch.float32, device)
    return torch.sum(partials, dim=0, out=sums)
