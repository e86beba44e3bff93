"""Step timing: optimizer steps and whole training steps, each method against a baseline in the same process.

The methods run interleaved within each repeat (``timing.time_interleaved``), so that load from other processes
hits them alike, and a method's cost is the median over repeats of its time / the baseline's time in the same
repeat (``timing.paired_ratio``), reported with the median and minimum times. One subcommand per measurement (the
measurement code is in ``step_cases.py``):

lora-pre       One optimizer step of LoRA-Pre Adam against torch AdamW (foreach) and GaLore AdamW, on one weight
               matrix per ``--shapes`` (default 1024 x 1024 and 1024 x 2816, a Llama-350M attention and MLP matrix)
               with a fixed random gradient, at ``--ranks`` (16, 128); only ``optimizer.step()`` is timed, 60
               repeats, order rotated. Each repeat first waits (up to ``--wait-idle`` s) for >= 90% idle CPUs, and
               repeats during which other processes took > 5% of the CPU time are left out (unless fewer than 10
               are clean). GaLore re-projects by SVD every ``--period`` steps (200, as in its paper): its plain and
               SVD steps are timed in every repeat and reported amortised over the period. ``--profile`` adds
               torch.profiler's breakdown of a LoRA-Pre step: the products (bmm), the damped pseudo-inverses
               (Cholesky, solves), element-wise passes, the rest. Two floor rows bound what eager torch can reach:
               ``floor_products_rR`` (the six p x q x r products of a step, nothing else) and
               ``floor_elementwise`` (the fewest element-wise passes of the step's formula); their ratios to
               AdamW add up to the least a LoRA-Pre step can cost without a fused kernel.
lora-pro       LoRA-Pro against plain LoRA. ``step``: forward + backward + optimizer step of a small Llama built
               from a config (no download; 8 layers, hidden 512), LoRA on all linear layers, plain LoRA +
               ``torch.optim.AdamW`` vs ``LoRAPro(mode="efficient")`` vs ``LoRAPro(mode="full")``, the optimizer
               step alone timed inside the same steps. ``solver``: the LoRA-Pro gradient rewrite of L adapted
               hidden x hidden layers, our batched solve (``apply_lora_pro_``: stack, one eigh per Gram batch,
               scatter) vs the reference code's way, one layer at a time with r x r inverses in torch and
               ``scipy.linalg.solve_sylvester`` on the host, with skinny products (``per_layer_scipy``) and with
               the reference's explicit m x m projector (``_mxm``). 11 repeats after 2 untimed, fixed order.
training       Whole training steps (zero_grad, forward, backward, ``optimizer.step()``) of the two quality
               benchmarks, with their models, data, optimizers and options, built by ``pretrain_quality.py``
               (byte-level Llama, its ``cost_methods``, baseline AdamW) and ``finetune_quality.py``
               (all-MiniLM-L6-v2, its ``cost_methods``, baseline plain LoRA + AdamW): every method's model in this
               process, one fixed real batch per setting, 3 untimed rounds, then 40 / 15 repeats, order rotated,
               idle waits and disturbed repeats as in lora-pre; before starting it waits (up to ``--wait-load`` s)
               for a 1-min load average < 0.5. GaLore's plain step and its SVD step (every ``update_proj_gap``
               steps: pretrain_quality's ``--galore-gap``) are timed on two copies and reported amortised too.
defaults-cost  LoRA-Pre Adam's 2026-11-30 defaults against the old code path, rank 16, at lora-pre's shapes: torch
               AdamW (foreach), the paper formula without the finite check (exactly the step before the defaults
               changed), the paper formula with the check (its cost alone) and the default step (debiased,
               ``v_floor``, finite check); 40 repeats after 2 s of warm-up, fixed order. Prints its table.

Results, under ``--out`` (default ``benchmarks/results/``); each markdown report opens with the command, date,
machine, versions and git commit that made it, and ends with ``NAME_findings.md`` from the same folder if any:

    python benchmarks/step_timing.py lora-pre --profile  # lora_pre_step.md, .csv, lora_pre_step_profile.csv (a few min)
    python benchmarks/step_timing.py lora-pro            # lora_pro_step.md, .csv (minutes on 2 CPU cores)
    python benchmarks/step_timing.py training            # train_step_speed.md, .csv, .png (~10 min on 2 CPU cores)
    python benchmarks/step_timing.py training --device cuda --out gpu_results   # GPU figures, where there is one
    python benchmarks/step_timing.py defaults-cost       # prints only; with --out DIR: lora_pre_defaults_cost.md, .csv
    python benchmarks/step_timing.py SUBCOMMAND --smoke --out /tmp/bench   # seconds: tiny sizes, checks that it runs

This script replaced four, which the commands in older reports name: ``lora_pre_step.py ARGS`` is now
``step_timing.py lora-pre ARGS``, and likewise ``lora_pro_step.py`` ``lora-pro``, ``train_step_speed.py``
``training`` and ``lora_pre_defaults_cost.py`` ``defaults-cost``, with the same options.
"""

