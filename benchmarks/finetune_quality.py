"""Fine-tuning quality: plain LoRA vs LoRA-Pro (efficient, full) vs full fine-tuning vs LoRA-Pre Adam.

The LoRA-Pro paper's claim at small scale, on the main-job task: the real pretrained all-MiniLM-L6-v2 (bundled,
offline) classifies which of 9 standard-library packages a docstring paragraph comes from
(``DocstringClassificationDataModule(batch_size=32, max_length=64)``: 630 / 135 / 135 paragraphs, chance 11.1%).
Every method gets the same budget: 4 epochs (80 steps), linear warm-up 8 steps then cosine to 0
(``WarmupCosineLR``), decoupled weight decay 0.01, the same freshly initialised classifier head per seed.

Methods:
    lora_adamw          LoRA r=8, alpha=16 on query/key/value/dense, head trained fully, torch.optim.AdamW
    lora_pro_efficient  the same adapters, LoRAPro(mode="efficient")
    lora_pro_full       the same adapters, LoRAPro(mode="full") (m x n Adam moments per adapted layer)
    full_ft             every parameter, torch.optim.AdamW
    lora_pre_adam       every parameter, LoRAPreAdamW rank 8 (block matrices factored, the rest AdamW), scale 1,
                        its defaults (debiased second moment, update_bound="v_floor")
    lora_pre_adam_paper the same with the paper's formula (debias_second_moment=False, update_bound="none"): the
                        library's behaviour before 2026-11-30, unsafe

Reported: test-split accuracy and loss of the final model (primary), the test accuracy at the evaluation with the
best validation accuracy (checkpoint selection), and validation curves. Learning rates: each method's log-spaced
grid on seed 0, chosen by final validation accuracy (ties: lower validation loss), extended past an edge holding
the best (``--extend``), then the chosen one with the other seeds. One process per run; per-run JSON in
``--runs`` is reused, so an interrupted sweep resumes and ``--report-only`` rebuilds the outputs.

    python benchmarks/finetune_quality.py                      # about 1 h on 2 idle CPU cores
    python benchmarks/finetune_quality.py --report-only
    python benchmarks/finetune_quality.py --smoke --out /tmp/bench   # seconds: tiny BERT from a config
"""

from __future__ import annotations

import argparse
import functools
import math
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common  # noqa: E402

NAME = "finetune_quality"
MINILM = "sentence-transformers/all-MiniLM-L6-v2"
SMOKE_BERT = dict(model_type="bert", hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
                  vocab_size=30522, max_position_embeddings=128)
SMOKE_PACKAGES = ["json", "http"]
WEIGHT_DECAY = 0.01
GRIDS = {
    "lora_adamw": [3e-4, 1e-3, 3e-3],
    "lora_pro_efficient": [3e-4, 1e-3, 3e-3],
    "lora_pro_full": [1e-4, 3e-4, 1e-3],
    "full_ft": [3e-5, 1e-4, 3e-4],
    "lora_pre_adam": [3e-5, 1e-4, 3e-4],
    "lora_pre_adam_paper": [3e-5, 1e-4, 3e-4],
}
PAPER_LITERAL = {"debias_second_moment": False, "update_bound": "none"}


def cost_methods() -> list[str]:
    """The methods whose optimizer state or step differ (memory.py, train_step_speed.py)."""
    return [method for method in GRIDS if method != "lora_pre_adam_paper"]


def label(method: str, rank: int) -> str:
    return {
        "lora_adamw": f"LoRA r={rank} + AdamW",
        "lora_pro_efficient": f"LoRA-Pro efficient r={rank}",
        "lora_pro_full": f"LoRA-Pro full r={rank}",
        "full_ft": "Full fine-tuning (AdamW)",
        "lora_pre_adam": f"LoRA-Pre Adam r={rank} (all weights)",
        "lora_pre_adam_paper": f"LoRA-Pre Adam r={rank} (all weights), paper-literal (unsafe)",
    }[method]


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], epilog=__doc__.split("\n\n", 1)[1],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    common.add_sweep_arguments(parser, NAME, GRIDS)
    parser.add_argument("--epochs", type=int, default=4, help="passes over the training split (20 steps each)")
    parser.add_argument("--warmup", type=int, default=8, help="linear warm-up steps")
    parser.add_argument("--eval-every", type=int, default=10, help="steps between validation (and test) passes")
    parser.add_argument("--rank", type=int, default=8, help="LoRA rank (alpha = 2 rank) and LoRA-Pre rank")
    parser.add_argument("--smoke", action="store_true", help="tiny BERT, 2 classes, 2 epochs, in-process")
    args = parser.parse_args(argv)
    if args.smoke:
        args.epochs, args.warmup, args.eval_every, args.rank, args.seeds = 1, 1, 2, 2, [0, 1]
        args.extend, args.in_process, args.wait_load = 0, True, 0.0
        args.lrs = args.lrs or [1e-3]
    args.runs = args.runs or args.out / f"{NAME}_runs"
    return args


