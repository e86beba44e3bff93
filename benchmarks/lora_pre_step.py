"""Time one optimizer step on CPU: LoRA-Pre Adam against torch AdamW (foreach) and GaLore AdamW.

One weight matrix per shape (default 1024 x 1024 and 1024 x 2816, a Llama-350M attention and MLP matrix),
a fixed random gradient, and only ``optimizer.step()`` timed. The methods are interleaved within each repeat
(so load from other processes hits them alike); each ratio to AdamW is taken within a repeat and the
median over repeats is reported, with the median and minimum times.

GaLore recomputes its projection by SVD every ``--period`` steps (200, as in its paper), so its cost is
amortised over a whole period: ``(t_svd_step + (period - 1) * t_plain_step) / period``, both kinds of step
timed in every repeat. LoRA-Pre has no such periodic cost.

``--profile`` adds torch.profiler's breakdown of a LoRA-Pre step into: the p x q x r products (addmm), the
damped pseudo-inverses (float64 r x r Grams, Cholesky, conversions), element-wise passes, and the rest.

Writes ``lora_pre_step.csv`` and ``lora_pre_step.md`` (plus ``lora_pre_step_profile.csv`` with ``--profile``)
under ``--out``.

    python benchmarks/lora_pre_step.py --profile          # a few minutes on 2 CPU cores
    python benchmarks/lora_pre_step.py --smoke --out /tmp/bench
"""

from __future__ import annotations

import argparse
import functools
import statistics
import sys
import time
import warnings
from collections import defaultdict
from pathlib import Path

import torch

from lit_lowrank.optim import LoRAPreAdamW

sys.path.insert(0, str(Path(__file__).resolve().parent))
import environment  # noqa: E402
import report  # noqa: E402
from sweep import galore_available  # noqa: E402
from timing import time_interleaved  # noqa: E402

PROFILE_CATEGORIES = {
    "p x q x r products (addmm)": ("aten::addmm", "aten::addmm_"),
    "damped pseudo-inverses (float64 Grams, Cholesky, products)": (
        "aten::bmm",
        "aten::linalg_cholesky_ex",
        "aten::cholesky_inverse",
        "aten::tril",
        "aten::stack",
        "aten::cat",
        "aten::sum",
        "aten::div",
        "aten::add",
        "aten::mul",
        "aten::any",
    ),
    "element-wise passes (hypot, abs, addcdiv, add)": (
        "aten::hypot",
        "aten::abs",
        "aten::add_",
        "aten::addcdiv_",
        "aten::mul_",
    ),
    "copies (float64 staging, g into the m buffer)": ("aten::copy_", "aten::_to_copy"),
}


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.ArgumentDefaultsHelpFormatter
    )
    parser.add_argument("--shapes", nargs="+", default=["1024x1024", "1024x2816"], help="p x q of the matrix")
    parser.add_argument("--ranks", type=int, nargs="+", default=[16, 128], help="LoRA-Pre and GaLore ranks")
    parser.add_argument("--period", type=int, default=200, help="GaLore's projection update period")
    parser.add_argument("--repeats", type=int, default=60, help="timed repeats (methods interleaved)")
    parser.add_argument("--warmup", type=float, default=2.0, help="seconds of untimed steps first")
    parser.add_argument("--threads", type=int, default=2, help="torch.set_num_threads")
    parser.add_argument(
        "--wait-idle", type=float, default=20.0, help="seconds to wait for idle CPUs before each repeat (0: never)"
    )
    parser.add_argument("--profile", action="store_true", help="also profile LoRA-Pre's step")
    parser.add_argument("--smoke", action="store_true", help="one small shape, two repeats: checks that it runs")
    parser.add_argument("--out", type=Path, default=environment.RESULTS, help="folder for CSV + md")
    args = parser.parse_args(argv)
    if args.smoke:
        args.shapes, args.ranks, args.repeats, args.warmup, args.wait_idle = ["64x96"], [4], 2, 0.0, 0.0
    args.shapes = [tuple(int(size) for size in shape.split("x")) for shape in args.shapes]
    return args


