"""The Triton kernels of the fused LoRA-Pre Adam passes and their tilings; launched by
:mod:`lit_lowrank.kernels.lora_pre_adam` (batching, autotuning, launchers: its docstring), which is the module to
import. With the optimizer's algebra (``kappa = beta1 / (1 - beta1)``, ``rho = sqrt(beta2 / (1 - beta2))``,
constants folded into ``step_size`` and ``eps_hat``), for each layer ``l`` of the batch:

**Pass 1** (:func:`_first_pass`; grid: row blocks x column slots x layers; a program owns BLOCK_M rows of one
layer and a slot of COL_TILES consecutive BLOCK_N-column tiles, visited in order). Per tile:

1. ``g A_pinv^T`` and ``|g| V_A_pinv^T`` added to two BLOCK_M x R_PAD fp32 accumulators (R_PAD: r padded to a
   power of two >= 16 for ``tl.dot``), i.e. split-K partial sums over the slot's columns (:func:`_right_products`);
2. ``m = g + kappa * (B A)`` and ``root_v = hypot(|g|, rho * (V_B V_A)) + eps_hat`` (K = r in BLOCK_R chunks:
   :func:`_moment_products`, :func:`_adam_direction`); ``hypot`` is formed without squares, which overflow fp32
   for |g| > 1.8e19, as in the torch path; with an update bound (``FLOOR``)
   ``root_v = max(hypot(...), floor * |m|) + eps_hat``, in registers (no extra pass);
3. ``W <- W * (1 - lr wd)`` rounded to W's dtype (the torch path's in-place ``mul_``), then
   ``W <- W + (-step_size * m) / root_v`` (IEEE division, like ``addcdiv_``), stored in W's dtype
   (:func:`_update_w`).

The accumulators go to ``partials[slot, :, l]``; one ``torch.sum`` over the slots gives ``(2, L, p, r)``. With the
step on the device, each layer's scalars come from its step count and finite flag (:func:`_device_step`, whose
:func:`_step_scalars` is the optimizer's ``adam_step_tensors`` line by line), and a skipped layer's W is not stored.

**Pass 2** (:func:`_second_pass`, reads only ``g``; grid: column blocks x row slots x layers): ``B_pinv g`` and
``V_B_pinv |g|`` (R_PAD x BLOCK_N accumulators) summed over ROW_TILES consecutive row tiles ->
``partials[slot, :, l]``, summed by one ``torch.sum`` into ``(2, L, r, q)``.

Ragged edges are masked: rows, columns and rank entries outside the matrix load as 0, so they add nothing to
the sums, and are never stored. The kernels' helpers are ``triton.jit`` functions too, inlined where they are
called. The kernels call only Triton builtins (no ``triton.language.standard`` helpers such as ``tl.zeros`` or
``tl.cdiv``), so ``TRITON_INTERPRET=1`` need only be set before this module is imported.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

#: Fixed reduction tiling (see the module docstring): pass 1 sums BLOCK_N * COL_TILES = 512 columns per slot,
#: pass 2 BLOCK_M * ROW_TILES = 512 rows. Each pass's partial sums then cost r / 32 bytes per weight entry
#: (written by the kernel, read by torch.sum), and q / 512 (p / 512) slots times p / BLOCK_M (q / BLOCK_N) row
#: (column) blocks still make a few hundred programs per layer at Llama-1B shapes.
FIRST_PASS_REDUCTION = {"BLOCK_N": 32, "COL_TILES": 16}
SECOND_PASS_REDUCTION = {"BLOCK_M": 64, "ROW_TILES": 8}

#: Configs tried on GPU: only the non-reducing tile size, warps and stages vary. Chosen by compiling for sm_90
#: with Triton's bundled ptxas (no GPU at hand; ``tests/kernels/test_lora_pre_adam_gpu_build.py`` keeps compiling
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
TL_DTYPES = {torch.float32: tl.float32, torch.bfloat16: tl.bfloat16, torch.float16: tl.float16}


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
def _layer_factors(left_ptr, right_ptr, pinv_ptr, layer, layers, p, q, r: tl.constexpr):
    """Layer ``layer``'s B, V_B (in ``left``), A, V_A (``right``) and A_pinv, V_A_pinv (``pinv``) in their
    ``(2, L, ...)`` stacks; int64 offsets (``layer``, ``layers``), as L * p * r may pass 2^31."""
    b_ptr = left_ptr + layer * p * r
    vb_ptr = left_ptr + (layers + layer) * p * r
    a_ptr = right_ptr + layer * r * q
    va_ptr = right_ptr + (layers + layer) * r * q
    ap_ptr = pinv_ptr + layer * r * q
    vap_ptr = pinv_ptr + (layers + layer) * r * q
    return b_ptr, vb_ptr, a_ptr, va_ptr, ap_ptr, vap_ptr


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
def _device_step(step_ptr, ok_ptr, layer, log_beta1, log_beta2, one_minus_beta1, root_one_minus_beta2, rho0,
                 lr_scale, eps, log_ratio, one_minus_ratio, worst_case_scale, DEBIAS: tl.constexpr,
                 BOUND: tl.constexpr):
    """Layer ``layer``'s fp32 ``(rho, -step_size, eps_hat, floor)`` from its step count (computed in fp64), and
    its finite flag: whether its W is stored."""
    t = tl.maximum(tl.load(step_ptr + layer).to(tl.float64), 1.0)  # a skipped first step counts 0: dropped
    rho64, step64, eps64, floor64 = _step_scalars(t, log_beta1, log_beta2, one_minus_beta1, root_one_minus_beta2,
                                                  rho0, lr_scale, eps, log_ratio, one_minus_ratio, worst_case_scale,
                                                  DEBIAS, BOUND)
    rho, neg_step = rho64.to(tl.float32), (-step64).to(tl.float32)
    eps_hat, floor = eps64.to(tl.float32), floor64.to(tl.float32)
    return rho, neg_step, eps_hat, floor, tl.load(ok_ptr + layer) != 0


@triton.jit
def _right_products(g, abs_g, ap_ptr, vap_ptr, cols, col_in, ks, k_in, q, acc_g, acc_abs,
                    DOT_PRECISION: tl.constexpr):
    """``acc_g + g A_pinv^T`` and ``acc_abs + |g| V_A_pinv^T`` over one tile's columns (A_pinv^T tile:
    BLOCK_N x R_PAD)."""
    right_t_at = ks[None, :] * q + cols[:, None]
    right_t_in = col_in[:, None] & k_in[None, :]
    ap_t = tl.load(ap_ptr + right_t_at, mask=right_t_in, other=0.0)
    acc_g = tl.dot(g, ap_t, acc_g, input_precision=DOT_PRECISION)
    vap_t = tl.load(vap_ptr + right_t_at, mask=right_t_in, other=0.0)
    acc_abs = tl.dot(abs_g, vap_t, acc_abs, input_precision=DOT_PRECISION)
    return acc_g, acc_abs


@triton.jit
def _moment_products(b_ptr, vb_ptr, a_ptr, va_ptr, rows64, row_in, cols, col_in, q, r: tl.constexpr,
                     R_PAD: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_R: tl.constexpr,
                     DOT_PRECISION: tl.constexpr):
    """``B A`` and ``V_B V_A`` on one BLOCK_M x BLOCK_N tile, K = r in chunks of BLOCK_R (the factors' rows stay
    in L1; registers hold one chunk at a time)."""
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
    return ba, vv


@triton.jit
def _adam_direction(g, abs_g, ba, vv, kappa, rho, eps_hat, floor, FLOOR: tl.constexpr):
    """``m_t / (1 - beta1)`` and ``(sqrt(v_t / (1 - beta2^t)) + eps) / c``, as in the torch path, from one tile's
    ``g``, ``B A`` and ``V_B V_A``."""
    m = g + kappa * ba
    root_v = _hypot(rho * vv, abs_g)
    if FLOOR:  # the update bound: sqrt(v_hat) >= |m_hat| / sqrt(C), see the optimizer's adam_step_constants
        root_v = tl.maximum(root_v, floor * tl.abs(m), propagate_nan=tl.PropagateNan.ALL)
    return m, root_v + eps_hat


@triton.jit
def _update_w(w_at, tile, store_w, m, root_v, neg_step, decay, DECAY: tl.constexpr, W_DTYPE: tl.constexpr,
              SOFT_BF16: tl.constexpr):
    """One tile of W (at ``w_at``, where ``tile``) decayed, stepped by ``-step_size * m / root_v`` and stored
    (where ``store_w`` too), rounding to W's dtype where the torch path does."""
    w = tl.load(w_at, mask=tile, other=0.0)
    if DECAY:  # the torch path decays in place first: one rounding to W's dtype
        w = _round_to(w.to(tl.float32) * decay, W_DTYPE, SOFT_BF16)
    w = w.to(tl.float32) + tl.div_rn(neg_step * m, root_v)
    tl.store(w_at, _round_to(w, W_DTYPE, SOFT_BF16), mask=tile & store_w)