# ------------------------------------------------------------------------------------------------ one run
def data_module(smoke: bool, seed: int):
    from lit_lowrank.data import DocstringClassificationDataModule

    if smoke:
        return DocstringClassificationDataModule(packages=SMOKE_PACKAGES, cap_per_class=20, batch_size=8,
                                                 max_length=32, seed=seed)
    return DocstringClassificationDataModule(batch_size=32, max_length=64, seed=seed)


def build_task(method: str, lr: float, seed: int, rank: int, total_steps: int, warmup: int, smoke: bool):
    """The task exactly as the CLI builds it (adapters injected, head trainable), optimizer and scheduler
    from its ``configure_optimizers``."""
    import torch

    from lit_lowrank import LoRAConfig
    from lit_lowrank.backbones import transformers_backbone
    from lit_lowrank.optim import LoRAPreAdamW, LoRAPro, WarmupCosineLR
    from lit_lowrank.tasks import SequenceClassificationTask

    torch.manual_seed(seed)  # the classifier head's and the adapters' initialisation
    if smoke:
        backbone = transformers_backbone(config=SMOKE_BERT, auto_class="AutoModelForSequenceClassification",
                                         tokenizer=False, model_kwargs={"num_labels": len(SMOKE_PACKAGES)})
    else:
        backbone = transformers_backbone(MINILM, auto_class="AutoModelForSequenceClassification", tokenizer=False,
                                         model_kwargs={"num_labels": 9})
    adapters = method in ("lora_adamw", "lora_pro_efficient", "lora_pro_full")
    lora = LoRAConfig(r=rank, alpha=2 * rank, target_modules="default") if adapters else None
    factory = {
        "lora_adamw": functools.partial(torch.optim.AdamW, lr=lr, weight_decay=WEIGHT_DECAY),
        "full_ft": functools.partial(torch.optim.AdamW, lr=lr, weight_decay=WEIGHT_DECAY),
        "lora_pro_efficient": functools.partial(LoRAPro, lr=lr, mode="efficient", weight_decay=WEIGHT_DECAY),
        "lora_pro_full": functools.partial(LoRAPro, lr=lr, mode="full", weight_decay=WEIGHT_DECAY),
        "lora_pre_adam": functools.partial(LoRAPreAdamW, lr=lr, rank=rank, scale=1.0, weight_decay=WEIGHT_DECAY),
        "lora_pre_adam_paper": functools.partial(LoRAPreAdamW, lr=lr, rank=rank, scale=1.0, weight_decay=WEIGHT_DECAY,
                                                 **PAPER_LITERAL),
    }[method]
    scheduler = functools.partial(WarmupCosineLR, warmup_steps=warmup, total_steps=total_steps)
    task = SequenceClassificationTask(backbone, lora=lora, optimizer=factory, scheduler=scheduler)
    configured = task.configure_optimizers()
    return task, configured["optimizer"], configured["lr_scheduler"]["scheduler"]


def optimizer_state_bytes(optimizer) -> int:
    """``state_bytes()`` where the optimizer has it, else the bytes of its state tensors (0-d step counters
    left out, as LoRA-Pre's Python-int steps are)."""
    import torch

    if hasattr(optimizer, "state_bytes"):
        return int(optimizer.state_bytes().total)
    return sum(value.nbytes for state in optimizer.state.values() for value in state.values()
               if isinstance(value, torch.Tensor) and value.dim() > 0)


def evaluate(model, loader) -> tuple[float, float]:
    """(mean cross-entropy per example, accuracy)."""
    import torch

    model.eval()
    loss_sum, correct, count = 0.0, 0, 0
    with torch.no_grad():
        for batch in loader:
            output = model(**batch)
            n = len(batch["labels"])
            loss_sum += float(output.loss) * n
            correct += int((output.logits.argmax(-1) == batch["labels"]).sum())
            count += n
    model.train()
    return loss_sum / count, correct / count


