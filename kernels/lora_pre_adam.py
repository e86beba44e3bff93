"""Fused LoRA-Pre Adam passes: a batch of L same-shape matrices' parameter updates and the factors' skinny
products, in two launches whatever L is.

A leaf: this module imports torch, triton, :mod:`lit_lowrank.kernels.dispatch` and
:mod:`lit_lowrank.kernels.batched_launch` (the host-side glue of a batched launch: pointer tables, their checks,
scratch buffers) only; it holds the kernels, their configs and the two launchers. The step around the two passes
(pseudo-inverses, factor updates, the skip flag, FSDP2 sums) is the optimizer's (``lit_lowrank.optim.lora_pre``),
which calls :func:`first_pass` and :func:`second_pass` as its Triton backend and checks them against its torch
backends. ``m_t`` and ``v_t`` are formed a register tile at a time and never stored. With the optimizer's algebra
(``kappa = beta1 / (1 - beta1)``, ``rho = sqrt(beta2 / (1 - beta2))``, constants folded into ``step_size`` and
``eps_hat``), for each layer ``l`` of the batch:

**Pass 1** (:func:`_first_pass`; grid: row blocks x column slots x layers; a program owns BLOCK_M rows of one
layer and a slot of COL_TILES consecutive BLOCK_N-column tiles, visited in order). Per tile:

1. ``g A_pinv^T`` and ``|g| V_A_pinv^T`` added to two BLOCK_M x R_PAD fp32 accumulators (R_PAD: r padded to a
   power of two >= 16 for ``tl.dot``), i.e. split-K partial sums over the slot's columns;
2. ``m = g + kappa * (B A)`` and ``root_v = hypot(|g|, rho * (V_B V_A)) + eps_hat`` (K = r in BLOCK_R chunks);
   ``hypot`` is formed without squares, which overflow fp32 for |g| > 1.8e19, as in the torch path; with an
   update bound (``FLOOR``) ``root_v = max(hypot(...), floor * |m|) + eps_hat``, in registers (no extra pass);
3. ``W <- W * (1 - lr wd)`` rounded to W's dtype (the torch path's in-place ``mul_``), then
   ``W <- W + (-step_size * m) / root_v`` (IEEE division, like ``addcdiv_``), stored in W's dtype.

The accumulators go to ``partials[slot, :, l]``; one ``torch.sum`` over the slots gives ``(2, L, p, r)``.

**Pass 2** (:func:`_second_pass`, reads only ``g``; grid: column blocks x row slots x layers): ``B_pinv g`` and
``V_B_pinv |g|`` (R_PAD x BLOCK_N accumulators) summed over ROW_TILES consecutive row tiles ->
``partials[slot, :, l]``, summed by one ``torch.sum`` into ``(2, L, r, q)``.

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

Ragged edges are masked: rows, columns and rank entries outside the matrix load as 0, so they add nothing to
the sums, and are never stored. The configs tried on GPU differ only in the tile size that does not reduce
(BLOCK_M in pass 1, BLOCK_N in pass 2), warps and stages; the reduction tiling is fixed, so the slots and the
order in which they are summed do not depend on the config autotuning picks (bitwise equality across configs
is not verified on a GPU: the MMA instructions may differ with the tile). The autotune key leaves L out (the
layer axis does not change a program's work). Autotuning times the first pass by running it, i.e. by updating
W: :func:`_autotune_pre_hook` and :func:`_autotune_post_hook` put the L parameters back after each timing run,
so the real launch finds them untouched. Launches need no host sync (grids from shapes only). The step's
scalars are kernel arguments (Python floats), or, for the optimizer's device-side skip, computed in-kernel in
fp64 from each layer's step count and finite flag in device memory (:func:`_step_scalars`, the optimizer's
``adam_step_tensors`` line by line); then a skipped layer's W is not stored, and nothing is read on the host.
``lr`` and the betas stay kernel arguments, so a CUDA graph captured around a step would freeze them.

The kernels call only Triton builtins (no ``triton.language.standard`` helpers such as ``tl.zeros`` or
``tl.cdiv``), so ``TRITON_INTERPRET=1`` need only be set before this module is imported.
"""
from __future__ import annotations

import threading
from collections.abc import Sequence

import torch
import triton
import triton.language as tl

from lit_lowrank.kernels.batched_launch import Scratch, allocate, fp32_stack, pointer_batch
from lit_lowrank.kernels.dispatch import built_by_interpreter
from lit_lowrank.kernels.dispatch import dot_precision as _dot_precision

__all__ = ["INTERPRETED", "dot_precision", "first_pass", "second_pass"]

