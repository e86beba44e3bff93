"""Time the Triton optimizer kernels on a GPU against torch's fused AdamW over the same m x n state.

Rows (one per kernel, shape, rank and adapter dtype; L layers of the shape per step):

- ``adamw_fused``: ``torch.optim.AdamW(fused=True)`` on L fp32 m x n parameters: the baseline of ``ratio``.
- ``lora_pro_full_kernel``: the fused moments-and-projections kernel alone (``lit_lowrank.kernels.lora_pro_full``).
- ``lora_pro_full_step``: the whole full-mode update, ``full_mode_update(use_triton=True)`` (kernel + r x r
  solves + parameter update), from precomputed ``U_t``, ``V`` and Gram spectrum.
- ``lora_pro_full_torch``: the same update on the torch reference path (``use_triton=False``).
- ``adamw_fused`` with dtype bfloat16: ``AdamW(fused=True)`` on bf16 parameters (bf16 moments: torch's fused
  AdamW keeps state in the parameters' dtype); the baseline of the bf16 LoRA-Pre rows.
- ``lora_pre_adam_step``: a whole LoRA-Pre Adam step of a batch of L p x q parameters of ``dtype`` (fp32
  factors), ``lora_pre_adam_step_(use_triton=True)`` as the optimizer runs it on a GPU (step counts and skip flags
  on the device, nothing read on the host): two batched damped pseudo-inverses and the factor updates in torch,
  the p x q work in the two batched passes of ``lit_lowrank.kernels.lora_pre_adam`` (fp32 dots as ``tf32x3``; one
  launch per pass whatever L is); ``lora_pre_adam_torch``: the same step on the torch backend
  (``use_triton=False``); ``lora_pre_adam_passes``: the two kernel passes alone (pseudo-inverses precomputed), i.e.
  what is left when the small torch ops cost nothing (CUDA graphs); ``..._tf32``: the same with plain tf32 dots.

``dtype`` is the adapters' dtype: the factors are rounded to it, then converted to fp32 as the optimizer
does before these calls (state is fp32 either way), so it changes values, not the work.

Timing: CUDA events around each call, ``--warmup`` untimed calls (they also compile and autotune), then the
median of ``--repeats``. ``GB/s`` counts the bytes an ideal implementation must move, per element of
the m x n state: AdamW reads parameter, gradient and both moments and writes three (28 B in fp32); a
LoRA-Pro full step reads and writes both moments (16 B) plus the small factors. The kernel moves more
than that (its split-K partial sums, ``8 r (1 / (BLOCK_M ROW_TILES) + 1 / BLOCK_N)`` B per element, shown
in ``config``), so ``GB/s`` is an effective rate. A LoRA-Pre Adam step must read ``g`` and ``W``, write ``W``
and read ``g`` again (4 words per entry: 16 B in fp32, 8 B in bf16) plus the factors (read and written, and the
pseudo-inverses read: 12 (p + q) r fp32 words); the kernel adds ``r / 16`` B of partial sums per entry and
whatever the L2 misses of the factors' re-reads cost. ``ratio`` divides by the fused AdamW row of the same shape
and, for LoRA-Pre, of the same parameter dtype (fp32 otherwise). ``% peak`` divides GB/s by the HBM bandwidth from
NVIDIA's datasheets (``PEAK_GBPS``; ``--peak-gbps`` overrides). ``max rel err`` compares the kernel's
new moments with the torch reference on the same inputs (fp32 ``tf32x3`` dots on NVIDIA); for LoRA-Pre, the
parameters' displacements and new factors (step rows), or the passes' outputs (pass rows), against the torch
backend's from the same state. The dispatcher's self-check (``lit_lowrank.kernels.dispatch``, on by default on
GPUs) runs once per key through ``use_triton=True``; its verdicts are printed and written at the end, and the
script exits 1 if one failed (the LoRA-Pro kernel rows and the LoRA-Pre pass rows bypass the dispatcher, so they
time the kernels even then; a LoRA-Pre step row whose check failed would time torch).

Adding a kernel: write ``bench_<name>(shape, r, dtype, args) -> list[Row]`` and append it to ``BENCHES``; the
table, CSV and ratio column pick it up.

    python benchmarks/kernels_gpu.py                       # Llama-1B shapes, r = 16 and 128
    python benchmarks/kernels_gpu.py --shapes 4096x4096 --ranks 64 --repeats 20

Writes ``kernels_gpu.csv`` and ``kernels_gpu.md`` under ``--out``. Without a GPU it prints "no GPU
present" and exits 0 without writing anything.
"""
from __future__ import annotations

