"""Whole training-step time per method (forward + backward + optimizer step), as ratios in one run.

Both quality settings, with their models, data and optimizers (built by ``pretrain_quality.py`` and
``finetune_quality.py``): every method's model lives in this process, one fixed real batch per setting, and the
methods are interleaved within each repeat (order rotated every repeat), so load from other processes hits them
alike. Reported per method: median and minimum step time over the repeats after warm-up, the median optimizer
``step()`` share, and the median over repeats of the ratio to the baseline's step in the same repeat (AdamW for
pre-training, plain LoRA + AdamW for fine-tuning). On a shared machine each repeat first waits (up to
``--wait-idle`` s) for the CPUs to be >= 90% idle, and repeats during which other processes took > 5% of the CPU
time are left out (unless fewer than 10 are clean); the load average is recorded before and after.

GaLore re-projects (an SVD per matrix) every ``update_proj_gap`` (50) steps; its plain step and its SVD step are
timed separately (on two copies) and also reported amortised: ``plain + (svd - plain) / gap``.

    python benchmarks/train_step_speed.py          # ~10 min on 2 CPU cores
    python benchmarks/train_step_speed.py --device cuda   # GPU figures, where there is one
    python benchmarks/train_step_speed.py --smoke --out /tmp/bench
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import environment  # noqa: E402
import report  # noqa: E402
import timing  # noqa: E402

NAME = "train_step_speed"
GALORE_GAP = 50


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], epilog=__doc__.split("\n\n", 1)[1],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--settings", nargs="+", default=["pretrain", "finetune"], choices=["pretrain", "finetune"])
    parser.add_argument("--repeats", type=int, nargs=2, default=[40, 15], metavar=("PRETRAIN", "FINETUNE"),
                        help="timed repeats per setting")
    parser.add_argument("--warmup", type=int, default=3, help="untimed rounds over all methods first")
    parser.add_argument("--wait-idle", type=float, default=20.0, help="seconds to wait for idle CPUs per repeat")
    parser.add_argument("--wait-load", type=float, default=600.0,
                        help="before starting, wait up to this many seconds for the 1-min load average < 0.5")
    parser.add_argument("--device", default="cpu", help="cpu or cuda")
    parser.add_argument("--threads", type=int, default=2, help="torch.set_num_threads")
    parser.add_argument("--smoke", action="store_true", help="smoke sizes, 2 repeats, no waiting")
    parser.add_argument("--out", type=Path, default=environment.RESULTS, help="folder for CSV, markdown and PNG")
    args = parser.parse_args(argv)
    if args.smoke:
        args.repeats, args.warmup, args.wait_idle, args.wait_load = [2, 2], 1, 0.0, 0.0
    return args


def set_galore_step(optimizer, value: int) -> None:
    """GaLore re-projects when its step count is a multiple of the gap: set the count before a step to choose."""
    for group in optimizer.param_groups:
        if "rank" in group:
            for param in group["params"]:
                if "step" in optimizer.state[param]:
                    optimizer.state[param]["step"] = value


def steppers_for(setting: str, args) -> tuple[dict, dict, str, dict]:
    """name -> one timed training step; name -> list of optimizer-step times; baseline name; labels."""
    import finetune_quality
    import pretrain_quality
    import torch

    device = torch.device(args.device)
    lr = 1e-5  # the steps repeat one batch; a small lr keeps the weights (and so the work) unchanged
    models, optimizers, labels = {}, {}, {}
    if setting == "pretrain":
        rank = 8 if args.smoke else 32
        dm = pretrain_quality.data_module(args.smoke, 0)
        dm.setup("fit")
        batch = next(iter(dm.train_dataloader()))
        methods = pretrain_quality.cost_methods()
        for method in methods + (["galore_svd"] if "galore" in methods else []):
            model = pretrain_quality.build_model(args.smoke, 0).to(device)
            kind = "galore" if method == "galore_svd" else method
            optimizers[method] = pretrain_quality.make_optimizer(kind, model, lr, rank, 0.25, GALORE_GAP)
            models[method] = model
            labels[method] = pretrain_quality.label(kind, rank) + (" SVD step" if method == "galore_svd" else "")
        baseline = "adamw"

        def loss_of(model, batch):
            return model(input_ids=batch["input_ids"], labels=batch["labels"]).loss
    else:
        rank = 2 if args.smoke else 8
        dm = finetune_quality.data_module(args.smoke, 0)
        dm.setup("fit")
        batch = max(dm.train_dataloader(), key=lambda b: b["input_ids"].shape[1])  # a full-length batch
        for method in finetune_quality.cost_methods():
            task, optimizers[method], _ = finetune_quality.build_task(method, lr, 0, rank, 80, 8, args.smoke)
            models[method] = task.model.to(device)
            labels[method] = finetune_quality.label(method, rank)
        baseline = "lora_adamw"

        def loss_of(model, batch):
            return model(**batch).loss
    batch = {k: v.to(device) for k, v in batch.items()}
    optimizer_times: dict[str, list[float]] = {name: [] for name in models}
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)

    def make(name):
        model, optimizer = models[name], optimizers[name]

        def step():
            if name == "galore":
                set_galore_step(optimizer, 1)
            elif name == "galore_svd":
                set_galore_step(optimizer, GALORE_GAP)
            optimizer.zero_grad(set_to_none=True)
            loss_of(model, batch).backward()
            sync()
            start = time.perf_counter()
            optimizer.step()
            sync()
            optimizer_times[name].append(time.perf_counter() - start)

        return step

    return {name: make(name) for name in models}, optimizer_times, baseline, labels


def measure(setting: str, repeats: int, args) -> list[dict]:
    steppers, optimizer_times, baseline, labels = steppers_for(setting, args)
    times, clean = timing.time_interleaved(steppers, repeats, 0.0, args.wait_idle, warmup_repeats=args.warmup)
    kept = timing.clean_subset(times, clean)
    optimizer_kept = {name: [t for t, k in zip(values[-repeats:], clean if sum(clean) >= 10 else [True] * repeats) if k]
                      for name, values in optimizer_times.items()}
    rows = []
    for name, values in kept.items():
        rows.append({
            "setting": setting,
            "method": name,
            "label": labels[name],
            "median_ms": 1e3 * statistics.median(values),
            "min_ms": 1e3 * min(values),
            "optimizer_ms": 1e3 * statistics.median(optimizer_kept[name]),
            "ratio": timing.paired_ratio(values, kept[baseline]),
            "repeats_used": len(values),
            "disturbed_repeats": repeats - sum(clean),
        })
    if "galore" in kept and "galore_svd" in kept:
        plain, svd = kept["galore"], kept["galore_svd"]
        amortised = [p + (s - p) / GALORE_GAP for p, s in zip(plain, svd)]
        rows.append({
            "setting": setting, "method": "galore_amortised",
            "label": labels["galore"] + f" amortised (1 SVD step per {GALORE_GAP})",
            "median_ms": 1e3 * statistics.median(amortised), "min_ms": 1e3 * min(amortised), "optimizer_ms": None,
            "ratio": timing.paired_ratio(amortised, kept[baseline]), "repeats_used": len(amortised),
            "disturbed_repeats": repeats - sum(clean),
        })
    return rows


def plot(rows: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    settings = list(dict.fromkeys(r["setting"] for r in rows))
    figure, axes = plt.subplots(1, len(settings), figsize=(7 * len(settings), 5), squeeze=False)
    for axis, setting in zip(axes[0], settings):
        same = [r for r in rows if r["setting"] == setting and r["method"] != "galore_svd"]
        names = [r["label"].replace(", debias_second_moment (extension)", " +debias (ext.)") for r in same]
        axis.barh(range(len(same)), [r["ratio"] for r in same], color="tab:blue")
        axis.axvline(1.0, color="black", linewidth=1)
        axis.set_yticks(range(len(same)), names, fontsize=8)
        axis.invert_yaxis()
        baseline = "AdamW" if setting == "pretrain" else "plain LoRA + AdamW"
        axis.set_xlabel(f"training-step time / {baseline}'s (median of paired ratios)")
        axis.set_title({"pretrain": "Pre-training Llama (1.85M)", "finetune": "Fine-tuning MiniLM (22.7M)"}[setting])
        for index, row in enumerate(same):
            axis.text(row["ratio"], index, f" {row['ratio']:.2f}", va="center", fontsize=8)
        axis.grid(True, axis="x", alpha=0.3)
    figure.tight_layout()
    figure.savefig(path, dpi=110)
    plt.close(figure)


def write_report(args, env: dict, rows: list[dict]) -> None:
    columns = [("label", "method"), ("median_ms", "step ms (median)"), ("min_ms", "step ms (min)"),
               ("optimizer_ms", "optimizer.step ms (median)"), ("ratio", "step / baseline (median of paired ratios)"),
               ("repeats_used", "repeats used"), ("disturbed_repeats", "disturbed (left out)")]
    body = [
        "Whole training step (zero_grad, forward, backward, `optimizer.step()`) on one fixed real batch, every "
        "method's model in the same process, methods interleaved within each repeat (order rotated), "
        f"{args.warmup} untimed rounds first. Ratios are medians over repeats of (method / baseline) within the same "
        "repeat. Each repeat waits up to "
        f"{args.wait_idle:.0f} s for >= 90% idle CPUs; repeats in which other processes used > 5% of the CPU time "
        "are left out (unless fewer than 10 are clean). GaLore's plain step and its re-projection (SVD) step are "
        f"timed on two copies; 'amortised' = plain + (SVD - plain) / {GALORE_GAP} (its update_proj_gap in the "
        "quality run).",
        "",
    ]
    titles = {"pretrain": "## Pre-training: Llama hidden 128, 4 layers, vocab 8192, batch 16 x 128 (baseline AdamW)",
              "finetune": "## Fine-tuning: all-MiniLM-L6-v2, LoRA r=8 on query/key/value/dense, batch 32 x 64 "
                          "(baseline plain LoRA + AdamW)"}
    for setting in dict.fromkeys(r["setting"] for r in rows):
        body += [titles[setting], "", *report.markdown_table([r for r in rows if r["setting"] == setting], columns),
                 ""]
    body += [f"![step time ratios]({NAME}.png)", ""]
    report.write_result(args.out, NAME, "Training-step time per method", env, body, {f"{NAME}.csv": rows},
                        smoke=args.smoke)
    plot(rows, args.out / f"{NAME}.png")


def main(argv=None) -> list[dict]:
    args = parse_args(argv)
    import torch

    torch.set_num_threads(args.threads)
    waited, load = timing.wait_for_low_load(0.5, args.wait_load)
    env = environment.environment(environment.command_line(__file__, argv), args.threads)
    env["waited for load < 0.5"] = f"{waited:.0f} s (load then {load})"
    started = time.perf_counter()
    rows = []
    for setting in args.settings:
        repeats = args.repeats[0] if setting == "pretrain" else args.repeats[1]
        rows += measure(setting, repeats, args)
        for row in rows[-8:]:
            if row["setting"] == setting:
                print(f"{setting:9s} {row['label']:60s} {row['median_ms']:8.1f} ms  ratio {row['ratio']:.3f}", flush=True)
    env["load average at end"] = environment.load_average()
    env["duration"] = f"{time.perf_counter() - started:.0f} s"
    write_report(args, env, rows)
    return rows


if __name__ == "__main__":
    main()
