"""Fused LoRA-Pro full-mode step: Adam moments of ``g~`` updated tile by tile, projections accumulated on the fly.

The torch reference is :func:`lit_lowrank.optim.lora_pro.update.torch_moments_and_projections`; this
module's :func:`moments_and_projections` takes the same arguments and gives the same results (to fp32
rounding: reductions run in another order). Per layer and per (BLOCK_M x BLOCK_N) tile of the m x n weight:

1. ``g~_tile = U_t[:, rows]^T @ V[:, cols]`` (K = 2r, in zero-padded chunks of BLOCK_K >= 16 for ``tl.dot``);
2. ``m = lerp(m, g~, 1 - beta1)``, ``v = beta2 v + (1 - beta2) g~^2`` in place (fp32);
3. ``G = (m / (sqrt(v) / bc2 + eps)) / bc1`` (IEEE-rounded sqrt and divisions, like torch);
4. split-K partial sums of the projections:
   ``B^T G`` over the program's rows -> ``part_a[pid_m, :, cols]`` (a program covers ROW_TILES row
   tiles and sums them in registers, or stores per tile in r chunks of BLOCK_R when ROW_TILES = 1) and
   ``A G^T`` over the tile's columns -> ``part_b[pid_n, :, rows]`` (r chunks of BLOCK_R).

``g~`` and ``G`` never reach memory. The partial buffers are summed by torch afterwards in a fixed
order, so results are deterministic (no atomics). Ragged edges are masked: out-of-range rows, columns,
K and r entries load as 0, so they contribute ``G = 0`` to the sums and are never stored.

A layer whose ``ok`` flag is 0 (non-finite gradients) keeps its moments bit-for-bit: its stores are
masked off and ``G`` is formed from the old moments, so its (discarded) projections stay finite even
when ``U_t``/``V`` hold NaN. The caller keeps its parameters and step count unchanged.

Launches: one per layer over a (row tiles, column tiles) grid; the per-layer Adam coefficients come from
a device tensor, so nothing syncs with the host. On GPU the block sizes are autotuned per (m, n, r, dot
precision) with the moments restored after each trial, so the first call for a shape must happen outside
CUDA-graph capture. Under ``TRITON_INTERPRET=1`` one fixed small config runs on CPU tensors (tests). The kernel calls
only Triton builtins, none of ``triton.language.standard``'s jitted helpers (``tl.zeros``...): those are
built when triton is imported, which e.g. ``import lightning`` does early, and then fail in the
interpreter; so the variable need only be set before this module is imported.
"""
from __future__ import annotations

from collections.abc import Sequence

import torch
import triton
import triton.language as tl

from lit_lowrank.kernels.dispatch import built_by_interpreter
from lit_lowrank.kernels.dispatch import dot_precision as _dot_precision

#: Block sizes tried on GPU; why ROW_TILES and no 128 x 128 tiles: docs/design.md.
GPU_CONFIGS = [
    triton.Config({"BLOCK_M": 64, "BLOCK_N": 64, "ROW_TILES": 1}, num_warps=4, num_stages=1),
    triton.Config({"BLOCK_M": 64, "BLOCK_N": 64, "ROW_TILES": 1}, num_warps=8, num_stages=1),
    triton.Config({"BLOCK_M": 128, "BLOCK_N": 64, "ROW_TILES": 1}, num_warps=8, num_stages=1),
    triton.Config({"BLOCK_M": 64, "BLOCK_N": 128, "ROW_TILES": 1}, num_warps=8, num_stages=1),
    triton.Config({"BLOCK_M": 64, "BLOCK_N": 64, "ROW_TILES": 4}, num_warps=8, num_stages=1),
    triton.Config({"BLOCK_M": 64, "BLOCK_N": 128, "ROW_TILES": 4}, num_warps=8, num_stages=1),
]
#: Largest r for which configs with ROW_TILES > 1 are tried.
MAX_R_ROW_SUM = 128
#: The interpreter's one config: small tiles, so tests with tiny layers still cover several tiles and chunks.
INTERPRETER_CONFIG = {"BLOCK_M": 32, "BLOCK_N": 32, "BLOCK_K": 16, "BLOCK_R": 16, "ROW_TILES": 2}