from __future__ import annotations

import argparse
import sys
import textwrap
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import environment  # noqa: E402
import report  # noqa: E402
import step_cases  # noqa: E402
import timing  # noqa: E402

#: What ``--smoke`` sets, per subcommand: tiny sizes, one or two repeats, no waiting.
SMOKE = {
    "lora-pre": dict(shapes=[(64, 96)], ranks=[4], repeats=2, warmup=0.0, wait_idle=0.0),
    "lora-pro": dict(layers=2, hidden=32, intermediate=64, heads=4, vocab=128, batch=2, seq=16, ranks=[4],
                     solver_layers=[2, 4], repeats=1, warmup=0),
    "training": dict(repeats=[2, 2], warmup=1, wait_idle=0.0, wait_load=0.0),
    "defaults-cost": dict(shapes=[(64, 96)], repeats=2, warmup=0.0),
}


# ------------------------------------------------------------------------------------------------ options
def shape(text: str) -> tuple[int, int]:
    """``"1024x2816"`` -> ``(1024, 2816)``."""
    p, q = text.split("x")
    return int(p), int(q)


def common_options(parser, out_default: Path | None = environment.RESULTS, out_help: str = "folder for the results"):
    parser.add_argument("--threads", type=int, default=2, help="torch.set_num_threads")
    parser.add_argument("--smoke", action="store_true", help="tiny sizes, no waiting: checks that it runs")
    parser.add_argument("--out", type=Path, default=out_default, help=out_help)


def shapes_option(parser) -> None:
    parser.add_argument("--shapes", type=shape, nargs="+", default=[(1024, 1024), (1024, 2816)], metavar="PxQ",
                        help="p x q of the matrix, e.g. 1024x2816")


def lora_pre_options(parser) -> None:
    shapes_option(parser)
    parser.add_argument("--ranks", type=int, nargs="+", default=[16, 128], help="LoRA-Pre and GaLore ranks")
    parser.add_argument("--period", type=int, default=200, help="GaLore's projection update period")
    parser.add_argument("--repeats", type=int, default=60, help="timed repeats (methods interleaved)")
    parser.add_argument("--warmup", type=float, default=2.0, help="seconds of untimed steps first")
    parser.add_argument("--wait-idle", type=float, default=20.0,
                        help="seconds to wait for idle CPUs before each repeat (0: never)")
    parser.add_argument("--profile", action="store_true", help="also profile LoRA-Pre's step")
    common_options(parser)


def lora_pro_options(parser) -> None:
    parser.add_argument("--layers", type=int, default=8, help="decoder layers of the Llama")
    parser.add_argument("--hidden", type=int, default=512, help="hidden size")
    parser.add_argument("--intermediate", type=int, default=1376, help="MLP size")
    parser.add_argument("--heads", type=int, default=8, help="attention heads (key/value heads = heads / 2)")
    parser.add_argument("--vocab", type=int, default=2048, help="vocabulary size")
    parser.add_argument("--batch", type=int, default=4, help="sequences per step")
    parser.add_argument("--seq", type=int, default=128, help="tokens per sequence")
    parser.add_argument("--ranks", type=int, nargs="+", default=[8, 64], help="LoRA ranks")
    parser.add_argument("--solver-layers", type=int, nargs="+", default=[8, 32, 64],
                        help="layer counts of the solver comparison")
    parser.add_argument("--repeats", type=int, default=11, help="timed repeats per method (median reported)")
    parser.add_argument("--warmup", type=int, default=2, help="untimed repeats first")
    common_options(parser)