#: Fixed reduction tiling (see the module docstring): pass 1 sums BLOCK_N * COL_TILES = 512 columns per slot,
#: pass 2 BLOCK_M * ROW_TILES = 512 rows. Each pass's partial sums then cost r / 32 bytes per weight entry
#: (written by the kernel, read by torch.sum), and q / 512 (p / 512) slots times p / BLOCK_M (q / BLOCK_N) row
#: (column) blocks still make a few hundred programs per layer at Llama-1B shapes.
FIRST_PASS_REDUCTION = {"BLOCK_N": 32, "COL_TILES": 16}
SECOND_PASS_REDUCTION = {"BLOCK_M": 64, "ROW_TILES": 8}

#: Configs tried on GPU: only the non-reducing tile size, warps and stages vary. Chosen by compiling for sm_90
#: with Triton's bundled ptxas (no GPU at hand; ``tests/kernels/test_lora_pre_adam_kernel.py`` keeps compiling
#: them): with tf32x3 dots, fp32 or bf16 W, at r = 16 none spills registers but the 128-wide tiles (24-36 bytes
#: per thread); at r = 128 the first pass spills 80-336 bytes and the second 0-120 (at r = 256 both would spill
#: about 1 KB, hence the optimizer's ``KERNEL_MAX_RANK = 128``). Pruned by rank: a program keeps two
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
#: The first pass's in-kernel scalar inputs when the step's scalars come from the host (never read there; the
#: ninth, ``one_minus_ratio``, is a divisor).
UNUSED_INPUTS = (0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 1.0, 0.0)
#: The Triton dtypes of :data:`~lit_lowrank.kernels.batched_launch.MATRIX_DTYPES` (W's and g's).
_TL_DTYPES = {torch.float32: tl.float32, torch.bfloat16: tl.bfloat16, torch.float16: tl.float16}


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
def _layer_pointer(table_ptr, layer, DTYPE: tl.constexpr, ALIGNED: tl.constexpr):
    """Layer ``layer``'s tensor from a pointer table, as a pointer to ``DTYPE``; ``ALIGNED``: 16-byte aligned
    (the hint a tensor argument would carry, which a loaded address loses)."""
    ptr = tl.load(table_ptr + layer).to(tl.pointer_type(DTYPE))
    if ALIGNED:
        ptr = tl.multiple_of(ptr, 16)
    return ptr