def _prune(configs, named_args, **kwargs):
    """Drop the register-summing configs for large r (their (r x BLOCK_N) sum would spill)."""
    return [c for c in configs if c.kwargs["ROW_TILES"] == 1 or named_args["r"] <= MAX_R_ROW_SUM]


@triton.jit
def _full_step_tile(
    u_ptr, v_ptr, a_ptr, bt_ptr,  # U_t (2r, m), V (2r, n), A (r, n), B_t (r, m): row-major, one layer
    avg_ptr, avg_sq_ptr,  # the layer's moments (m, n), fp32, updated in place
    coef_ptr,  # the layer's row of coefficients(): 8 fp32
    part_a_ptr, part_b_ptr,  # partial sums (slots_m, r, n) and (slots_n, r, m), contiguous
    m, n, r: tl.constexpr,  # r is compiled in: a model has few ranks, and the chunk loops become static
    stride_avg_m, stride_avg_n, stride_sq_m, stride_sq_n,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_R: tl.constexpr,
    ROW_TILES: tl.constexpr,  # row tiles per program; > 1 sums B^T G over them in registers (r x BLOCK_N)
    R_PAD: tl.constexpr,  # r rounded up to a power of two >= 16 (the register sum's rows)
    DOT_PRECISION: tl.constexpr,
):
    pid_m = tl.program_id(0)
    pid_n = tl.program_id(1)
    cols = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    col_in = cols < n
    cols64 = cols.to(tl.int64)[None, :]
    weight1 = tl.load(coef_ptr + 0)
    decay2 = tl.load(coef_ptr + 1)
    value2 = tl.load(coef_ptr + 2)
    bc1 = tl.load(coef_ptr + 3)
    bc2_sqrt = tl.load(coef_ptr + 4)
    eps = tl.load(coef_ptr + 5)
    ok = tl.load(coef_ptr + 6) != 0.0
    slot_a = part_a_ptr + pid_m.to(tl.int64) * r * n
    slot_b = part_b_ptr + pid_n.to(tl.int64) * r * m
    if ROW_TILES > 1:
        rs_all = tl.arange(0, R_PAD)
        proj_a = tl.full((R_PAD, BLOCK_N), 0.0, tl.float32)

    for t in range(ROW_TILES):
        rows = (pid_m * ROW_TILES + t) * BLOCK_M + tl.arange(0, BLOCK_M)
        row_in = rows < m

        # 1. g~ on this tile, K = 2r in zero-padded chunks.
        g = tl.full((BLOCK_M, BLOCK_N), 0.0, tl.float32)
        for k0 in range(0, 2 * r, BLOCK_K):
            ks = k0 + tl.arange(0, BLOCK_K)
            k_in = ks < 2 * r
            u = tl.load(u_ptr + ks[None, :] * m + rows[:, None], mask=row_in[:, None] & k_in[None, :], other=0.0)
            v = tl.load(v_ptr + ks[:, None] * n + cols[None, :], mask=k_in[:, None] & col_in[None, :], other=0.0)
            g = tl.dot(u, v, g, input_precision=DOT_PRECISION)

        # 2. Moments in place; a skipped layer (ok == 0) keeps the old values and stores nothing.
        tile = row_in[:, None] & col_in[None, :]
        rows64 = rows.to(tl.int64)[:, None]
        avg_at = avg_ptr + rows64 * stride_avg_m + cols64 * stride_avg_n
        sq_at = avg_sq_ptr + rows64 * stride_sq_m + cols64 * stride_sq_n
        avg_old = tl.load(avg_at, mask=tile, other=0.0)
        sq_old = tl.load(sq_at, mask=tile, other=0.0)
        # torch.lerp's two formulas (the second is exact at weight 1).
        avg = tl.where(weight1 < 0.5, avg_old + weight1 * (g - avg_old), g - (g - avg_old) * (1.0 - weight1))
        sq = sq_old * decay2 + value2 * g * g  # torch: mul_ then addcmul_
        avg = tl.where(ok, avg, avg_old)
        sq = tl.where(ok, sq, sq_old)
        write = tl.where(ok, tile, False)  # not `tile & ok`: the interpreter cannot `&` a scalar with a block
        tl.store(avg_at, avg, mask=write)
        tl.store(sq_at, sq, mask=write)

        # 3. Adam direction; 0 outside the layer (avg = 0 there and eps > 0).
        denom = tl.div_rn(tl.sqrt_rn(sq), bc2_sqrt) + eps
        G = tl.div_rn(tl.div_rn(avg, denom), bc1)

        # 4. Projections: B^T G summed in registers over the row tiles, or stored per tile in r chunks;
        #    A G^T stored per tile in r chunks (its sum runs over column tiles, i.e. other programs).
        if ROW_TILES > 1:
            bt = tl.load(bt_ptr + rs_all[:, None] * m + rows[None, :], mask=(rs_all < r)[:, None] & row_in[None, :],
                         other=0.0)
            proj_a = tl.dot(bt, G, proj_a, input_precision=DOT_PRECISION)
        for r0 in range(0, r, BLOCK_R):
            rs = r0 + tl.arange(0, BLOCK_R)
            r_in = rs < r
            if ROW_TILES == 1:
                bt = tl.load(bt_ptr + rs[:, None] * m + rows[None, :], mask=r_in[:, None] & row_in[None, :], other=0.0)
                tl.store(slot_a + rs[:, None] * n + cols[None, :], tl.dot(bt, G, input_precision=DOT_PRECISION),
                         mask=r_in[:, None] & col_in[None, :])
            a = tl.load(a_ptr + rs[:, None] * n + cols[None, :], mask=r_in[:, None] & col_in[None, :], other=0.0)
            tl.store(slot_b + rs[:, None] * m + rows[None, :], tl.dot(a, tl.trans(G), input_precision=DOT_PRECISION),
                     mask=r_in[:, None] & row_in[None, :])

    if ROW_TILES > 1:
        tl.store(slot_a + rs_all[:, None] * n + cols[None, :], proj_a, mask=(rs_all < r)[:, None] & col_in[None, :])