@triton.jit
def _store_pair(slot, at, mask, role_stride, acc_g, acc_abs):
    """A program's two accumulators into its slot of the partial sums: ``acc_abs`` one role (``role_stride``) on."""
    tl.store(slot + at, acc_g, mask=mask)
    tl.store(slot + role_stride + at, acc_abs, mask=mask)


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
    b_ptr, vb_ptr, a_ptr, va_ptr, ap_ptr, vap_ptr = _layer_factors(left_ptr, right_ptr, pinv_ptr, layer, layers,
                                                                   p, q, r)
    store_w = True
    if STEP_ON_DEVICE:  # the scalars from the layer's step count, and no store of W where its step is skipped
        rho, neg_step, eps_hat, floor, store_w = _device_step(
            step_ptr, ok_ptr, layer, log_beta1, log_beta2, one_minus_beta1, root_one_minus_beta2, rho0, lr_scale,
            eps, log_ratio, one_minus_ratio, worst_case_scale, DEBIAS, BOUND)
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
        acc_g, acc_abs = _right_products(g, abs_g, ap_ptr, vap_ptr, cols, col_in, ks, k_in, q, acc_g, acc_abs,
                                         DOT_PRECISION)
        ba, vv = _moment_products(b_ptr, vb_ptr, a_ptr, va_ptr, rows64, row_in, cols, col_in, q, r, R_PAD, BLOCK_M,
                                  BLOCK_N, BLOCK_R, DOT_PRECISION)
        m, root_v = _adam_direction(g, abs_g, ba, vv, kappa, rho, eps_hat, floor, FLOOR)
        _update_w(w_ptr + rows64 * stride_wp + cols64 * stride_wq, tile, store_w, m, root_v, neg_step, decay,
                  DECAY, W_DTYPE, SOFT_BF16)

    left_at = rows64 * r + ks[None, :]
    left_in = row_in[:, None] & k_in[None, :]
    slot = part_ptr + (pid_n.to(tl.int64) * 2 * layers + layer) * p * r  # partials[pid_n, 0, layer]
    _store_pair(slot, left_at, left_in, layers * p * r, acc_g, acc_abs)


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
    _store_pair(slot, right_at, right_in, layers * r * q, acc_g, acc_abs)