def run_one(spec: dict) -> dict:
    import torch

    torch.set_num_threads(spec["threads"])
    started, cpu_started = time.perf_counter(), common.cpu_seconds()
    dm = data_module(spec["smoke"], spec["seed"])
    dm.setup("fit")
    steps_per_epoch = len(dm.train_dataloader())
    total = spec["epochs"] * steps_per_epoch
    task, optimizer, scheduler = build_task(spec["method"], spec["lr"], spec["seed"], spec["rank"], total,
                                            spec["warmup"], spec["smoke"])
    model = task.model
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    rss_before = common.peak_rss_mib()
    val_loader, test_loader = dm.val_dataloader(), dm.test_dataloader()

    def point(step: int, train_loss):
        val_loss, val_acc = evaluate(model, val_loader)
        test_loss, test_acc = evaluate(model, test_loader)
        return dict(step=step, train_loss=train_loss, val_loss=val_loss, val_acc=val_acc, test_loss=test_loss,
                    test_acc=test_acc)

    curve, window, step_times, step, diverged = [point(0, None)], [], [], 0, False
    for epoch in range(spec["epochs"]):
        loader = dm.train_dataloader()
        loader.sampler.set_epoch(epoch)
        for batch in loader:
            step += 1
            start = time.perf_counter()
            optimizer.zero_grad(set_to_none=True)
            loss = model(**batch).loss
            loss.backward()
            optimizer.step()
            scheduler.step()
            step_times.append(time.perf_counter() - start)
            window.append(loss.detach().item())
            if not math.isfinite(window[-1]):
                diverged = True
                break
            if step % spec["eval_every"] == 0 or step == total:
                curve.append(point(step, common.mean(window)))
                window = []
        if diverged:
            break
    final = curve[-1]
    best = max(curve[1:] or curve, key=lambda p: (p["val_acc"], -p["val_loss"], p["step"]))
    return {
        **{k: spec[k] for k in ("method", "lr", "seed", "rank")},
        "label": label(spec["method"], spec["rank"]),
        "steps": step,
        "diverged": diverged or not math.isfinite(final["val_loss"]),
        "final_val_acc": final["val_acc"] if not diverged else 0.0,
        "final_val_loss": final["val_loss"] if not diverged else float("inf"),
        "final_test_acc": final["test_acc"] if not diverged else 0.0,
        "final_test_loss": final["test_loss"] if not diverged else float("inf"),
        "best_val_step": best["step"],
        "best_val_acc": best["val_acc"],
        "test_acc_at_best_val": best["test_acc"],
        "curve": curve,
        "trainable_params": trainable,
        "state_bytes": optimizer_state_bytes(optimizer),
        "peak_rss_mib": common.peak_rss_mib(),
        "rss_before_training_mib": rss_before,
        "step_ms_median": 1e3 * statistics.median(step_times),
        "wall_s": time.perf_counter() - started,
        "cpu_s": common.cpu_seconds() - cpu_started,
        "sizes": {split: len(examples) for split, examples in dm.splits.items()},
    }


# ----------------------------------------------------------------------------------------- sweep, report
def score(result: dict) -> tuple:
    """Lower is better: higher final validation accuracy, then lower final validation loss."""
    if result.get("diverged") or "final_val_acc" not in result:
        return float("inf")
    loss = result["final_val_loss"]
    return -result["final_val_acc"] + 1e-6 * min(loss if loss == loss else 1e6, 1e6)


def describe(result: dict) -> str:
    if "error" in result:
        return "FAILED: " + result["error"][-500:]
    return (f"val acc {result['final_val_acc']:.3f} loss {result['final_val_loss']:.3f} | test acc "
            f"{result['final_test_acc']:.3f} ({result.get('wall_s', 0):.0f} s)")


def runner(args):
    base = dict(epochs=args.epochs, warmup=args.warmup, eval_every=args.eval_every, rank=args.rank,
                threads=args.threads, smoke=args.smoke)
    return common.make_runner(Path(__file__).resolve(), args.runs, base, run_one, describe, args.in_process,
                              args.wait_load)