import argparse
import dataclasses
import os
import statistics
import sys
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

# A GPU benchmark of the interpreter would be meaningless; Triton reads this when kernels are imported.
os.environ.pop("TRITON_INTERPRET", None)

import torch  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))
import environment  # noqa: E402
import report  # noqa: E402

#: HBM bandwidth in GB/s by device-name substring, first match wins (NVIDIA datasheets: H200 "4.8TB/s";
#: H100 SXM "3.35TB/s", H100 NVL "3.9TB/s", H100 PCIe "2TB/s"; A100 80GB SXM "2,039GB/s", A100 40GB "1,555GB/s").
PEAK_GBPS = [
    ("H200", 4800.0),
    ("H100 NVL", 3900.0),
    ("H100 PCIe", 2000.0),
    ("H100", 3350.0),
    ("A100-SXM4-80GB", 2039.0),
    ("A100 80GB PCIe", 1935.0),
    ("A100", 1555.0),
]
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}
DEVICE = "cuda"


@dataclass
class Row:
    kernel: str
    shape: str
    rank: int | None
    dtype: str
    layers: int
    ms: float
    bytes_moved: float
    ratio: float = float("nan")
    gbps: float = float("nan")
    pct_peak: float = float("nan")
    max_rel_err: float = float("nan")
    config: str = ""
    baseline_dtype: str = "float32"  # ratio: ms over the adamw_fused row of this shape and dtype


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--shapes", nargs="+", default=["2048x2048", "2048x5461"], help="m x n weight shapes")
    parser.add_argument("--ranks", type=int, nargs="+", default=[16, 128], help="adapter ranks")
    parser.add_argument("--dtypes", nargs="+", default=["float32", "bfloat16"], choices=sorted(DTYPES),
                        help="adapter dtypes (optimizer state is fp32 either way)")
    parser.add_argument("--layers", type=int, default=4, help="layers of each shape stepped together")
    parser.add_argument("--repeats", type=int, default=50, help="timed calls (median reported)")
    parser.add_argument("--warmup", type=int, default=5, help="untimed calls first (compile, autotune)")
    parser.add_argument("--peak-gbps", type=float, default=None, help="HBM bandwidth; default from the device name")
    parser.add_argument("--out", type=Path, default=environment.RESULTS, help="folder for CSV and markdown")
    return parser.parse_args(argv)


def parse_shape(text: str) -> tuple[int, int]:
    m, n = text.lower().split("x")
    return int(m), int(n)


def gpu_name() -> str | None:
    return torch.cuda.get_device_name() if torch.cuda.is_available() else None


def peak_gbps(name: str) -> float | None:
    return next((gbps for key, gbps in PEAK_GBPS if key in name), None)


def cuda_ms(fn: Callable[[], object], warmup: int, repeats: int) -> float:
    """Median milliseconds of ``fn`` by CUDA events, one event pair per call."""
    for _ in range(warmup):
        fn()
    torch.cuda.synchronize()
    times = []
    for _ in range(repeats):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end))
    return statistics.median(times)


def bench_adamw(shape, args, dtype=torch.float32) -> Row:
    m, n = shape
    params = [torch.randn(m, n, device=DEVICE, dtype=dtype, requires_grad=True) for _ in range(args.layers)]
    for p in params:
        p.grad = torch.randn_like(p) * 1e-3
    opt = torch.optim.AdamW(params, lr=1e-4, weight_decay=0.01, fused=True)
    ms = cuda_ms(opt.step, args.warmup, args.repeats)
    dtype_name = str(dtype).replace("torch.", "")
    moved = 7.0 * params[0].element_size() * m * n * args.layers  # reads W, g, m, v; writes W, m, v
    return Row("adamw_fused", f"{m}x{n}", None, dtype_name, args.layers, ms, moved, baseline_dtype=dtype_name)


