"""Fused LoRA-Pre Adam step: the parameter update and the factors' skinny products in two passes over ``g``.

The torch reference is :func:`lit_lowrank.optim.lora_pre.adam_update.lora_pre_adam_update_`; this module's
:func:`lora_pre_adam_update_` takes the same arguments and gives the same results to fp32 rounding (the
reductions run in another order). ``m_t`` and ``v_t`` are formed a register tile at a time and never stored.
With the reference's algebra (``kappa = beta1 / (1 - beta1)``, ``rho = sqrt(beta2 / (1 - beta2))``, constants
folded into ``step_size`` and ``eps_hat``: :func:`~lit_lowrank.optim.lora_pre.adam_scalars.adam_step_constants`):

**Pass 1** (:func:`_first_pass`; grid: row blocks x column slots; a program owns BLOCK_M rows and a slot of
COL_TILES consecutive BLOCK_N-column tiles, visited in order). Per tile:

1. ``g A_pinv^T`` and ``|g| V_A_pinv^T`` added to two BLOCK_M x R_PAD fp32 accumulators (R_PAD: r padded to a
   power of two >= 16 for ``tl.dot``), i.e. split-K partial sums over the slot's columns;
2. ``m = g + kappa * (B A)`` and ``root_v = hypot(|g|, rho * (V_B V_A)) + eps_hat`` (K = r in BLOCK_R chunks);
   ``hypot`` is formed without squares, which overflow fp32 for |g| > 1.8e19, as in the reference; with an
   update bound (``FLOOR``) ``root_v = max(hypot(...), floor * |m|) + eps_hat``, in registers (no extra pass);
3. ``W <- W * (1 - lr wd)`` rounded to W's dtype (the reference's in-place ``mul_``), then
   ``W <- W + (-step_size * m) / root_v`` (IEEE division, like ``addcdiv_``), stored in W's dtype.

The accumulators go to ``left_partials[slot]``; torch sums the slots (``torch.sum``: a fixed order, no atomics),
updates ``B`` and ``V_B`` and forms ``B_pinv = damped_pinv(B_new^T)`` (from the old ``B`` for Jacobi).

**Pass 2** (:func:`_second_pass`, reads only ``g``; grid: column blocks x row slots): ``B_pinv g`` and
``V_B_pinv |g|`` (R_PAD x BLOCK_N accumulators) summed over ROW_TILES consecutive row tiles ->
``right_partials[slot]``; torch sums the slots (and, under FSDP2, the ranks) and updates ``A`` and ``V_A``.

Memory traffic, and why Jacobi runs the same two passes: docs/design.md.

Ragged edges are masked: rows, columns and rank entries outside the matrix load as 0, so they add nothing to
the sums, and are never stored. The configs tried on GPU differ only in the tile size that does not reduce
(BLOCK_M in pass 1, BLOCK_N in pass 2), warps and stages; the reduction tiling is fixed, so the slots and the
order in which they are summed do not depend on the config autotuning picks (bitwise equality across configs
is not verified on a GPU: the MMA instructions may differ with the tile). Launches need no host sync (grids from
shapes only). The step's scalars are kernel arguments (Python floats, as in the reference), or, for the
optimizer's device-side skip (parameters on an accelerator), computed in-kernel in fp64 from the step count and
the finite flag in device memory (:func:`_step_scalars`, the reference's ``adam_step_tensors``); then a skipped
matrix's W is not stored, and nothing is read on the host. ``lr`` and the betas stay kernel arguments, so a CUDA
graph captured around a step would freeze them.

The kernels call only Triton builtins (no ``triton.language.standard`` helpers such as ``tl.zeros`` or
``tl.cdiv``), so ``TRITON_INTERPRET=1`` need only be set before this module is imported.
"""
from __future__ import annotations

from typing import NamedTuple

import torch
import triton
import triton.language as tl