INTERPRETED = built_by_interpreter(_full_step_tile)
_autotuned = None if INTERPRETED else triton.autotune(
    configs=GPU_CONFIGS, key=["m", "n", "r", "DOT_PRECISION"], restore_value=["avg_ptr", "avg_sq_ptr"],
    prune_configs_by={"early_config_prune": _prune},
)(_full_step_tile)


def _pow2_between(value: int, low: int, high: int) -> int:
    return max(low, min(high, triton.next_power_of_2(value)))


def dot_precision(device: torch.device) -> str:
    """fp32 ``tl.dot`` precision on ``device``: :func:`lit_lowrank.kernels.dispatch.dot_precision` (``tf32x3`` on
    NVIDIA).

    The kernel does 8 r flops per weight entry against 16 bytes of moments, so with fp32 FMAs (``ieee``) it turns
    compute-bound above r ~ 40 on an H100; ``tf32x3`` keeps fp32-level agreement with torch on tensor cores; plain
    ``tf32`` would round the inputs of ``g~`` to 10 mantissa bits (~1e-3 relative), which then enters the fp32 state.
    """
    return _dot_precision(device, INTERPRETED)


def coefficients(ok: torch.Tensor, bc1: torch.Tensor, bc2_sqrt: torch.Tensor, *,
                 beta1: float, beta2: float, eps: float) -> torch.Tensor:
    """(L, 8) fp32 per-layer Adam coefficients in the order the kernel loads them, built on the device.

    Rows of 8 (32 bytes) keep every row pointer 16-byte aligned; no host-to-device copy, no sync.
    """
    live = ok.to(torch.float32)
    columns = [
        live * (1 - beta1),  # 0: lerp weight of the first moment, 0 for a skipped layer
        torch.where(ok, beta2, 1.0).to(torch.float32),  # 1: decay of the second moment, 1 if skipped
        torch.full_like(live, 1 - beta2),  # 2: weight of g~^2
        bc1.to(torch.float32),  # 3: 1 - beta1^t
        bc2_sqrt.to(torch.float32),  # 4: sqrt(1 - beta2^t)
        torch.full_like(live, eps),  # 5
        live,  # 6: ok
        torch.zeros_like(live),  # 7: padding
    ]
    return torch.stack(columns, dim=1).contiguous()


