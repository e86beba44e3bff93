"""CPU cost of LoRA-Pre Adam's 2026-11-30 defaults: the default step against the paper formula's code path.

One process, methods interleaved in every repeat (so load from other processes hits them alike), 2 threads,
rank 16: torch AdamW (foreach), the paper formula without the finite check (exactly the step before the defaults
changed), the paper formula with the finite check (its cost alone) and the default step (debiased, ``v_floor``,
finite check). Prints medians and medians of paired ratios.

    python benchmarks/lora_pre_defaults_cost.py [--repeats 40] [--warmup 2]
"""
from __future__ import annotations

import argparse
import logging
import statistics
import sys
import time
from pathlib import Path

import torch

from lit_lowrank.optim import LoRAPreAdamW
from lit_lowrank.optim.lora_pre import base

sys.path.insert(0, str(Path(__file__).resolve().parent))
import report  # noqa: E402
from timing import paired_ratio  # noqa: E402

SHAPES = [(1024, 1024), (1024, 2816)]
#: (key, header) of the printed markdown table
COLUMNS = [("shape", "shape"), ("adamw", "AdamW ms"), ("paper", "paper ms"), ("default", "default ms"),
           ("paper_vs_adamw", "paper / AdamW"), ("default_vs_adamw", "default / AdamW"),
           ("check_cost", "paper + check / paper"), ("default_vs_paper", "default / paper")]


def paper_step_without_check(optimizer: LoRAPreAdamW) -> None:
    real = base.LowRankOptimizerBase._finite
    base.LowRankOptimizerBase._finite = lambda self, params: {p: True for p in params}
    try:
        optimizer.step()
    finally:
        base.LowRankOptimizerBase._finite = real


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--repeats", type=int, default=40)
    parser.add_argument("--warmup", type=float, default=2.0, help="seconds of untimed steps first (all methods)")
    args = parser.parse_args(argv)
    torch.set_num_threads(2)
    logging.getLogger("lit_lowrank").setLevel(logging.ERROR)  # the paper formula's warning
    print("\n".join(report.markdown_table([], COLUMNS)))  # the header; a row per shape as it is measured
    for p, q in SHAPES:
        grad = torch.randn(p, q)
        weights = {name: torch.nn.Parameter(torch.randn(p, q)) for name in ("adamw", "paper", "checked", "default")}
        adamw = torch.optim.AdamW([weights["adamw"]], foreach=True)
        paper = LoRAPreAdamW([weights["paper"]], rank=16, debias_second_moment=False, update_bound="none")
        checked = LoRAPreAdamW([weights["checked"]], rank=16, debias_second_moment=False, update_bound="none")
        default = LoRAPreAdamW([weights["default"]], rank=16)
        steps = {"adamw": adamw.step, "paper": lambda: paper_step_without_check(paper), "checked": checked.step,
                 "default": default.step}
        for name in steps:
            weights[name].grad = grad
        warm_until = time.perf_counter() + args.warmup  # steady state: the factors' values settle in a few steps
        while time.perf_counter() < warm_until:
            for step in steps.values():
                step()
        times = {name: [] for name in steps}
        for _ in range(args.repeats):
            for name, step in steps.items():
                start = time.perf_counter()
                step()
                times[name].append(time.perf_counter() - start)

        def ratio(a: str, b: str) -> float:
            return paired_ratio(times[a], times[b])

        ms = {name: 1e3 * statistics.median(values) for name, values in times.items()}
        row = {"shape": f"{p}x{q}", "adamw": f"{ms['adamw']:.2f}", "paper": f"{ms['paper']:.2f}",
               "default": f"{ms['default']:.2f}", "paper_vs_adamw": f"{ratio('paper', 'adamw'):.2f}",
               "default_vs_adamw": f"{ratio('default', 'adamw'):.2f}",
               "check_cost": f"{ratio('checked', 'paper'):.3f}", "default_vs_paper": f"{ratio('default', 'paper'):.3f}"}
        print(report.markdown_table([row], COLUMNS)[-1], flush=True)


if __name__ == "__main__":
    main()