def training_options(parser) -> None:
    parser.add_argument("--settings", nargs="+", default=["pretrain", "finetune"], choices=["pretrain", "finetune"])
    parser.add_argument("--repeats", type=int, nargs=2, default=[40, 15], metavar=("PRETRAIN", "FINETUNE"),
                        help="timed repeats per setting")
    parser.add_argument("--warmup", type=int, default=3, help="untimed rounds over all methods first")
    parser.add_argument("--wait-idle", type=float, default=20.0, help="seconds to wait for idle CPUs per repeat")
    parser.add_argument("--wait-load", type=float, default=600.0,
                        help="before starting, wait up to this many seconds for the 1-min load average < 0.5")
    parser.add_argument("--device", default="cpu", help="cpu or cuda")
    common_options(parser)


def defaults_cost_options(parser) -> None:
    shapes_option(parser)
    parser.add_argument("--rank", type=int, default=16, help="LoRA-Pre rank")
    parser.add_argument("--repeats", type=int, default=40, help="timed repeats (methods interleaved)")
    parser.add_argument("--warmup", type=float, default=2.0, help="seconds of untimed steps first (all methods)")
    common_options(parser, None, "also write lora_pre_defaults_cost.md and .csv here (default: print only)")


SUBCOMMANDS = {
    "lora-pre": (lora_pre_options, "LoRA-Pre Adam's optimizer step vs AdamW (foreach) and GaLore AdamW"),
    "lora-pro": (lora_pro_options, "LoRA-Pro training steps vs plain LoRA; the batched solver vs per-layer scipy"),
    "training": (training_options, "whole training steps of the two quality benchmarks' settings, vs baseline"),
    "defaults-cost": (defaults_cost_options, "LoRA-Pre Adam's default step vs the paper formula's code path"),
}


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], epilog=__doc__.split("\n\n", 1)[1],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    commands = parser.add_subparsers(dest="command", required=True, metavar="SUBCOMMAND")
    for name, (add_options, summary) in SUBCOMMANDS.items():
        add_options(commands.add_parser(name, help=summary, description=summary,
                                        formatter_class=argparse.ArgumentDefaultsHelpFormatter))
    args = parser.parse_args(argv)
    if args.smoke:
        vars(args).update(SMOKE[args.command])
    return args


# ------------------------------------------------------------------------------------------------ reports
def write_lora_pre(args, env: dict, tables: dict[str, list[dict]]) -> None:
    fields = ["shape", "method", "median_ms", "min_ms", "median_ratio_to_adamw", "repeats", "disturbed_repeats", "note"]
    # cells as the values print (str), not rounded again by the table
    table = [{**{k: str(v) for k, v in row.items()}, "used": f"{row['repeats']} ({row['disturbed_repeats']})"}
             for row in tables["lora_pre_step.csv"]]
    body = [
        f"{args.repeats} repeats, methods interleaved, warm-up {args.warmup:.0f} s. A shared machine: each repeat "
        f"first waits (up to {args.wait_idle:.0f} s) for the CPUs to be >= 90% idle, and a repeat during which "
        "other processes took more than 5% of the CPU time is 'disturbed' and left out (unless fewer than 10 are "
        "clean).",
        "",
        f"GaLore is amortised over its {args.period}-step projection period, SVD step included.",
        "",
        "`floor_products_rR` times only the six p x q x r products of a LoRA-Pre step and `floor_elementwise` only "
        "the fewest element-wise passes of its formula (whole matrix, eager torch): the sum of their ratios is the "
        "least an eager-torch LoRA-Pre step can cost on this machine; below it needs a fused kernel.",
        "",
        *report.markdown_table(table, [
            ("shape", "shape"), ("method", "method"), ("median_ms", "median ms"), ("min_ms", "min ms"),
            ("median_ratio_to_adamw", "median ratio to AdamW (foreach)"), ("used", "repeats used (disturbed)"),
            ("note", "note")]),
    ]
    if "lora_pre_step_profile.csv" in tables:
        shares = [{**{k: str(v) for k, v in r.items()}, "share": f"{r['share']:.0%}"}
                  for r in tables["lora_pre_step_profile.csv"]]
        body += [
            "",
            "## Where a LoRA-Pre step's time goes (torch.profiler, self CPU time per step)",
            "",
            *report.markdown_table(shares, [
                ("shape", "shape"), ("rank", "rank"), ("category", "category"), ("ms_per_step", "ms / step"),
                ("share", "share of wall time")]),
        ]
    report.write_result(args.out, "lora_pre_step", "LoRA-Pre Adam optimizer step on CPU", env, [*body, ""], tables,
                        {"lora_pre_step.csv": fields}, smoke=args.smoke)