def galore_optimizer(param: torch.nn.Parameter, rank: int, period: int):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        from galore_torch import GaLoreAdamW

        group = {"params": [param], "rank": rank, "update_proj_gap": period, "scale": 0.25, "proj_type": "std"}
        return GaLoreAdamW([group], no_deprecation_warning=True)


def galore_step(optimizer: torch.optim.Optimizer, counter: int) -> None:
    """One GaLore step that re-projects (SVD) iff ``counter % period == 0``: GaLore decides from its step count
    before the step, so the count is set first."""
    param = optimizer.param_groups[0]["params"][0]
    optimizer.state[param]["step"] = counter
    optimizer.step()


def make_steppers(shape: tuple[int, int], ranks: list[int], period: int) -> dict:
    """name -> function running one step of that method on its own copy of the weight."""
    generator = torch.Generator().manual_seed(0)
    weight, grad = torch.randn(shape, generator=generator), torch.randn(shape, generator=generator)

    def parameter():
        param = torch.nn.Parameter(weight.clone())
        param.grad = grad
        return param

    steppers = {"adamw_foreach": torch.optim.AdamW([parameter()], foreach=True).step}
    for rank in ranks:
        steppers[f"lora_pre_r{rank}"] = LoRAPreAdamW([parameter()], rank=rank).step
    if galore_available():
        for rank in ranks:
            optimizer = galore_optimizer(parameter(), rank, period)
            optimizer.step()  # creates the state and the first projection
            steppers[f"galore_r{rank}_plain"] = functools.partial(galore_step, optimizer, 1)
            steppers[f"galore_r{rank}_svd"] = functools.partial(galore_step, optimizer, period)
    return steppers


def summarise(shape, times: dict[str, list[float]], clean: list[bool], ranks: list[int], period: int) -> list[dict]:
    """Median / min per method and the median of per-repeat ratios to AdamW, over the clean repeats (over all
    of them if fewer than 10 were clean)."""
    keep = clean if sum(clean) >= 10 else [True] * len(clean)
    times = {name: [t for t, k in zip(values, keep) if k] for name, values in times.items()}
    repeats = len(times["adamw_foreach"])
    per_repeat = {name: values for name, values in times.items() if not name.startswith("galore")}
    for rank in ranks:
        if f"galore_r{rank}_plain" in times:
            plain, svd = times[f"galore_r{rank}_plain"], times[f"galore_r{rank}_svd"]
            per_repeat[f"galore_r{rank}_amortised"] = [(s + (period - 1) * p) / period for p, s in zip(plain, svd)]
    rows = []
    for name, values in per_repeat.items():
        ratios = [value / adamw for value, adamw in zip(values, times["adamw_foreach"])]
        rows.append(
            {
                "shape": f"{shape[0]}x{shape[1]}",
                "method": name,
                "median_ms": round(statistics.median(values) * 1e3, 3),
                "min_ms": round(min(values) * 1e3, 3),
                "median_ratio_to_adamw": round(statistics.median(ratios), 2),
                "repeats": repeats,
            }
        )
        if name.endswith("_amortised"):
            svd = times[name.replace("_amortised", "_svd")]
            rows[-1]["note"] = f"SVD step median {statistics.median(svd) * 1e3:.1f} ms, once per {period} steps"
    return rows