def moments_and_projections(
    A: torch.Tensor,
    B_t: torch.Tensor,
    U_t: torch.Tensor,
    V: torch.Tensor,
    exp_avg: Sequence[torch.Tensor],
    exp_avg_sq: Sequence[torch.Tensor],
    ok: torch.Tensor,
    bc1: torch.Tensor,
    bc2_sqrt: torch.Tensor,
    *,
    beta1: float,
    beta2: float,
    eps: float,
    precision: str | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Update the moments of L layers in place and return ``(B^T G, A G^T transposed)``, each (L, r, k).

    Same contract as the torch reference (see the module docstring); all tensors fp32 on one device,
    ``eps`` already raised to at least fp32's ``tiny``. ``precision``: ``tl.dot``'s ``input_precision``
    (default :func:`dot_precision`; ignored by the interpreter, which multiplies in fp32).
    """
    L, r, n = A.shape
    m = B_t.shape[-1]
    A, B_t, U_t, V = (t.contiguous() for t in (A, B_t, U_t, V))
    coef = coefficients(ok, bc1, bc2_sqrt, beta1=beta1, beta2=beta2, eps=eps)
    proj_A = torch.empty_like(A)
    proj_B_t = torch.empty_like(B_t)
    if INTERPRETED:
        kernel, fixed = _full_step_tile, dict(INTERPRETER_CONFIG)
        configs = [fixed]
    else:
        kernel = _autotuned
        fixed = {"BLOCK_K": _pow2_between(2 * r, 16, 64), "BLOCK_R": _pow2_between(r, 16, 64)}
        configs = [c.kwargs for c in _prune(GPU_CONFIGS, {"r": r})]
    fixed["R_PAD"] = max(16, triton.next_power_of_2(r))
    fixed["DOT_PRECISION"] = precision or dot_precision(A.device)
    # Sized for the config with the most slots; a launch fills the first slots(config) of them. One buffer
    # pair serves all layers: the stream orders each layer's sums before the next launch overwrites it.
    part_a = torch.empty((max(_slots_m(m, c) for c in configs), r, n), device=A.device, dtype=torch.float32)
    part_b = torch.empty((max(_slots_n(n, c) for c in configs), r, m), device=A.device, dtype=torch.float32)

    def grid(meta):
        return _slots_m(m, meta), _slots_n(n, meta)

    for i, (avg, avg_sq) in enumerate(zip(exp_avg, exp_avg_sq)):
        kernel[grid](
            U_t[i], V[i], A[i], B_t[i], avg, avg_sq, coef[i], part_a, part_b,
            m, n, r, avg.stride(0), avg.stride(1), avg_sq.stride(0), avg_sq.stride(1),
            **fixed,
        )
        used = fixed if INTERPRETED else kernel.best_config.kwargs
        torch.sum(part_a[: _slots_m(m, used)], dim=0, out=proj_A[i])
        torch.sum(part_b[: _slots_n(n, used)], dim=0, out=proj_B_t[i])
    return proj_A, proj_B_t


def _slots_m(m: int, config: dict) -> int:
    """Programs along the rows = slots of the ``B^T G`` partial sums."""
    return triton.cdiv(m, config["BLOCK_M"] * config["ROW_TILES"])


def _slots_n(n: int, config: dict) -> int:
    """Programs along the columns = slots of the ``A G^T`` partial sums."""
    return triton.cdiv(n, config["BLOCK_N"])