def write_lora_pro(args, env: dict, tables: dict[str, list[dict]]) -> None:
    rows = tables["lora_pro_step.csv"]
    fields = ["section", "r", "layers", "method", "median_ms", "min_ms", "optimizer_ms", "ratio"]
    # the CSV keeps 4 significant digits; the tables format each column themselves
    csv_rows = [{k: (f"{v:.4g}" if isinstance(v, float) else v) for k, v in row.items()} for row in rows]
    steps = [{**row, "median_ms": f"{row['median_ms']:.1f}", "min_ms": f"{row['min_ms']:.1f}",
              "optimizer_ms": f"{row['optimizer_ms']:.1f}", "ratio": f"{row['ratio']:.3f}"}
             for row in rows if row["section"] == "step"]
    solver = [{**row, "median_ms": f"{row['median_ms']:.2f}", "min_ms": f"{row['min_ms']:.2f}",
               "ratio": f"{row['ratio']:.2f}"} for row in rows if row["section"] == "solver"]
    body = [
        f"{args.repeats} repeats (median), methods interleaved.",
        "",
        f"## Training step: Llama {args.layers} layers, hidden {args.hidden}, MLP {args.intermediate}, "
        f"vocab {args.vocab}, batch {args.batch} x {args.seq} tokens, LoRA on all linear layers",
        "",
        *report.markdown_table(steps, [
            ("r", "r"), ("method", "method"), ("median_ms", "step ms (median)"), ("min_ms", "step ms (min)"),
            ("optimizer_ms", "optimizer ms (median)"), ("ratio", "step / plain LoRA (median of paired ratios)")]),
        "",
        f"## Gradient rewrite of L adapted {args.hidden} x {args.hidden} layers (optimizer-side work only)",
        "",
        *report.markdown_table(solver, [
            ("r", "r"), ("layers", "layers"), ("method", "method"), ("median_ms", "ms (median)"),
            ("min_ms", "ms (min)"), ("ratio", "time / batched (median of paired ratios)")]),
        "",
    ]
    report.write_result(args.out, "lora_pro_step", "LoRA-Pro step benchmark", env, body,
                        {"lora_pro_step.csv": csv_rows}, {"lora_pro_step.csv": fields}, smoke=args.smoke)