from lit_lowrank.kernels.dispatch import built_by_interpreter
from lit_lowrank.kernels.dispatch import dot_precision as _dot_precision
from lit_lowrank.optim.lora_pre.adam_scalars import (
    NO_FLOOR,
    DeviceStepInputs,
    adam_rates,
    adam_step_constants,
    device_step_inputs,
)
from lit_lowrank.optim.lora_pre.adam_update import damped_pinv_pair
from lit_lowrank.optim.lora_pre.factors import Workspace, masked_copy_
from lit_lowrank.optim.sharding import RowShards

#: Fixed reduction tiling (see the module docstring): pass 1 sums BLOCK_N * COL_TILES = 512 columns per slot,
#: pass 2 BLOCK_M * ROW_TILES = 512 rows. Each pass's partial sums then cost r / 32 bytes per weight entry
#: (written by the kernel, read by torch.sum), and q / 512 (p / 512) slots times p / BLOCK_M (q / BLOCK_N) row
#: (column) blocks still make a few hundred programs at Llama-1B shapes.
FIRST_PASS_REDUCTION = {"BLOCK_N": 32, "COL_TILES": 16}
SECOND_PASS_REDUCTION = {"BLOCK_M": 64, "ROW_TILES": 8}

#: Configs tried on GPU: only the non-reducing tile size, warps and stages vary. Chosen by compiling for sm_90
#: with Triton's bundled ptxas (no GPU at hand; ``tests/kernels/test_lora_pre_adam_kernel.py`` keeps compiling
#: them): with tf32x3 dots, fp32 or bf16 W, at r = 16 none spills registers but the 128-wide tiles (24-36 bytes
#: per thread); at r = 128 the first pass spills 80-336 bytes and the second 0-120 (at r = 256 both would spill
#: about 1 KB, hence the dispatcher's ``KERNEL_MAX_RANK = 128``). Pruned by rank: a program keeps two
#: BLOCK x R_PAD fp32 accumulators, so tiles with BLOCK x R_PAD > MAX_TILE_TIMES_RANK are not tried (the
#: smallest tile always is). Which config is fastest is for autotuning, on a GPU, to find out.
FIRST_PASS_CONFIGS = [
    triton.Config({"BLOCK_M": 16, **FIRST_PASS_REDUCTION}, num_warps=4, num_stages=2),
    triton.Config({"BLOCK_M": 32, **FIRST_PASS_REDUCTION}, num_warps=8, num_stages=2),
    triton.Config({"BLOCK_M": 64, **FIRST_PASS_REDUCTION}, num_warps=8, num_stages=1),
    triton.Config({"BLOCK_M": 128, **FIRST_PASS_REDUCTION}, num_warps=8, num_stages=1),
]
SECOND_PASS_CONFIGS = [
    triton.Config({"BLOCK_N": 32, **SECOND_PASS_REDUCTION}, num_warps=8, num_stages=1),
    triton.Config({"BLOCK_N": 64, **SECOND_PASS_REDUCTION}, num_warps=8, num_stages=1),
    triton.Config({"BLOCK_N": 64, **SECOND_PASS_REDUCTION}, num_warps=8, num_stages=2),
    triton.Config({"BLOCK_N": 128, **SECOND_PASS_REDUCTION}, num_warps=8, num_stages=1),
]
MAX_TILE_TIMES_RANK = 64 * 128
#: Rank chunk of the first pass's K = r products (m and v), so only BLOCK_M x BLOCK_R of B and V_B is live.
MAX_BLOCK_R = 32
#: The interpreter's one config: small tiles, so tests with small matrices still span several tiles, slots and
#: (for r > 16) rank chunks; not smaller, as the interpreter's time grows with the number of tiles, not their size.
INTERPRETER_FIRST = {"BLOCK_M": 32, "BLOCK_N": 32, "COL_TILES": 2, "BLOCK_R": 16}
INTERPRETER_SECOND = {"BLOCK_M": 32, "BLOCK_N": 32, "ROW_TILES": 2}
#: The first pass's in-kernel scalar inputs when the step's scalars come from the host (never read there).
UNUSED_INPUTS = DeviceStepInputs(0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 1.0, 0.0, debias=False, bound=NO_FLOOR)