@triton.jit
def _step_scalars(t, log_beta1, log_beta2, one_minus_beta1, root_one_minus_beta2, rho0, lr_scale, eps, log_ratio,
                  one_minus_ratio, worst_case_scale, DEBIAS: tl.constexpr, BOUND: tl.constexpr):
    """``(rho, step_size, eps_hat, floor)`` of step ``t`` (fp64, >= 1) in fp64: the optimizer's
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
    w_tab, g_tab,  # (L,) int64: the parameters' addresses (updated in place, W_DTYPE) and the gradients' (G_DTYPE)
    left_ptr,  # (2, L, p, r) fp32: B, V_B
    right_ptr, pinv_ptr,  # (2, L, r, q) fp32: A, V_A and A_pinv, V_A_pinv
    part_ptr,  # (slots, 2, L, p, r) fp32: this program writes [pid_n, :, layer, rows, :]
    step_ptr, ok_ptr,  # STEP_ON_DEVICE: (L,) step counts (fp32) and finite flags (uint8); else unused
    p, q, stride_wp, stride_wq, stride_gp, stride_gq,
    kappa, rho, neg_step, eps_hat, decay, floor,  # fp32 scalars of the step, shared by the layers
    # STEP_ON_DEVICE: what each layer's scalars are computed from in-kernel (the optimizer's DeviceStepInputs)
    log_beta1: tl.float64, log_beta2: tl.float64, one_minus_beta1: tl.float64, root_one_minus_beta2: tl.float64,
    rho0: tl.float64, lr_scale: tl.float64, eps: tl.float64, log_ratio: tl.float64, one_minus_ratio: tl.float64,
    worst_case_scale: tl.float64,
    r: tl.constexpr, R_PAD: tl.constexpr, DECAY: tl.constexpr, FLOOR: tl.constexpr,
    W_DTYPE: tl.constexpr, G_DTYPE: tl.constexpr, W_ALIGNED: tl.constexpr, G_ALIGNED: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, COL_TILES: tl.constexpr, BLOCK_R: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
    SOFT_BF16: tl.constexpr,  # round fp32 -> bf16 on the bits (the interpreter's cast truncates)
    STEP_ON_DEVICE: tl.constexpr, DEBIAS: tl.constexpr, BOUND: tl.constexpr,
):
    pid_m = tl.program_id(0)
    pid_n = tl.program_id(1)
    layer = tl.program_id(2).to(tl.int64)
    layers = tl.num_programs(2).to(tl.int64)
    w_ptr = _layer_pointer(w_tab, layer, W_DTYPE, W_ALIGNED)
    g_ptr = _layer_pointer(g_tab, layer, G_DTYPE, G_ALIGNED)
    b_ptr = left_ptr + layer * p * r  # int64 offsets: L * p * r may pass 2^31
    vb_ptr = left_ptr + (layers + layer) * p * r
    a_ptr = right_ptr + layer * r * q
    va_ptr = right_ptr + (layers + layer) * r * q
    ap_ptr = pinv_ptr + layer * r * q
    vap_ptr = pinv_ptr + (layers + layer) * r * q
    store_w = True
    if STEP_ON_DEVICE:  # the scalars from the layer's step count, and no store of W where its step is skipped
        t = tl.maximum(tl.load(step_ptr + layer).to(tl.float64), 1.0)  # a skipped first step counts 0: dropped
        rho64, step64, eps64, floor64 = _step_scalars(t, log_beta1, log_beta2, one_minus_beta1, root_one_minus_beta2,
                                                      rho0, lr_scale, eps, log_ratio, one_minus_ratio,
                                                      worst_case_scale, DEBIAS, BOUND)
        rho, neg_step = rho64.to(tl.float32), (-step64).to(tl.float32)
        eps_hat, floor = eps64.to(tl.float32), floor64.to(tl.float32)
        store_w = tl.load(ok_ptr + layer) != 0
    rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    row_in = rows < p
    rows64 = rows.to(tl.int64)[:, None]
    ks = tl.arange(0, R_PAD)
    k_in = ks < r
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

        # m_t / (1 - beta1) and (sqrt(v_t / (1 - beta2^t)) + eps) / c, as in the torch path.
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
        if FLOOR:  # the update bound: sqrt(v_hat) >= |m_hat| / sqrt(C), see the optimizer's adam_step_constants
            root_v = tl.maximum(root_v, floor * tl.abs(m), propagate_nan=tl.PropagateNan.ALL)
        root_v = root_v + eps_hat

        w_at = w_ptr + rows64 * stride_wp + cols64 * stride_wq
        w = tl.load(w_at, mask=tile, other=0.0)
        if DECAY:  # the torch path decays in place first: one rounding to W's dtype
            w = _round_to(w.to(tl.float32) * decay, W_DTYPE, SOFT_BF16)
        w = w.to(tl.float32) + tl.div_rn(neg_step * m, root_v)
        tl.store(w_at, _round_to(w, W_DTYPE, SOFT_BF16), mask=tile & store_w)

    left_at = rows64 * r + ks[None, :]
    left_in = row_in[:, None] & k_in[None, :]
    slot = part_ptr + (pid_n.to(tl.int64) * 2 * layers + layer) * p * r  # partials[pid_n, 0, layer]
    tl.store(slot + left_at, acc_g, mask=left_in)
    tl.store(slot + layers * p * r + left_at, acc_abs, mask=left_in)


@triton.jit
def _second_pass(
    g_tab,  # (L,) int64: the gradients' addresses (G_DTYPE), read only
    pinv_ptr,  # (2, L, r, p) fp32: B_pinv, V_B_pinv
    part_ptr,  # (slots, 2, L, r, q) fp32: this program writes [pid_m, :, layer, :, cols]
    p, q, stride_gp, stride_gq,
    r: tl.constexpr, R_PAD: tl.constexpr, G_DTYPE: tl.constexpr, G_ALIGNED: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, ROW_TILES: tl.constexpr, DOT_PRECISION: tl.constexpr,
):
    pid_n = tl.program_id(0)
    pid_m = tl.program_id(1)
    layer = tl.program_id(2).to(tl.int64)
    layers = tl.num_programs(2).to(tl.int64)
    g_ptr = _layer_pointer(g_tab, layer, G_DTYPE, G_ALIGNED)
    bp_ptr = pinv_ptr + layer * r * p
    vbp_ptr = pinv_ptr + (layers + layer) * r * p
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
    slot = part_ptr + (pid_m.to(tl.int64) * 2 * layers + layer) * r * q
    tl.store(slot + right_at, acc_g, mask=right_in)
    tl.store(slot + layers * r * q + right_at, acc_abs, mask=right_in)


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
    constants = dict(r=r, R_PAD=_r_pad(r), DECAY=decay is not None, W_DTYPE=_TL_DTYPES[w_dtype],
                     G_DTYPE=_TL_DTYPES[g_dtype], W_ALIGNED=w_aligned, G_ALIGNED=g_aligned,
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
    constants = dict(r=r, R_PAD=_r_pad(r), G_DTYPE=_TL_DTYPES[g_dtype], G_ALIGNED=g_aligned,
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