def summarise(args, runs: list[dict]) -> tuple[list[dict], dict]:
    chosen = common.choose(runs, score, args.seeds[0])
    summary = []
    for method in [m for m in args.methods if m in chosen]:
        lr = chosen[method]
        final = sorted((r for r in runs if r["method"] == method and r["lr"] == lr and r["seed"] in args.seeds
                        and "final_test_acc" in r), key=lambda r: r["seed"])
        grid = sorted((r["lr"], r.get("final_val_acc", 0.0)) for r in runs
                      if r["method"] == method and r["seed"] == args.seeds[0])
        test_acc = [r["final_test_acc"] for r in final]
        summary.append({
            "method": label(method, args.rank),
            "key": method,
            "lr": lr,
            "seeds": len(final),
            "test_acc_mean": 100 * common.mean(test_acc),
            "test_acc_std": common.std(test_acc, factor=100),
            "test_acc_per_seed": " / ".join(f"{100 * a:.1f}" for a in test_acc),
            "test_loss_mean": common.mean([r["final_test_loss"] for r in final]),
            "val_acc_mean": 100 * common.mean([r["final_val_acc"] for r in final]),
            "test_acc_at_best_val_mean": 100 * common.mean([r["test_acc_at_best_val"] for r in final]),
            "lr_grid": ", ".join(f"{g:g}: {100 * v:.1f}" for g, v in grid),
            "trainable_M": final[0]["trainable_params"] / 1e6 if final else None,
            "state_MiB": final[0]["state_bytes"] / 2**20 if final else None,
            "peak_rss_MiB": common.mean([r["peak_rss_mib"] for r in final]),
            "step_ms": common.mean([r["step_ms_median"] for r in final]),
        })
    return summary, chosen