def plot_training(rows: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    settings = list(dict.fromkeys(r["setting"] for r in rows))
    figure, axes = plt.subplots(1, len(settings), figsize=(7 * len(settings), 5), squeeze=False)
    for axis, setting in zip(axes[0], settings):
        same = [r for r in rows if r["setting"] == setting and r["method"] != "galore_svd"]
        axis.barh(range(len(same)), [r["ratio"] for r in same], color="tab:blue")
        axis.axvline(1.0, color="black", linewidth=1)
        axis.set_yticks(range(len(same)), [r["label"] for r in same], fontsize=8)
        axis.invert_yaxis()
        baseline = "AdamW" if setting == "pretrain" else "plain LoRA + AdamW"
        axis.set_xlabel(f"training-step time / {baseline}'s (median of paired ratios)")
        axis.set_title(textwrap.fill(same[0]["setting_title"].split(" (baseline")[0], 60), fontsize=10)
        for index, row in enumerate(same):
            axis.text(row["ratio"], index, f" {row['ratio']:.2f}", va="center", fontsize=8)
        axis.grid(True, axis="x", alpha=0.3)
    figure.tight_layout()
    figure.savefig(path, dpi=110)
    plt.close(figure)


def write_training(args, env: dict, tables: dict[str, list[dict]]) -> None:
    name, rows = "train_step_speed", tables["train_step_speed.csv"]
    fields = ["setting", "method", "label", "median_ms", "min_ms", "optimizer_ms", "ratio", "repeats_used",
              "disturbed_repeats"]
    columns = [("label", "method"), ("median_ms", "step ms (median)"), ("min_ms", "step ms (min)"),
               ("optimizer_ms", "optimizer.step ms (median)"), ("ratio", "step / baseline (median of paired ratios)"),
               ("repeats_used", "repeats used"), ("disturbed_repeats", "disturbed (left out)")]
    gap = step_cases.quality_options("pretrain", args.smoke).galore_gap
    body = [
        "Whole training step (zero_grad, forward, backward, `optimizer.step()`) on one fixed real batch, every "
        "method's model in the same process, methods interleaved within each repeat (order rotated), "
        f"{args.warmup} untimed rounds first. Ratios are medians over repeats of (method / baseline) within the same "
        f"repeat. Each repeat waits up to {args.wait_idle:.0f} s for >= 90% idle CPUs; repeats in which other "
        "processes used > 5% of the CPU time are left out (unless fewer than 10 are clean). GaLore's plain step and "
        f"its re-projection (SVD) step are timed on two copies; 'amortised' = plain + (SVD - plain) / {gap} (its "
        "update_proj_gap in the quality run).",
        "",
    ]
    for setting in dict.fromkeys(r["setting"] for r in rows):
        same = [r for r in rows if r["setting"] == setting]
        body += [f"## {same[0]['setting_title']}", "", *report.markdown_table(same, columns), ""]
    body += [f"![step time ratios]({name}.png)", ""]
    report.write_result(args.out, name, "Training-step time per method", env, body, tables,
                        {f"{name}.csv": fields}, smoke=args.smoke)
    plot_training(rows, args.out / f"{name}.png")


def write_defaults_cost(args, env: dict, tables: dict[str, list[dict]]) -> None:
    if args.out is None:  # the table is printed as it is measured
        return
    body = [f"Rank {args.rank}, {args.repeats} repeats after {args.warmup:.0f} s of warm-up, methods interleaved "
            "(fixed order). Ratios are medians of per-repeat ratios. 'paper' is the paper formula without the finite "
            "check (the step before the 2026-11-30 defaults), 'paper + check' the same with it, 'default' the "
            "default step (debiased, v_floor, finite check).", "",
            *report.markdown_table(tables["lora_pre_defaults_cost.csv"], step_cases.DEFAULTS_COST_COLUMNS), ""]
    report.write_result(args.out, "lora_pre_defaults_cost", "LoRA-Pre Adam's default step against the old code path",
                        env, body, tables, smoke=args.smoke)


COMMANDS = {  # subcommand -> (measure: args -> tables, write: (args, env, tables) -> None)
    "lora-pre": (step_cases.measure_lora_pre, write_lora_pre),
    "lora-pro": (step_cases.measure_lora_pro, write_lora_pro),
    "training": (step_cases.measure_training, write_training),
    "defaults-cost": (step_cases.measure_defaults_cost, write_defaults_cost),
}


def main(argv=None) -> list[dict]:
    """Run one subcommand; returns its main table's rows."""
    args = parse_args(argv)
    measure, write = COMMANDS[args.command]
    torch.set_num_threads(args.threads)
    waited = timing.wait_for_low_load(0.5, args.wait_load) if "wait_load" in vars(args) else None
    env = environment.environment(environment.command_line(__file__, argv), args.threads)
    if waited:
        env["waited for load < 0.5"] = f"{waited[0]:.0f} s (load then {waited[1]})"
    started = time.perf_counter()
    tables = measure(args)
    env["load average at end"] = environment.load_average()
    env["duration"] = f"{time.perf_counter() - started:.0f} s"
    write(args, env, tables)
    return next(iter(tables.values()))


if __name__ == "__main__":
    main()
