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
import time

import torch

from lit_lowrank.optim import LoRAPreAdamW
from lit_lowrank.optim.lora_pre import base

SHAPES = [(1024, 1024), (1024, 2816)]


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
    print("| shape | AdamW ms | paper ms | default ms | paper / AdamW | default / AdamW | paper + check / paper "
          "| default / paper |")
    print("|---|---|---|---|---|---|---|---|")
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
            return statistics.median(x / y for x, y in zip(times[a], times[b]))

        ms = {name: 1e3 * statistics.median(values) for name, values in times.items()}
        print(f"| {p}x{q} | {ms['adamw']:.2f} | {ms['paper']:.2f} | {ms['default']:.2f} | {ratio('paper', 'adamw'):.2f} "
              f"| {ratio('default', 'adamw'):.2f} | {ratio('checked', 'paper'):.3f} | {ratio('default', 'paper'):.3f} |")


if __name__ == "__main__":
    main()