@triton.jit
def _hypot(x, y):
    """sqrt(x^2 + y^2) without forming the squares (they overflow fp32 above 1.8e19); inf if either is inf."""
    hi = tl.maximum(tl.abs(x), tl.abs(y), propagate_nan=tl.PropagateNan.ALL)  # NaN in, NaN out, like torch
    lo = tl.minimum(tl.abs(x), tl.abs(y), propagate_nan=tl.PropagateNan.ALL)
    ratio = tl.div_rn(lo, tl.where(hi == 0.0, 1.0, hi))
    return tl.where(hi == float("inf"), hi, hi * tl.sqrt_rn(1.0 + ratio * ratio))


@triton.jit
def _round_to(x, dtype: tl.constexpr, SOFT_BF16: tl.constexpr):
    """fp32 ``x`` rounded to ``dtype`` to nearest even, like torch. Triton's interpreter truncates fp32 -> bf16
    casts, so there (``SOFT_BF16``) bf16 is rounded on the bits; compiled kernels use the hardware conversion."""
    if SOFT_BF16 and dtype == tl.bfloat16:
        bits = x.to(tl.uint32, bitcast=True)
        rounded = ((bits + 0x7FFF + ((bits >> 16) & 1)) >> 16).to(tl.uint16).to(tl.bfloat16, bitcast=True)
        return tl.where(x == x, rounded, x.to(tl.bfloat16))  # NaN payloads must not round up to inf
    return x.to(dtype)


@triton.jit
def _step_scalars(t, log_beta1, log_beta2, one_minus_beta1, root_one_minus_beta2, rho0, lr_scale, eps, log_ratio,
                  one_minus_ratio, worst_case_scale, DEBIAS: tl.constexpr, BOUND: tl.constexpr):
    """``(rho, step_size, eps_hat, floor)`` of step ``t`` (fp64, >= 1) in fp64: the reference module's
    ``adam_step_tensors``, line by line (BOUND: its NO_FLOOR, V_FLOOR, ADAM_FLOOR, ADAM_FLOOR_RATIO_ONE codes)."""
    c = root_one_minus_beta2 / tl.sqrt(1.0 - tl.exp(t * log_beta2))
    m_hat_per_m = one_minus_beta1 / ((1.0 - tl.exp(t * log_beta1)) * c)
    rho = t * 0.0 + rho0
    if DEBIAS:  # t - 1 >= 1 inside the correction, so that step 1 (no correction) does not divide 0 by 0
        earlier = tl.maximum(t - 1.0, 1.0)
        warm_up = tl.sqrt(1.0 - tl.exp(earlier * log_beta2)) / (1.0 - tl.exp(earlier * 0.5 * log_beta2))
        rho = tl.where(t > 1.0, rho * warm_up, rho)
    floor = t * 0.0
    if BOUND == 1:
        floor = m_hat_per_m
    if BOUND >= 2:
        geometric = t
        if BOUND == 2:
            geometric = (1.0 - tl.exp(t * log_ratio)) / one_minus_ratio
        bias1 = 1.0 - tl.exp(t * log_beta1)
        worst_case = worst_case_scale * (1.0 - tl.exp(t * log_beta2)) / (bias1 * bias1) * geometric
        floor = m_hat_per_m / tl.sqrt(worst_case)
    return rho, lr_scale * m_hat_per_m, eps / c, floor