def plot(args, runs: list[dict], chosen: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, (acc_ax, loss_ax, grid_ax) = plt.subplots(1, 3, figsize=(16, 5))
    colors = plt.get_cmap("tab10")
    for index, method in enumerate(m for m in args.methods if m in chosen):
        color = colors(index)
        picked = [r for r in runs if r["method"] == method and r["lr"] == chosen[method] and r.get("curve")
                  and r["seed"] in args.seeds]
        for run in picked:
            steps = [p["step"] for p in run["curve"]]
            acc_ax.plot(steps, [100 * p["val_acc"] for p in run["curve"]], color=color, alpha=0.25, linewidth=1)
            loss_ax.plot(steps, [p["val_loss"] for p in run["curve"]], color=color, alpha=0.25, linewidth=1)
        if picked and len({len(r["curve"]) for r in picked}) == 1:
            steps = [p["step"] for p in picked[0]["curve"]]
            name = f"{label(method, args.rank)} (lr {chosen[method]:g}, {len(picked)} seeds)"
            for axis, key, factor in ((acc_ax, "val_acc", 100), (loss_ax, "val_loss", 1)):
                values = [factor * common.mean([r["curve"][i][key] for r in picked]) for i in range(len(steps))]
                axis.plot(steps, values, color=color, linewidth=2, label=name)
        sweep_runs = sorted((r["lr"], r.get("final_val_acc", 0.0)) for r in runs
                            if r["method"] == method and r["seed"] == args.seeds[0])
        grid_ax.plot([lr for lr, _ in sweep_runs], [100 * a for _, a in sweep_runs], "o-", color=color,
                     label=label(method, args.rank))
    chance = 100 / (len(SMOKE_PACKAGES) if args.smoke else 9)
    acc_ax.axhline(chance, color="grey", linestyle=":", label=f"chance ({chance:.1f}%)")
    acc_ax.set(xlabel="optimizer step", ylabel="validation accuracy (%)",
               title="Validation accuracy: mean over seeds (bold), each seed (faint)")
    loss_ax.set(xlabel="optimizer step", ylabel="validation loss (cross-entropy)", title="Validation loss")
    grid_ax.set_xscale("log")
    grid_ax.set(xlabel="peak learning rate", ylabel="final validation accuracy (%), seed 0",
                title="Learning-rate grid (seed 0)")
    for axis in (acc_ax, loss_ax, grid_ax):
        axis.grid(True, which="both", alpha=0.3)
    acc_ax.legend(fontsize=7)
    grid_ax.legend(fontsize=7)
    figure.tight_layout()
    figure.savefig(path, dpi=110)
    plt.close(figure)


def write_report(args, runs: list[dict], env: dict, seconds: float | None) -> list[dict]:
    summary, chosen = summarise(args, runs)
    args.out.mkdir(parents=True, exist_ok=True)
    common.write_csv(args.out / f"{NAME}.csv", [{k: v for k, v in r.items() if k not in ("curve", "sizes")} for r in runs],
                     ["method", "label", "lr", "seed", "rank", "steps", "final_val_acc", "final_val_loss",
                      "final_test_acc", "final_test_loss", "best_val_step", "best_val_acc", "test_acc_at_best_val",
                      "diverged", "trainable_params", "state_bytes", "peak_rss_mib", "rss_before_training_mib",
                      "step_ms_median", "wall_s", "cpu_s", "load_average_at_start", "error"])
    common.write_csv(args.out / f"{NAME}_curves.csv",
                     [{"method": r["method"], "lr": r["lr"], "seed": r["seed"], **p} for r in runs
                      for p in r.get("curve", [])])
    plot(args, runs, chosen, args.out / f"{NAME}.png")
    sizes = next((r["sizes"] for r in runs if "sizes" in r), {})
    wall_total = sum(r.get("wall_s", 0) for r in runs) / 60
    cpu_total = sum(r.get("cpu_s", 0) for r in runs) / 60
    lines = [
        "# Fine-tuning quality: all-MiniLM-L6-v2 on the docstring task",
        "",
        *common.environment_lines(env),
        f"- runs: {len(runs)} ({wall_total:.0f} min wall, {cpu_total:.0f} min CPU in the runs"
        + (f"; this invocation {seconds / 60:.0f} min" if seconds else "") + ")",
        "",
        "## Setup",
        "",
        ("Tiny BERT from a config (smoke test). " if args.smoke else
         "The real pretrained all-MiniLM-L6-v2 (22.7M parameters, `AutoModelForSequenceClassification`, new 9-way "
         "head) ")
        + "on `DocstringClassificationDataModule(batch_size=32, max_length=64)`: which standard-library package a "
          f"docstring paragraph comes from, {sizes.get('train', '?')} / {sizes.get('validation', '?')} / "
          f"{sizes.get('test', '?')} train / validation / test paragraphs, chance 11.1%. Same budget for every "
          f"method: {args.epochs} epochs ({args.epochs * 20} steps), warm-up {args.warmup} steps then cosine to 0, "
          f"decoupled weight decay {WEIGHT_DECAY}, AdamW betas (0.9, 0.999); dropout 0.1 as in the model config. "
          f"LoRA: r={args.rank}, alpha={2 * args.rank} on query/key/value/dense (all 36 linear layers of the 6 "
          "blocks), classifier head trained fully (in LoRA-Pro's second param group, plain AdamW). LoRA-Pre Adam: "
          f"no adapters, every parameter trained, rank {args.rank} factors for the 36 block matrices, `scale=1` (the "
          "paper's fine-tuning alpha), embeddings / norms / pooler / head on AdamW. The task is built exactly as the "
          "CLI builds it (`SequenceClassificationTask(...).configure_optimizers()`); the loop is plain PyTorch.",
        "",
        "Learning-rate tuning (same protocol for every method): a log-spaced grid of 3 peak learning rates per method "
        "around its usual range, seed 0, full budget; chosen by final validation accuracy (ties: lower validation "
        f"loss); where the best was at an edge, up to {args.extend} more point(s) past it; then the chosen lr with "
        f"seeds {', '.join(map(str, args.seeds[1:]))}. Validation and test are evaluated every {args.eval_every} "
        "steps; **test accuracy is that of the final model** (the column 'at best val' evaluates the checkpoint "
        "with the best validation accuracy instead). Test split: 135 paragraphs, so one paragraph = 0.74 points.",
        "",
        "## Results",
        "",
        *common.markdown_table(summary, [
            ("method", "method"), ("lr", "chosen lr"), ("seeds", "seeds"), ("test_acc_mean", "test acc % (mean)"),
            ("test_acc_std", "std"), ("test_acc_per_seed", "test acc % per seed"), ("test_loss_mean", "test loss"),
            ("test_acc_at_best_val_mean", "test acc % at best val"), ("trainable_M", "trainable M params"),
            ("state_MiB", "optimizer state MiB"), ("step_ms", "step ms (in-run median)"),
            ("lr_grid", "lr grid, seed 0: final val acc %")], digits=4),
        "",
        f"![validation curves]({NAME}.png)",
        "",
        "Per-run values: `finetune_quality.csv`; curves (validation and test every evaluation): "
        "`finetune_quality_curves.csv`. In-run step times may include other processes' load; see "
        "`train_step_speed.md` for the controlled timing.",
        "",
    ]
    common.write_markdown(args.out, NAME, lines, args.smoke)
    return summary


def main(argv=None) -> list[dict]:
    args = parse_args(argv)
    return common.sweep_main(__file__, argv, args, GRIDS, run_one, runner, score, write_report,
                             lambda row: f"{row['method']:34s} lr {row['lr']:<7g} test acc {row['test_acc_mean']:.1f}% ({row['test_acc_per_seed']})")


if __name__ == "__main__":
    main()