def profile_lora_pre(shape: tuple[int, int], rank: int, steps: int = 10) -> list[dict]:
    from torch.profiler import ProfilerActivity, profile

    param = torch.nn.Parameter(torch.randn(shape))
    param.grad = torch.randn(shape)
    optimizer = LoRAPreAdamW([param], rank=rank)
    for _ in range(3):
        optimizer.step()
    start = time.perf_counter()
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        for _ in range(steps):
            optimizer.step()
    wall = (time.perf_counter() - start) / steps
    by_category = defaultdict(float)
    for event in prof.key_averages():
        if event.key.startswith("Optimizer."):  # the step's record_function: its self time is our Python code
            category = "Python (optimizer and update code)"
        else:
            category = next(
                (c for c, ops in PROFILE_CATEGORIES.items() if event.key in ops), "views and other small ops"
            )
        by_category[category] += event.self_cpu_time_total / steps / 1e3
    by_category["unaccounted (wall - profiled)"] = wall * 1e3 - sum(by_category.values())
    return [
        {
            "shape": f"{shape[0]}x{shape[1]}",
            "rank": rank,
            "category": category,
            "ms_per_step": round(ms, 3),
            "share": round(ms / (wall * 1e3), 3),
        }
        for category, ms in by_category.items()
    ]


def write_results(args, env: dict, rows: list[dict], profile_rows: list[dict]) -> None:
    fields = ["shape", "method", "median_ms", "min_ms", "median_ratio_to_adamw", "repeats", "disturbed_repeats", "note"]
    # cells as the values print (str), not rounded again by the table
    table = [{**{k: str(v) for k, v in row.items()}, "used": f"{row['repeats']} ({row['disturbed_repeats']})"}
             for row in rows]
    body = [
        (
            f"{args.repeats} repeats, methods interleaved, warm-up {args.warmup:.0f} s. A shared machine: each repeat "
            f"first waits (up to {args.wait_idle:.0f} s) for the CPUs to be >= 90% idle, and a repeat during which "
            "other processes took more than 5% of the CPU time is 'disturbed' and left out (unless fewer than 10 are "
            "clean)."
        ),
        "",
        f"GaLore is amortised over its {args.period}-step projection period, SVD step included.",
        "",
        *report.markdown_table(table, [
            ("shape", "shape"), ("method", "method"), ("median_ms", "median ms"), ("min_ms", "min ms"),
            ("median_ratio_to_adamw", "median ratio to AdamW (foreach)"), ("used", "repeats used (disturbed)"),
            ("note", "note")]),
    ]
    csvs = {"lora_pre_step.csv": rows}
    if profile_rows:
        csvs["lora_pre_step_profile.csv"] = profile_rows
        shares = [{**{k: str(v) for k, v in r.items()}, "share": f"{r['share']:.0%}"} for r in profile_rows]
        body += [
            "",
            "## Where a LoRA-Pre step's time goes (torch.profiler, self CPU time per step)",
            "",
            *report.markdown_table(shares, [
                ("shape", "shape"), ("rank", "rank"), ("category", "category"), ("ms_per_step", "ms / step"),
                ("share", "share of wall time")]),
        ]
    report.write_result(args.out, "lora_pre_step", "LoRA-Pre Adam optimizer step on CPU", env, [*body, ""], csvs,
                        {"lora_pre_step.csv": fields}, smoke=args.smoke)


def main(argv=None) -> list[dict]:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    env = environment.environment(environment.command_line(__file__, argv), args.threads)
    start = time.perf_counter()
    rows, profile_rows = [], []
    for shape in args.shapes:
        steppers = make_steppers(shape, args.ranks, args.period)
        times, clean = time_interleaved(steppers, args.repeats, args.warmup, args.wait_idle)
        for row in summarise(shape, times, clean, args.ranks, args.period):
            rows.append({**row, "disturbed_repeats": args.repeats - sum(clean)})
        if args.profile:
            profile_rows += [row for rank in args.ranks for row in profile_lora_pre(shape, rank)]
    env["load average at end"] = environment.load_average()
    env["duration"] = f"{time.perf_counter() - start:.0f} s"
    write_results(args, env, rows, profile_rows)
    for row in rows + profile_rows:
        print(row)
    return rows


if __name__ == "__main__":
    main()