def lora_pro_inputs(shape, r, dtype, layers, seed=0):
    """Factors, precomputed spectrum and g~ factors of a trained-looking stack, and fresh fp32 moments."""
    from lit_lowrank.optim.lora_pro.closed_form import equivalent_factors, gram_spectrum

    m, n = shape
    gen = torch.Generator(device=DEVICE).manual_seed(seed)
    A = (torch.randn(layers, r, n, device=DEVICE, generator=gen) / n**0.5).to(dtype).float()
    B_t = (torch.randn(layers, r, m, device=DEVICE, generator=gen) * 0.01).to(dtype).float()
    grad_A = torch.randn(layers, r, n, device=DEVICE, generator=gen) * 1e-3
    grad_B_t = torch.randn(layers, r, m, device=DEVICE, generator=gen) * 1e-3
    spectrum = gram_spectrum(A, B_t)
    U_t, V = equivalent_factors(spectrum, A, B_t, grad_A, grad_B_t, 2.0)
    moments = ([torch.zeros(m, n, device=DEVICE) for _ in range(layers)],
               [torch.zeros(m, n, device=DEVICE) for _ in range(layers)])
    return A, B_t, U_t, V, spectrum, moments


def bench_lora_pro_full(shape, r, dtype, args) -> list[Row]:
    from lit_lowrank.kernels import lora_pro_full
    from lit_lowrank.optim.adamw import bias_corrections
    from lit_lowrank.optim.lora_pro.update import full_mode_update, torch_moments_and_projections

    m, n = shape
    L = args.layers
    A, B_t, U_t, V, spectrum, (avg, avg_sq) = lora_pro_inputs(shape, r, dtype, L)
    ok = torch.ones(L, dtype=torch.bool, device=DEVICE)
    step = torch.zeros(L, device=DEVICE)
    bc1, bc2_sqrt = bias_corrections(step + 1, 0.9, 0.999, torch.float32)
    hyper = dict(beta1=0.9, beta2=0.999, eps=1e-8)
    essential = 16.0 * m * n * L + 4.0 * L * 3 * r * (m + n)  # moments in and out, A, B_t, U_t, V read once
    tag, dtype_name = f"{m}x{n}", str(dtype).replace("torch.", "")
    rows = []
    for name, precision in (("lora_pro_full_kernel", None), ("lora_pro_full_kernel_tf32", "tf32")):
        # Accuracy on fresh moments: kernel vs torch reference on identical inputs.
        mine = ([t.clone() for t in avg], [t.clone() for t in avg_sq])
        ref = ([t.clone() for t in avg], [t.clone() for t in avg_sq])
        got = lora_pro_full.moments_and_projections(A, B_t, U_t, V, *mine, ok, bc1, bc2_sqrt, precision=precision,
                                                    **hyper)
        want = torch_moments_and_projections(A, B_t, U_t, V, *ref, ok, bc1, bc2_sqrt, **hyper)
        pairs = zip([*mine[0], *mine[1], *got], [*ref[0], *ref[1], *want])
        err = max(float((a - b).abs().max() / b.abs().max().clamp_min(1e-30)) for a, b in pairs)
        del mine, ref, got, want
        ms = cuda_ms(lambda: lora_pro_full.moments_and_projections(A, B_t, U_t, V, avg, avg_sq, ok, bc1, bc2_sqrt,
                                                                   precision=precision, **hyper),
                     args.warmup, args.repeats)
        rows.append(Row(name, tag, r, dtype_name, L, ms, essential, max_rel_err=err,
                        config=kernel_config(lora_pro_full, r)))
    update = dict(scaling=2.0, lr=1e-4, weight_decay=0.01, damping=1e-8, spectrum=spectrum, **hyper)
    for name, use_triton in (("lora_pro_full_step", True), ("lora_pro_full_torch", False)):
        ms = cuda_ms(lambda: full_mode_update(A, B_t, U_t, V, avg, avg_sq, step, ok, use_triton=use_triton, **update),
                     args.warmup, args.repeats)
        rows.append(Row(name, tag, r, dtype_name, L, ms, essential))
    return rows