@triton.jit
def _first_pass(
    w_ptr, g_ptr,  # the parameter (updated in place, its own dtype) and its gradient: p x q, any strides
    b_ptr, vb_ptr,  # B, V_B: p x r, row-major fp32
    a_ptr, va_ptr, ap_ptr, vap_ptr,  # A, V_A, A_pinv, V_A_pinv: r x q, row-major fp32
    part_ptr,  # (slots, 2, p, r) fp32: this program writes [pid_n, :, rows, :]
    step_ptr, ok_ptr,  # STEP_ON_DEVICE: the step count (0-d fp32) and the finite flag (0-d uint8); else unused
    p, q, stride_wp, stride_wq, stride_gp, stride_gq,
    kappa, rho, neg_step, eps_hat, decay, floor,  # fp32 scalars of the step (see adam_step_constants)
    # STEP_ON_DEVICE: what the step's scalars are computed from in-kernel (see DeviceStepInputs); else unused
    log_beta1: tl.float64, log_beta2: tl.float64, one_minus_beta1: tl.float64, root_one_minus_beta2: tl.float64,
    rho0: tl.float64, lr_scale: tl.float64, eps: tl.float64, log_ratio: tl.float64, one_minus_ratio: tl.float64,
    worst_case_scale: tl.float64,
    r: tl.constexpr, R_PAD: tl.constexpr, DECAY: tl.constexpr, FLOOR: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, COL_TILES: tl.constexpr, BLOCK_R: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
    SOFT_BF16: tl.constexpr,  # round fp32 -> bf16 on the bits (the interpreter's cast truncates)
    STEP_ON_DEVICE: tl.constexpr, DEBIAS: tl.constexpr, BOUND: tl.constexpr,
):
    pid_m = tl.program_id(0)
    pid_n = tl.program_id(1)
    store_w = True
    if STEP_ON_DEVICE:  # the scalars from the step count, and no store of W where the step is skipped
        t = tl.maximum(tl.load(step_ptr).to(tl.float64), 1.0)  # a skipped first step counts 0; its update is dropped
        rho64, step64, eps64, floor64 = _step_scalars(t, log_beta1, log_beta2, one_minus_beta1, root_one_minus_beta2,
                                                      rho0, lr_scale, eps, log_ratio, one_minus_ratio,
                                                      worst_case_scale, DEBIAS, BOUND)
        rho, neg_step = rho64.to(tl.float32), (-step64).to(tl.float32)
        eps_hat, floor = eps64.to(tl.float32), floor64.to(tl.float32)
        store_w = tl.load(ok_ptr) != 0
    rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    row_in = rows < p
    rows64 = rows.to(tl.int64)[:, None]
    ks = tl.arange(0, R_PAD)
    k_in = ks < r
    left_at = rows64 * r + ks[None, :]
    left_in = row_in[:, None] & k_in[None, :]
    acc_g = tl.full((BLOCK_M, R_PAD), 0.0, tl.float32)
    acc_abs = tl.full((BLOCK_M, R_PAD), 0.0, tl.float32)

    first_tile = pid_n * COL_TILES
    last_tile = tl.minimum(first_tile + COL_TILES, (q + BLOCK_N - 1) // BLOCK_N)  # the last slot may be short
    for t in range(first_tile, last_tile):
        cols = t * BLOCK_N + tl.arange(0, BLOCK_N)
        col_in = cols < q
        cols64 = cols.to(tl.int64)[None, :]
        tile = row_in[:, None] & col_in[None, :]
        g = tl.load(g_ptr + rows64 * stride_gp + cols64 * stride_gq, mask=tile, other=0.0).to(tl.float32)
        abs_g = tl.abs(g)

        # g A_pinv^T and |g| V_A_pinv^T over this tile's columns (A_pinv^T tile: BLOCK_N x R_PAD).
        right_t_at = ks[None, :] * q + cols[:, None]
        right_t_in = col_in[:, None] & k_in[None, :]
        ap_t = tl.load(ap_ptr + right_t_at, mask=right_t_in, other=0.0)
        acc_g = tl.dot(g, ap_t, acc_g, input_precision=DOT_PRECISION)
        vap_t = tl.load(vap_ptr + right_t_at, mask=right_t_in, other=0.0)
        acc_abs = tl.dot(abs_g, vap_t, acc_abs, input_precision=DOT_PRECISION)

        # m_t / (1 - beta1) and (sqrt(v_t / (1 - beta2^t)) + eps) / c, as in the reference.
        # K = r in chunks of BLOCK_R (the factors' rows stay in L1; registers hold one chunk at a time).
        ba = tl.full((BLOCK_M, BLOCK_N), 0.0, tl.float32)
        vv = tl.full((BLOCK_M, BLOCK_N), 0.0, tl.float32)
        for k0 in range(0, R_PAD, BLOCK_R):
            kc = k0 + tl.arange(0, BLOCK_R)
            kc_in = kc < r
            chunk_at = rows64 * r + kc[None, :]
            chunk_in = row_in[:, None] & kc_in[None, :]
            right_at = kc[:, None] * q + cols[None, :]
            right_in = kc_in[:, None] & col_in[None, :]
            b = tl.load(b_ptr + chunk_at, mask=chunk_in, other=0.0)
            a = tl.load(a_ptr + right_at, mask=right_in, other=0.0)
            ba = tl.dot(b, a, ba, input_precision=DOT_PRECISION)
            vb = tl.load(vb_ptr + chunk_at, mask=chunk_in, other=0.0)
            va = tl.load(va_ptr + right_at, mask=right_in, other=0.0)
            vv = tl.dot(vb, va, vv, input_precision=DOT_PRECISION)
        m = g + kappa * ba
        root_v = _hypot(rho * vv, abs_g)
        if FLOOR:  # the update bound: sqrt(v_hat) >= |m_hat| / sqrt(C), see adam_step_constants
            root_v = tl.maximum(root_v, floor * tl.abs(m), propagate_nan=tl.PropagateNan.ALL)
        root_v = root_v + eps_hat

        w_at = w_ptr + rows64 * stride_wp + cols64 * stride_wq
        w = tl.load(w_at, mask=tile, other=0.0)
        if DECAY:  # the reference decays in place first: one rounding to W's dtype
            w = _round_to(w.to(tl.float32) * decay, w_ptr.dtype.element_ty, SOFT_BF16)
        w = w.to(tl.float32) + tl.div_rn(neg_step * m, root_v)
        tl.store(w_at, _round_to(w, w_ptr.dtype.element_ty, SOFT_BF16), mask=tile & store_w)

    slot = part_ptr + pid_n.to(tl.int64) * 2 * p * r
    tl.store(slot + left_at, acc_g, mask=left_in)
    tl.store(slot + p * r + left_at, acc_abs, mask=left_in)


@triton.jit
def _second_pass(
    g_ptr,  # the gradient: p x q, any strides, read only
    bp_ptr, vbp_ptr,  # B_pinv, V_B_pinv: r x p, row-major fp32
    part_ptr,  # (slots, 2, r, q) fp32: this program writes [pid_m, :, :, cols]
    p, q, stride_gp, stride_gq,
    r: tl.constexpr, R_PAD: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, ROW_TILES: tl.constexpr, DOT_PRECISION: tl.constexpr,
):
    pid_n = tl.program_id(0)
    pid_m = tl.program_id(1)
    cols = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    col_in = cols < q
    cols64 = cols.to(tl.int64)[None, :]
    ks = tl.arange(0, R_PAD)
    k_in = ks < r
    acc_g = tl.full((R_PAD, BLOCK_N), 0.0, tl.float32)
    acc_abs = tl.full((R_PAD, BLOCK_N), 0.0, tl.float32)

    first_tile = pid_m * ROW_TILES
    last_tile = tl.minimum(first_tile + ROW_TILES, (p + BLOCK_M - 1) // BLOCK_M)
    for t in range(first_tile, last_tile):
        rows = t * BLOCK_M + tl.arange(0, BLOCK_M)
        row_in = rows < p
        g = tl.load(g_ptr + rows.to(tl.int64)[:, None] * stride_gp + cols64 * stride_gq,
                    mask=row_in[:, None] & col_in[None, :], other=0.0).to(tl.float32)
        pinv_at = ks[:, None] * p + rows[None, :]
        pinv_in = k_in[:, None] & row_in[None, :]
        bp = tl.load(bp_ptr + pinv_at, mask=pinv_in, other=0.0)
        vbp = tl.load(vbp_ptr + pinv_at, mask=pinv_in, other=0.0)
        acc_g = tl.dot(bp, g, acc_g, input_precision=DOT_PRECISION)
        acc_abs = tl.dot(vbp, tl.abs(g), acc_abs, input_precision=DOT_PRECISION)

    right_at = ks[:, None] * q + cols[None, :]
    right_in = k_in[:, None] & col_in[None, :]
    slot = part_ptr + pid_m.to(tl.int64) * 2 * r * q
    tl.store(slot + right_at, acc_g, mask=right_in)
    tl.store(slot + r * q + right_at, acc_abs, mask=right_in)


def _prune_first(configs, named_args, **kwargs):
    """Triton's ``early_config_prune`` hook: ``named_args`` are the positional arguments, ``kwargs`` the rest."""
    return _fitting(configs, "BLOCK_M", {**named_args, **kwargs}["R_PAD"])


def _prune_second(configs, named_args, **kwargs):
    return _fitting(configs, "BLOCK_N", {**named_args, **kwargs}["R_PAD"])


def _fitting(configs, block: str, r_pad: int):
    """Configs whose accumulators fit (BLOCK x R_PAD <= MAX_TILE_TIMES_RANK), at least the smallest tile."""
    smallest = min(c.kwargs[block] for c in configs)
    return [c for c in configs if c.kwargs[block] * r_pad <= MAX_TILE_TIMES_RANK or c.kwargs[block] == smallest]


INTERPRETED = built_by_interpreter(_first_pass) and built_by_interpreter(_second_pass)
_first_autotuned = None if INTERPRETED else triton.autotune(
    configs=FIRST_PASS_CONFIGS, key=["p", "q", "r", "DOT_PRECISION"], restore_value=["w_ptr"],
    prune_configs_by={"early_config_prune": _prune_first},
)(_first_pass)
_second_autotuned = None if INTERPRETED else triton.autotune(
    configs=SECOND_PASS_CONFIGS, key=["p", "q", "r", "DOT_PRECISION"],
    prune_configs_by={"early_config_prune": _prune_second},
)(_second_pass)


def dot_precision(device: torch.device) -> str:
    """Default fp32 ``tl.dot`` precision: ``tf32x3`` (fp32-level, on tensor cores) on NVIDIA, ``ieee`` elsewhere.

    A step does 12 r flops per weight entry (four K = r products in pass 1, two in pass 2) against 16 bytes of
    traffic (fp32 W and g) or 8 (bf16). On an H100 SXM (3.35 TB/s) that stays memory-bound up to r ~ 27 / 13 with
    fp32 FMAs (``ieee``, 67 TFLOP/s), r ~ 66 / 33 with ``tf32x3`` (three tf32 products, ~165 TFLOP/s effective)
    and r ~ 200 / 100 with plain ``tf32`` (495 TFLOP/s), by datasheet arithmetic. ``tf32x3`` is the default as it
    keeps fp32-level agreement with the torch reference; ``tf32`` rounds the factors and ``g`` to 10 mantissa bits
    (~1e-3 relative) in ``m``, ``v`` and the factor updates. The GPU benchmark reports both. One choice for all
    kernels: :func:`lit_lowrank.kernels.dispatch.dot_precision`.
    """
    return _dot_precision(device, INTERPRETED)


def _r_pad(r: int) -> int:
    return max(16, triton.next_power_of_2(r))


class DeviceStep(NamedTuple):
    """A step whose count and skip flag stay on the device: the first pass computes its scalars in-kernel."""

    step: torch.Tensor  # the step count, 0-d (fp32), this step included when ok
    ok: torch.Tensor  # 0-d bool: False leaves W unwritten
    inputs: DeviceStepInputs


def first_pass(param, grad, B, A, V_B, V_A, right_pinvs, *, kappa: float, rho: float = 0.0, step_size: float = 0.0,
               eps_hat: float = 0.0, decay: float | None, workspace: Workspace, precision: str | None = None,
               floor: float = 0.0, device_step: DeviceStep | None = None):
    """Update ``param`` in place and return ``(g A_pinv^T, |g| V_A_pinv^T)`` stacked, ``(2, p, r)`` fp32.

    ``right_pinvs``: ``(2, r, q)`` fp32, ``A_pinv`` and ``V_A_pinv``; ``decay``: ``1 - lr * weight_decay``, or
    None for no weight decay; ``floor``: the update bound's factor (0: none). With ``device_step`` the kernel reads
    the step count and the skip flag from device memory and computes ``rho``, ``step_size``, ``eps_hat`` and
    ``floor`` itself (the arguments of those names are unused), so nothing is read on the host. The result is a
    view of a workspace buffer (valid until the next call).
    """
    p, q = param.shape
    r = A.shape[0]
    B, V_B, A, V_A, right_pinvs = (t.contiguous() for t in (B, V_B, A, V_A, right_pinvs))
    on_device = device_step is not None
    inputs = device_step.inputs if on_device else UNUSED_INPUTS
    constants = dict(r=r, R_PAD=_r_pad(r), DECAY=decay is not None, SOFT_BF16=INTERPRETED,
                     FLOOR=inputs.bound != NO_FLOOR if on_device else floor != 0.0,
                     DOT_PRECISION=precision or dot_precision(param.device), STEP_ON_DEVICE=on_device,
                     DEBIAS=inputs.debias, BOUND=inputs.bound)
    if _first_autotuned is None:  # interpreted
        kernel, constants = _first_pass, {**constants, **INTERPRETER_FIRST}
        slot_cols = INTERPRETER_FIRST["BLOCK_N"] * INTERPRETER_FIRST["COL_TILES"]
    else:
        kernel, constants["BLOCK_R"] = _first_autotuned, min(MAX_BLOCK_R, constants["R_PAD"])
        slot_cols = FIRST_PASS_REDUCTION["BLOCK_N"] * FIRST_PASS_REDUCTION["COL_TILES"]
    slots = triton.cdiv(q, slot_cols)
    partials = workspace.get("kernel_left_partials", (slots, 2, p, r), torch.float32, param.device)

    def grid(meta):
        return triton.cdiv(p, meta["BLOCK_M"]), slots

    # Off the device-side step the count and flag pointers are never read: the partial sums stand in for them.
    step, ok = (device_step.step, device_step.ok.view(torch.uint8)) if on_device else (partials, partials)
    kernel[grid](
        param, grad, B, V_B, A, V_A, right_pinvs[0], right_pinvs[1], partials, step, ok,
        p, q, param.stride(0), param.stride(1), grad.stride(0), grad.stride(1),
        kappa, rho, -step_size, eps_hat, 1.0 if decay is None else decay, floor,
        *inputs[:-2],
        **constants,
    )
    return torch.sum(partials, dim=0, out=workspace.get("kernel_left_sums", (2, p, r), torch.float32, param.device))


def second_pass(grad, left_pinvs, *, workspace: Workspace, precision: str | None = None):
    """``(B_pinv g, V_B_pinv |g|)`` stacked, ``(2, r, q)`` fp32, from ``left_pinvs`` ``(2, r, p)`` fp32.

    The result is a view of a workspace buffer (valid until the next call).
    """
    p, q = grad.shape
    r = left_pinvs.shape[1]
    left_pinvs = left_pinvs.contiguous()
    constants = dict(r=r, R_PAD=_r_pad(r), DOT_PRECISION=precision or dot_precision(grad.device))
    if _second_autotuned is None:  # interpreted
        kernel, constants = _second_pass, {**constants, **INTERPRETER_SECOND}
        slot_rows = INTERPRETER_SECOND["BLOCK_M"] * INTERPRETER_SECOND["ROW_TILES"]
    else:
        kernel = _second_autotuned
        slot_rows = SECOND_PASS_REDUCTION["BLOCK_M"] * SECOND_PASS_REDUCTION["ROW_TILES"]
    slots = triton.cdiv(p, slot_rows)
    partials = workspace.get("kernel_right_partials", (slots, 2, r, q), torch.float32, grad.device)

    def grid(meta):
        return triton.cdiv(q, meta["BLOCK_N"]), slots

    kernel[grid](grad, left_pinvs[0], left_pinvs[1], partials, p, q, grad.stride(0), grad.stride(1), **constants)
    return torch.sum(partials, dim=0, out=workspace.get("kernel_right_sums", (2, r, q), torch.float32, grad.device))


def lora_pre_adam_update_(
    param: torch.Tensor,
    grad: torch.Tensor,
    B: torch.Tensor,
    A: torch.Tensor,
    V_B: torch.Tensor,
    V_A: torch.Tensor,
    *,
    step: int | torch.Tensor,
    lr: float,
    beta1: float,
    beta2: float,
    eps: float,
    weight_decay: float,
    scale: float,
    damping: float,
    factor_update: str,
    workspace: Workspace,
    shards: RowShards | None = None,
    debias_second_moment: bool = True,
    update_bound: str = "v_floor",
    precision: str | None = None,
    ok: torch.Tensor | None = None,
) -> None:
    """The reference's step (same arguments, ``chunk_rows`` aside) with the p x q work in the two passes.

    ``param`` and ``grad``: fp32, bf16 or fp16, any strides; factors fp32, ``r`` up to the reference module's
    ``KERNEL_MAX_RANK`` (the dispatcher checks all that). The pseudo-inverses, the slot sums and the factor updates
    run in torch; under FSDP2 (``shards``) the tensors are this rank's local blocks and only the ``r x r`` Gram
    matrices and ``r x q`` sums are all-reduced, as in the reference. ``precision``: ``tl.dot``'s
    ``input_precision`` (default :func:`dot_precision`). ``ok`` (0-d bool), with ``step`` a 0-d count tensor: the
    device-side skip, as in the reference (the first pass computes the scalars and masks its stores of W; the
    factor updates are ``torch.where``s).
    """
    if ok is None:
        c = adam_step_constants(step=step, lr=lr, beta1=beta1, beta2=beta2, eps=eps, scale=scale,
                                debias_second_moment=debias_second_moment, update_bound=update_bound)
        kappa, gamma1, gamma2 = c.kappa, c.gamma1, c.gamma2
        scalars = dict(rho=c.rho, step_size=c.step_size, eps_hat=c.eps_hat, floor=c.floor)
    else:
        kappa, gamma1, gamma2 = adam_rates(beta1, beta2)
        inputs = device_step_inputs(lr=lr, beta1=beta1, beta2=beta2, eps=eps, scale=scale,
                                    debias_second_moment=debias_second_moment, update_bound=update_bound)
        scalars = dict(device_step=DeviceStep(step, ok, inputs))
    jacobi = factor_update == "jacobi"
    right_pinvs = damped_pinv_pair(A, V_A, "right_pinv", damping, workspace)
    if jacobi:
        left_pinvs = damped_pinv_pair(B.T, V_B.T, "left_pinv", damping, workspace, shards)

    left_sums = first_pass(param, grad, B, A, V_B, V_A, right_pinvs, kappa=kappa,
                           decay=1.0 - lr * weight_decay if weight_decay != 0.0 else None,
                           workspace=workspace, precision=precision, **scalars)
    _blend_(B, 1.0 - gamma1, left_sums[0], gamma1, ok)
    _blend_(V_B, 1.0 - gamma2, left_sums[1], gamma2, ok)

    if not jacobi:
        left_pinvs = damped_pinv_pair(B.T, V_B.T, "left_pinv", damping, workspace, shards)
    right_sums = second_pass(grad, left_pinvs, workspace=workspace, precision=precision)
    right_sums[0].mul_(gamma1)
    right_sums[1].mul_(gamma2)
    if shards is not None:
        shards.sum_(right_sums)
    _blend_(A, 1.0 - gamma1, right_sums[0], 1.0, ok)
    _blend_(V_A, 1.0 - gamma2, right_sums[1], 1.0, ok)


def _blend_(factor: torch.Tensor, keep: float, sums: torch.Tensor, rate: float, ok: torch.Tensor | None) -> None:
    """``factor <- keep * factor + rate * sums`` in place; with ``ok`` only where it holds (a skipped step's sums
    may be NaN), by the same two roundings."""
    if ok is None:
        factor.mul_(keep).add_(sums, alpha=rate)
    else:
        masked_copy_(factor, torch.mul(factor, keep).add_(sums, alpha=rate), ok)