def kernel_config(module, r: int) -> str:
    """The autotuned config of the last launch and its partial-sum traffic per weight entry."""
    best = module._autotuned.best_config if module._autotuned is not None else None
    if best is None:
        return "fixed (interpreter)"
    block_m, block_n, row_tiles = best.kwargs["BLOCK_M"], best.kwargs["BLOCK_N"], best.kwargs["ROW_TILES"]
    partials = 8 * r * (1 / (block_m * row_tiles) + 1 / block_n)
    return (f"BLOCK_M={block_m} BLOCK_N={block_n} ROW_TILES={row_tiles} warps={best.num_warps} "
            f"stages={best.num_stages} partials={partials:.1f} B/elt")


def lora_pre_inputs(shape, r, dtype, layers, seed=0):
    """L parameters of ``dtype`` with gradients, and fp32 factors as after some steps (B, V_B non-zero)."""
    from lit_lowrank.optim.lora_pre.factors import init_factor_pairs

    m, n = shape
    gen = torch.Generator(device=DEVICE).manual_seed(seed)
    params = [(torch.randn(m, n, device=DEVICE, generator=gen) * 0.02).to(dtype) for _ in range(layers)]
    grads = [(torch.randn(m, n, device=DEVICE, generator=gen) * 1e-3).to(dtype) for _ in range(layers)]
    factors = []
    for i in range(layers):
        (B, A), (V_B, V_A) = init_factor_pairs(shape, r, seed + i, 2, torch.float32, torch.device(DEVICE))
        B.normal_(std=1e-4, generator=gen)
        V_B.normal_(std=1e-4, generator=gen)
        factors.append([B, A, V_B, V_A])
    return params, grads, factors


def max_rel_err(pairs) -> float:
    return max(float((a.float() - b.float()).abs().max() / b.float().abs().max().clamp_min(1e-30)) for a, b in pairs)


def bench_lora_pre_adam(shape, r, dtype, args) -> list[Row]:
    from lit_lowrank.kernels import lora_pre_adam
    from lit_lowrank.optim.lora_pre.adam_passes import AdamHyper
    from lit_lowrank.optim.lora_pre.adam_update import lora_pre_adam_step_
    from lit_lowrank.optim.lora_pre.batch import MatrixBatch
    from lit_lowrank.optim.lora_pre.factors import Workspace

    m, n = shape
    L = args.layers
    params, grads, factors = lora_pre_inputs(shape, r, dtype, L)
    hyper = AdamHyper(lr=1e-4, beta1=0.9, beta2=0.999, eps=1e-8, weight_decay=0.01, scale=0.25, damping=1e-6,
                      factor_update="alternating", debias_second_moment=False,
                      residual_step=False)  # the kernels form m_t without the residual step
    size = params[0].element_size()
    essential = L * ((2 * size + 2 * grads[0].element_size()) * m * n + 4.0 * 12 * (m + n) * r)
    tag, dtype_name = f"{m}x{n}", str(dtype).replace("torch.", "")

    def batch_of(params, factors, workspace):  # the device-side skip, as LoRAPreAdamW steps on a GPU
        steps, oks = torch.full((L,), 10.0, device=DEVICE), torch.ones(L, dtype=torch.bool, device=DEVICE)
        return MatrixBatch.gather(params, grads, factors, step=steps, ok=oks, workspace=workspace)

    def step_error() -> float:
        """Parameters' displacements and new factors, kernel vs torch backend, one step from the same state."""
        after = {}
        for use_triton in (True, False):
            copies, workspace = [W.clone() for W in params], Workspace()
            batch = batch_of(copies, [[f.clone() for f in matrix] for matrix in factors], workspace)
            lora_pre_adam_step_(batch, hyper, workspace, use_triton)
            after[use_triton] = [*(W.float() - W0.float() for W, W0 in zip(copies, params)), batch.left, batch.right]
        return max_rel_err(zip(after[True], after[False]))

    rows = []
    for name, use_triton in (("lora_pre_adam_step", True), ("lora_pre_adam_torch", False)):
        err = step_error() if use_triton else float("nan")  # also the dispatcher's self-check at this key
        workspace = Workspace()
        batch = batch_of(params, factors, workspace)
        ms = cuda_ms(lambda: lora_pre_adam_step_(batch, hyper, workspace, use_triton), args.warmup, args.repeats)
        rows.append(Row(name, tag, r, dtype_name, L, ms, essential, max_rel_err=err,
                        config=pre_config(lora_pre_adam, r) if use_triton else "", baseline_dtype=dtype_name))
    rows += bench_lora_pre_passes(batch, hyper, essential, tag, r, dtype_name, args)
    return rows


def bench_lora_pre_passes(batch, hyper, essential, tag, r, dtype_name, args) -> list[Row]:
    """The two batched kernel passes alone, from precomputed pseudo-inverses, against the torch backend's passes."""
    from lit_lowrank.kernels import lora_pre_adam
    from lit_lowrank.optim.lora_pre.adam_passes import TorchAdamPasses
    from lit_lowrank.optim.lora_pre.adam_scalars import adam_rates, adam_step_constants
    from lit_lowrank.optim.lora_pre.batch import stacked_pinvs
    from lit_lowrank.optim.lora_pre.factors import Workspace

    workspace = Workspace()
    right_pinvs = stacked_pinvs(batch.right, "right_pinv", hyper.damping, workspace).clone()
    left_pinvs = stacked_pinvs(batch.left.mT, "left_pinv", hyper.damping, workspace).clone()
    c = adam_step_constants(step=10, lr=hyper.lr, beta1=hyper.beta1, beta2=hyper.beta2, eps=hyper.eps,
                            scale=hyper.scale, debias_second_moment=hyper.debias_second_moment)  # the default bound
    options = dict(kappa=adam_rates(hyper.beta1, hyper.beta2)[0], decay=1.0 - hyper.lr * hyper.weight_decay,
                   host_scalars=(c.rho, c.step_size, c.eps_hat, c.floor), scratch=workspace.get)

    def passes(params, precision):
        left = lora_pre_adam.first_pass(params, batch.grads, batch.left, batch.right, right_pinvs,
                                        precision=precision, **options)
        return left, lora_pre_adam.second_pass(batch.grads, left_pinvs, precision=precision,
                                               scratch=workspace.get)

    def error(precision) -> float:
        mine, ref = [W.clone() for W in batch.params], [W.clone() for W in batch.params]
        got = [t.clone() for t in passes(mine, precision)]
        torch_passes = TorchAdamPasses(dataclasses.replace(batch, params=ref), hyper, Workspace())
        want = [torch_passes.first_pass(right_pinvs), torch_passes.second_pass(left_pinvs)]
        moved = [(a.float() - W.float(), b.float() - W.float()) for a, b, W in zip(mine, ref, batch.params)]
        return max_rel_err([*moved, *zip(got, want)])

    rows = []
    for name, precision in (("lora_pre_adam_passes", None), ("lora_pre_adam_passes_tf32", "tf32")):
        err = error(precision)
        ms = cuda_ms(lambda: passes(batch.params, precision), args.warmup, args.repeats)
        rows.append(Row(name, tag, r, dtype_name, batch.size, ms, essential, max_rel_err=err,
                        config=pre_config(lora_pre_adam, r), baseline_dtype=dtype_name))
    return rows


def pre_config(module, r: int) -> str:
    """The autotuned configs of both passes' last launches."""
    first, second = module._first_autotuned, module._second_autotuned
    if first is None or first.best_config is None:
        return "fixed (interpreter)"
    a, b = first.best_config, second.best_config
    return (f"pass1 BLOCK_M={a.kwargs['BLOCK_M']} warps={a.num_warps} stages={a.num_stages}; "
            f"pass2 BLOCK_N={b.kwargs['BLOCK_N']} warps={b.num_warps} stages={b.num_stages}; "
            f"partials={r / 16:.1f} B/elt")


#: (name, function(shape, r, dtype, args) -> rows)
BENCHES: list[tuple[str, Callable]] = [("lora_pro_full", bench_lora_pro_full), ("lora_pre_adam", bench_lora_pre_adam)]


def self_check_verdicts() -> tuple[list[str], list[str]]:
    """The dispatcher's self-check keys that passed and failed in this process."""
    from lit_lowrank.kernels import dispatch

    verdicts = ([], [])
    for key, ok in dispatch._checked.items():
        verdicts[0 if ok else 1].append(", ".join(map(str, key)))
    return verdicts


def write_results(rows: list[Row], args: argparse.Namespace, device: str, peak: float | None,
                  checks: tuple[list[str], list[str]], env: dict) -> None:
    fields = ["kernel", "shape", "rank", "dtype", "layers", "ms", "ratio", "gbps", "pct_peak", "max_rel_err", "config"]
    csv_rows = [{**{k: v for k, v in asdict(row).items() if k in fields}, "device": device} for row in rows]
    table = [{"kernel": row.kernel, "shape": row.shape, "rank": f"{row.rank or ''}", "dtype": row.dtype,
              "ms": f"{row.ms:.3f}", "ratio": f"{row.ratio:.2f}", "gbps": f"{row.gbps:.0f}",
              "pct_peak": f"{row.pct_peak:.0f}",
              "max_rel_err": "" if row.max_rel_err != row.max_rel_err else f"{row.max_rel_err:.1e}",
              "config": row.config} for row in rows]
    body = [
        f"On {device} (peak {peak or 'unknown'} GB/s), {args.layers} layers per shape, median of {args.repeats} "
        f"calls after {args.warmup} warm-up calls.",
        "GB/s: bytes an ideal implementation moves / time (see the script's docstring); ratio: ms / fused AdamW ms, "
        "same shape.",
        "",
        *report.markdown_table(table, [
            ("kernel", "kernel"), ("shape", "shape"), ("rank", "rank"), ("dtype", "dtype"), ("ms", "ms"),
            ("ratio", "ratio vs fused AdamW"), ("gbps", "GB/s"), ("pct_peak", "% of peak"),
            ("max_rel_err", "max rel err"), ("config", "config")]),
        "",
        f"Self-check (kernel vs torch on the first call per key): {len(checks[0])} passed, {len(checks[1])} failed.",
        *[f"- FAILED: {key}" for key in checks[1]],
        "",
    ]
    report.write_result(args.out, "kernels_gpu", "Triton optimizer kernels vs fused AdamW", env, body,
                        {"kernels_gpu.csv": csv_rows}, {"kernels_gpu.csv": [*fields, "device"]})


def main(argv=None) -> int:
    args = parse_args(argv)
    device = gpu_name()
    if device is None:
        print("no GPU present: these benchmarks time CUDA kernels; nothing measured, nothing written.")
        return 0
    peak = args.peak_gbps or peak_gbps(device)
    env = environment.environment(environment.command_line(__file__, argv))
    rows: list[Row] = []
    for text in args.shapes:
        shape = parse_shape(text)
        baselines = {"float32": bench_adamw(shape, args)}
        if "bfloat16" in args.dtypes:
            baselines["bfloat16"] = bench_adamw(shape, args, torch.bfloat16)
        rows.extend(baselines.values())
        for r in args.ranks:
            for dtype_name in args.dtypes:
                for _, bench in BENCHES:
                    rows.extend(bench(shape, r, DTYPES[dtype_name], args))
                    torch.cuda.empty_cache()
        for row in rows:
            if row.shape == baselines["float32"].shape:
                row.ratio = row.ms / baselines.get(row.baseline_dtype, baselines["float32"]).ms
        torch.cuda.empty_cache()
    for row in rows:
        row.gbps = row.bytes_moved / (row.ms * 1e-3) / 1e9
        row.pct_peak = 100.0 * row.gbps / peak if peak else float("nan")
    header = (f"{'kernel':<26} {'shape':<10} {'rank':>4} {'dtype':<9} {'ms':>8} {'ratio':>6} {'GB/s':>6} "
              f"{'%peak':>5}  max rel err")
    print(f"{device}: peak {peak or 'unknown'} GB/s")
    print(header)
    for row in rows:
        print(f"{row.kernel:<26} {row.shape:<10} {row.rank or '':>4} {row.dtype:<9} {row.ms:8.3f} {row.ratio:6.2f} "
              f"{row.gbps:6.0f} {row.pct_peak:5.0f}  {row.max_rel_err:.1e}")
    checks = self_check_verdicts()
    print(f"self-check: {len(checks[0])} keys passed, {len(checks[1])} failed"
          + "".join(f"\n  FAILED: {k}" for k in checks[1]))
    write_results(rows, args, device, peak, checks, env)
    print(f"wrote {args.out / 'kernels_gpu.csv'} and {args.out / 'kernels_gpu.md'}")
    return 1 if checks[1] else 0


if __name__ == "__main__":
    sys.exit(main())
