"""Fine-tuning quality: LoRA, rsLoRA, LoRA+, LoRA-Pro (efficient, full), LoRA-Pre Adam and full fine-tuning,
with confidence intervals that say which differences this benchmark resolves.

Task: the real pretrained all-MiniLM-L6-v2 (bundled, offline) classifies which of 9 standard-library packages a
docstring paragraph comes from: ``DocstringClassificationDataModule(cap_per_class=None, fractions=(0.35, 0.10,
0.55), batch_size=32, max_length=64)``, i.e. every distinct paragraph of the 9 packages, split by a stable hash of
its text: 935 / 254 / 1396 train / validation / test paragraphs on CPython 3.11 (classes unbalanced, majority-class
rate 17%). The test split is the large one, so that a difference of a few points can be resolved.

Every method gets the same budget: 64 optimizer steps of 32 paragraphs (about 2.1 epochs), linear warm-up 6 steps
then cosine to 0 (``WarmupCosineLR``), decoupled weight decay 0.01, the same freshly initialised classifier head
per seed. Validation every 16 steps; the test split once, with the final model, saving every prediction.

Methods (rank 8 everywhere, library defaults otherwise):
    lora_adamw          LoRA r=8, alpha=16 on query/key/value/dense, head trained fully, torch.optim.AdamW
    rslora_adamw        the same with rank-stabilised scaling alpha/sqrt(r) (``LoRAConfig(rslora=True)``: 5.66
                        instead of 2)
    loraplus_adamw      LoRA+: the same adapters, AdamW with the B matrices at 16 x the learning rate of the A
                        matrices and the head (the LoRA+ paper's ratio; param groups built here)
    lora_pro_efficient  the same adapters, LoRAPro(mode="efficient")
    lora_pro_full       the same adapters, LoRAPro(mode="full") (m x n Adam moments per adapted layer)
    full_ft             every parameter, torch.optim.AdamW
    lora_pre_adam       every parameter, LoRAPreAdamW rank 8 (block matrices factored, the rest AdamW), scale 1,
                        its defaults (debiased second moment, update_bound="v_floor")
    lora_pre_adam_no_residual   the same with residual_step=False: LoRA-Pre Adam's default until 2026-12-07 (the
                        paper's first moment), kept so that the change of default is measured
    lora_pre_adam_paper not run by default (``--methods ... lora_pre_adam_paper``): the same with the paper's
                        formula (debias_second_moment=False, update_bound="none"), unsafe

Protocol: each method's 3-point log grid on seed 0, chosen by final validation accuracy (ties: lower validation
loss), extended past an edge holding the best (``--extend``, one point by default), then the chosen lr with seeds
1 and 2. ``--workers 2`` (the default) runs two single-thread runs at once; a method's seeds 1-2 wait for its lr
choice, other methods' runs go on. One process per run; per-run JSON in ``--runs`` is reused, so an interrupted
sweep resumes and ``--report-only`` rebuilds the outputs.

Statistics: 95% intervals of test accuracy by bootstrap over test examples and seeds, and paired bootstrap
intervals of the differences between methods (same test examples); see ``stats.bootstrap_accuracies``.

Cost (``--threads 1``, measured 2026-11-30 on the 2-core AMD EPYC dev machine under a load average of 3-4.6, CPU
seconds of one run): LoRA, rsLoRA, LoRA+ and LoRA-Pro efficient 163-167 s, LoRA-Pro full 169 s, full fine-tuning
179 s, LoRA-Pre Adam 205 s, i.e. about 3 min per run on one core (model load ~7 s, 64 steps ~2 s each, 4
validations ~3 s each, the test pass ~15 s: evaluation batches are length-sorted). The default protocol (7
methods x (3 grid points + 2 seeds) + extensions, about 38 runs, ~110 CPU-minutes) takes about 1 h with the
default two single-thread workers on 2 otherwise idle cores; other processes on the cores stretch it (the
measurement above took 2-3 x its CPU time in wall time).

    python benchmarks/finetune_quality.py                     # the protocol, 2 workers x 1 thread: about 1 h
    python benchmarks/finetune_quality.py --report-only       # rebuild the report from the runs folder
    python benchmarks/finetune_quality.py --smoke --out /tmp/bench   # seconds: tiny BERT from a config
"""

from __future__ import annotations

import argparse
import functools
import itertools
import math
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import environment  # noqa: E402
import report  # noqa: E402
import stats  # noqa: E402
import sweep  # noqa: E402

NAME = "finetune_quality"
MINILM = "sentence-transformers/all-MiniLM-L6-v2"
SMOKE_BERT = dict(model_type="bert", hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
                  vocab_size=30522, max_position_embeddings=128)
SMOKE_PACKAGES = ["json", "http"]
NUM_CLASSES = 9  # the data module's default packages
FRACTIONS = (0.35, 0.10, 0.55)  # train / validation / test shares of every package's paragraphs
BATCH_SIZE, MAX_LENGTH = 32, 64
WEIGHT_DECAY = 0.01
LORAPLUS_RATIO = 16.0  # lr of the B matrices / lr of the A matrices (LoRA+ paper's recommendation)
GRIDS = {  # centred on the choices of the 135-test-paragraph sweep (finetune_quality_runs_135test/)
    "lora_adamw": [1e-3, 3e-3, 1e-2],
    "rslora_adamw": [3e-4, 1e-3, 3e-3],  # scaling 2.83x LoRA's: the same updates at about 1/2.83 the lr
    "loraplus_adamw": [1e-4, 3e-4, 1e-3],  # the lr of A; B moves at 16x
    "lora_pro_efficient": [1e-3, 3e-3, 1e-2],
    "lora_pro_full": [1e-4, 3e-4, 1e-3],
    "full_ft": [1e-4, 3e-4, 1e-3],
    "lora_pre_adam": [3e-4, 1e-3, 3e-3],
    "lora_pre_adam_no_residual": [3e-4, 1e-3, 3e-3],
    "lora_pre_adam_paper": [3e-5, 1e-4, 3e-4],
}
DEFAULT_METHODS = [method for method in GRIDS if method != "lora_pre_adam_paper"]
ADAPTER_METHODS = ("lora_adamw", "rslora_adamw", "loraplus_adamw", "lora_pro_efficient", "lora_pro_full")
PAPER_LITERAL = {"debias_second_moment": False, "update_bound": "none", "residual_step": False}
#: The differences the report judges (first minus second): the papers' claims and the LoRA variants' baselines.
COMPARISONS = [
    ("lora_pro_efficient", "lora_adamw"),
    ("lora_pro_full", "lora_adamw"),
    ("lora_pre_adam", "full_ft"),
    ("full_ft", "lora_adamw"),
    ("rslora_adamw", "lora_adamw"),
    ("loraplus_adamw", "lora_adamw"),
    ("lora_pre_adam", "lora_adamw"),
    ("lora_pre_adam_paper", "lora_pre_adam"),
    ("lora_pre_adam", "lora_pre_adam_no_residual"),
]


def cost_methods() -> list[str]:
    """The methods whose optimizer state or step differ (memory.py, step_timing.py training): rsLoRA and LoRA+ cost
    what LoRA costs."""
    return ["lora_adamw", "lora_pro_efficient", "lora_pro_full", "full_ft", "lora_pre_adam"]


def label(method: str, rank: int) -> str:
    return {
        "lora_adamw": f"LoRA r={rank} + AdamW",
        "rslora_adamw": f"rsLoRA r={rank} + AdamW",
        "loraplus_adamw": f"LoRA+ r={rank} (B lr x{LORAPLUS_RATIO:g})",
        "lora_pro_efficient": f"LoRA-Pro efficient r={rank}",
        "lora_pro_full": f"LoRA-Pro full r={rank}",
        "full_ft": "Full fine-tuning (AdamW)",
        "lora_pre_adam": f"LoRA-Pre Adam r={rank} (all weights)",
        "lora_pre_adam_no_residual": f"LoRA-Pre Adam r={rank} (all weights), no residual step (default until "
                                     "2026-12-07)",
        "lora_pre_adam_paper": f"LoRA-Pre Adam r={rank} (all weights), paper-literal (unsafe)",
    }[method]


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], epilog=__doc__.split("\n\n", 1)[1],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    sweep.add_sweep_arguments(parser, NAME, GRIDS, workers=2, threads=1)
    parser.set_defaults(methods=DEFAULT_METHODS)
    parser.add_argument("--steps", type=int, default=64, help="optimizer steps of 32 paragraphs (30 = one epoch)")
    parser.add_argument("--warmup", type=int, default=6, help="linear warm-up steps")
    parser.add_argument("--eval-every", type=int, default=16, help="steps between validation passes")
    parser.add_argument("--rank", type=int, default=8, help="LoRA rank (alpha = 2 rank) and LoRA-Pre rank")
    parser.add_argument("--smoke", action="store_true", help="tiny BERT, 2 classes, 4 steps, in-process")
    args = parser.parse_args(argv)
    if args.smoke:
        args.steps, args.warmup, args.eval_every, args.rank, args.seeds = 4, 1, 2, 2, [0, 1]
        args.extend, args.in_process, args.wait_load, args.workers = 0, True, 0.0, 1
        args.lrs = args.lrs or [1e-3]
    args.runs = args.runs or args.out / f"{NAME}_runs"
    return args


# ------------------------------------------------------------------------------------------------ one run
def data_module(smoke: bool, seed: int):
    from lit_lowrank.data import DocstringClassificationDataModule

    if smoke:
        return DocstringClassificationDataModule(packages=SMOKE_PACKAGES, cap_per_class=20, batch_size=8,
                                                 max_length=32, seed=seed)
    return DocstringClassificationDataModule(cap_per_class=None, fractions=FRACTIONS, batch_size=BATCH_SIZE,
                                             max_length=MAX_LENGTH, seed=seed)


@functools.cache
def loraplus_adamw() -> type:
    """AdamW with LoRA+'s learning rates: every ``lora_B`` at ``ratio`` x ``lr``, the rest (``lora_A``, the head)
    at ``lr``. Built on first use so that ``--help`` needs no torch."""
    import torch

    class LoRAPlusAdamW(torch.optim.AdamW):
        accepts_module = True  # build_optimizer hands it the model: the groups need the parameters' names

        def __init__(self, model, lr: float, ratio: float = LORAPLUS_RATIO, weight_decay: float = 0.0):
            trainable = [(name, p) for name, p in model.named_parameters() if p.requires_grad]
            b_matrices = [p for name, p in trainable if "lora_B" in name]
            if not b_matrices:
                raise ValueError("LoRA+ needs LoRA adapters: the model has no trainable lora_B")
            rest = [p for name, p in trainable if "lora_B" not in name]
            groups = [{"params": rest}, {"params": b_matrices, "lr": lr * ratio}]
            super().__init__(groups, lr=lr, weight_decay=weight_decay)

    return LoRAPlusAdamW


def lora_config(method: str, rank: int):
    """The adapters of the LoRA methods (None: every weight trained)."""
    from lit_lowrank import LoRAConfig

    if method not in ADAPTER_METHODS:
        return None
    return LoRAConfig(r=rank, alpha=2 * rank, target_modules="default", rslora=method == "rslora_adamw")


def optimizer_factory(method: str, lr: float, rank: int):
    import torch

    from lit_lowrank.optim import LoRAPreAdamW, LoRAPro

    adamw = functools.partial(torch.optim.AdamW, lr=lr, weight_decay=WEIGHT_DECAY)
    lora_pre = functools.partial(LoRAPreAdamW, lr=lr, rank=rank, scale=1.0, weight_decay=WEIGHT_DECAY)
    return {
        "lora_adamw": adamw,
        "rslora_adamw": adamw,
        "loraplus_adamw": functools.partial(loraplus_adamw(), lr=lr, weight_decay=WEIGHT_DECAY),
        "full_ft": adamw,
        "lora_pro_efficient": functools.partial(LoRAPro, lr=lr, mode="efficient", weight_decay=WEIGHT_DECAY),
        "lora_pro_full": functools.partial(LoRAPro, lr=lr, mode="full", weight_decay=WEIGHT_DECAY),
        "lora_pre_adam": lora_pre,
        "lora_pre_adam_no_residual": functools.partial(lora_pre, residual_step=False),
        "lora_pre_adam_paper": functools.partial(lora_pre, **PAPER_LITERAL),
    }[method]


def build_task(method: str, lr: float, seed: int, rank: int, total_steps: int, warmup: int, smoke: bool):
    """The task exactly as the CLI builds it (adapters injected, head trainable), optimizer and scheduler
    from its ``configure_optimizers``."""
    import torch

    from lit_lowrank.backbones import transformers_backbone
    from lit_lowrank.optim import WarmupCosineLR
    from lit_lowrank.tasks import SequenceClassificationTask

    torch.manual_seed(seed)  # the classifier head's and the adapters' initialisation
    if smoke:
        backbone = transformers_backbone(config=SMOKE_BERT, auto_class="AutoModelForSequenceClassification",
                                         tokenizer=False, model_kwargs={"num_labels": len(SMOKE_PACKAGES)})
    else:
        backbone = transformers_backbone(MINILM, auto_class="AutoModelForSequenceClassification", tokenizer=False,
                                         model_kwargs={"num_labels": NUM_CLASSES})
    scheduler = functools.partial(WarmupCosineLR, warmup_steps=warmup, total_steps=total_steps)
    task = SequenceClassificationTask(backbone, lora=lora_config(method, rank),
                                      optimizer=optimizer_factory(method, lr, rank), scheduler=scheduler)
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


class LengthSortedSplit:
    """An evaluation split batched in order of token length, so that padding each batch to its longest text
    wastes little (most paragraphs are far shorter than ``max_length``: this halves the cost of evaluating).
    ``in_split_order`` puts per-example results back in the split's order."""

    def __init__(self, dm, split: str) -> None:
        import torch
        from torch.utils.data import DataLoader

        from lit_lowrank.data.labelled_text import TokenizeCollator

        examples = dm.splits[split]
        encoded = dm.tokenizer([text for text, _ in examples], truncation=True, max_length=dm.max_length)
        self.order = sorted(range(len(examples)), key=lambda i: len(encoded["input_ids"][i]))
        # Its own generator: starting an iterator draws a seed, which must not come from the global RNG that
        # dropout uses, or how often a run evaluates would change its training.
        self.loader = DataLoader([examples[i] for i in self.order], batch_size=dm.batch_size,
                                 collate_fn=TokenizeCollator(dm.tokenizer, dm.max_length),
                                 generator=torch.Generator())

    def in_split_order(self, values: list) -> list:
        restored = [None] * len(values)
        for position, index in enumerate(self.order):
            restored[index] = values[position]
        return restored


def evaluate(model, split: LengthSortedSplit) -> dict:
    """Mean cross-entropy per example, accuracy, and every prediction and label in the split's order."""
    import torch

    model.eval()
    loss_sum, predictions, labels = 0.0, [], []
    with torch.no_grad():
        for batch in split.loader:
            output = model(**batch)
            loss_sum += float(output.loss) * len(batch["labels"])
            predictions += output.logits.argmax(-1).tolist()
            labels += batch["labels"].tolist()
    model.train()
    correct = sum(p == y for p, y in zip(predictions, labels))
    return {"loss": loss_sum / len(labels), "acc": correct / len(labels),
            "predictions": split.in_split_order(predictions), "labels": split.in_split_order(labels)}


def train(model, optimizer, scheduler, dm, total: int, eval_every: int) -> tuple[list[dict], list[float], bool]:
    """``total`` optimizer steps over as many epochs as that takes. Returns the validation curve (every
    ``eval_every`` steps and at the end), the step times, and whether the loss became non-finite (training
    stops there)."""
    validation = LengthSortedSplit(dm, "validation")
    curve, window, step_times, step = [], [], [], 0
    for epoch in itertools.count():
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
                return curve, step_times, True
            if step % eval_every == 0 or step == total:
                val = evaluate(model, validation)
                curve.append(dict(step=step, train_loss=stats.mean(window), val_loss=val["loss"], val_acc=val["acc"]))
                window = []
            if step == total:
                return curve, step_times, False
    raise AssertionError("unreachable")


def test_outcome(model, dm, diverged: bool) -> dict:
    """The final model on the test split. A diverged model gets every example wrong (prediction -1) rather than
    the arbitrary argmax of non-finite logits."""
    if not diverged:
        return evaluate(model, LengthSortedSplit(dm, "test"))
    labels = [label_id for _, label_id in dm.splits["test"]]
    return {"loss": float("inf"), "acc": 0.0, "predictions": [-1] * len(labels), "labels": labels}


def class_counts(dm) -> dict[str, list[int]]:
    """Examples per class in each split (the majority-class rate is the accuracy of always guessing it)."""
    return {split: [sum(1 for _, y in examples if y == k) for k in range(dm.num_classes)]
            for split, examples in dm.splits.items()}


def run_one(spec: dict) -> dict:
    import torch

    torch.set_num_threads(spec["threads"])
    started, cpu_started = time.perf_counter(), environment.cpu_seconds()
    dm = data_module(spec["smoke"], spec["seed"])
    dm.setup("fit")
    task, optimizer, scheduler = build_task(spec["method"], spec["lr"], spec["seed"], spec["rank"], spec["steps"],
                                            spec["warmup"], spec["smoke"])
    model = task.model
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    rss_before = environment.peak_rss_mib()
    curve, step_times, diverged = train(model, optimizer, scheduler, dm, spec["steps"], spec["eval_every"])
    diverged = diverged or not curve or not math.isfinite(curve[-1]["val_loss"])
    test = test_outcome(model, dm, diverged)
    final = curve[-1] if curve and not diverged else {"val_acc": 0.0, "val_loss": float("inf")}
    best = max(curve or [dict(step=0, val_acc=0.0, val_loss=float("inf"))],
               key=lambda p: (p["val_acc"], -p["val_loss"], p["step"]))
    return {
        **{k: spec[k] for k in ("method", "lr", "seed", "rank")},
        "label": label(spec["method"], spec["rank"]),
        "steps": len(step_times),
        "diverged": diverged,
        "final_val_acc": final["val_acc"],
        "final_val_loss": final["val_loss"],
        "final_test_acc": test["acc"],
        "final_test_loss": test["loss"],
        "test_examples": len(test["labels"]),
        "best_val_step": best["step"],
        "best_val_acc": best["val_acc"],
        "curve": curve,
        "test_predictions": test["predictions"],
        "test_labels": test["labels"],
        "trainable_params": trainable,
        "state_bytes": optimizer_state_bytes(optimizer),
        "peak_rss_mib": environment.peak_rss_mib(),
        "rss_before_training_mib": rss_before,
        "step_ms_median": 1e3 * statistics.median(step_times),
        "wall_s": time.perf_counter() - started,
        "cpu_s": environment.cpu_seconds() - cpu_started,
        "sizes": {split: len(examples) for split, examples in dm.splits.items()},
        "class_counts": class_counts(dm),
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
    base = dict(steps=args.steps, warmup=args.warmup, eval_every=args.eval_every, rank=args.rank,
                threads=args.threads, smoke=args.smoke)
    return sweep.make_runner(Path(__file__).resolve(), args.runs, base, run_one, describe, args.in_process,
                             args.wait_load)


def correctness(run: dict) -> list[int]:
    """1 per test example the run got right, 0 per one it got wrong, in test-split order."""
    return [int(p == y) for p, y in zip(run["test_predictions"], run["test_labels"])]


def final_runs(args, runs: list[dict], method: str, lr: float) -> list[dict]:
    """The runs of ``method`` at its chosen ``lr`` on the protocol's seeds that saved test predictions."""
    return sorted((r for r in runs if r["method"] == method and r["lr"] == lr and r["seed"] in args.seeds
                   and "test_predictions" in r), key=lambda r: r["seed"])


def summary_row(args, runs: list[dict], method: str, lr: float) -> dict:
    final = final_runs(args, runs, method, lr)
    test_acc = [r["final_test_acc"] for r in final]
    accuracy, low, high = stats.accuracy_interval([correctness(r) for r in final]) if final else (None,) * 3
    grid = sorted((r["lr"], r.get("final_val_acc", 0.0)) for r in runs
                  if r["method"] == method and r["seed"] == args.seeds[0])
    return {
        "method": label(method, args.rank),
        "key": method,
        "lr": lr,
        "seeds": len(final),
        "test_examples": final[0]["test_examples"] if final else None,
        "test_acc_mean": 100 * accuracy if final else None,
        "test_acc_ci_low": 100 * low if final else None,
        "test_acc_ci_high": 100 * high if final else None,
        "test_acc_ci": f"[{100 * low:.1f}, {100 * high:.1f}]" if final else "",
        "test_acc_std": stats.std(test_acc, factor=100),
        "test_acc_per_seed": " / ".join(f"{100 * a:.1f}" for a in test_acc),
        "test_loss_mean": stats.mean([r["final_test_loss"] for r in final]),
        "val_acc_mean": 100 * stats.mean([r["final_val_acc"] for r in final]),
        "lr_grid": ", ".join(f"{g:g}: {100 * v:.1f}" for g, v in grid),
        "trainable_M": final[0]["trainable_params"] / 1e6 if final else None,
        "state_MiB": final[0]["state_bytes"] / 2**20 if final else None,
        "peak_rss_MiB": stats.mean([r["peak_rss_mib"] for r in final]),
        "step_ms": stats.mean([r["step_ms_median"] for r in final]),
        "run_wall_s": stats.mean([r["wall_s"] for r in final]),
        "run_cpu_s": stats.mean([r["cpu_s"] for r in final]),
    }


def summarise(args, runs: list[dict]) -> tuple[list[dict], dict]:
    chosen = sweep.choose(runs, score, args.seeds[0])
    return [summary_row(args, runs, method, chosen[method]) for method in args.methods if method in chosen], chosen


def compare(args, runs: list[dict], chosen: dict, a: str, b: str, bonferroni: int) -> dict | None:
    """Paired bootstrap of test accuracy a - b (points) at both methods' chosen lrs; None without runs for both.
    ``resolved``: the 95% interval excludes 0; ``resolved_bonferroni``: so does the 1 - 0.05 / ``bonferroni``
    interval (all the report's comparisons at a joint 95%)."""
    if a not in chosen or b not in chosen:
        return None
    runs_a, runs_b = final_runs(args, runs, a, chosen[a]), final_runs(args, runs, b, chosen[b])
    if not runs_a or not runs_b or runs_a[0]["test_labels"] != runs_b[0]["test_labels"]:
        return None
    replicates = stats.bootstrap_accuracies([[correctness(r) for r in runs_a], [correctness(r) for r in runs_b]])
    differences = 100 * (replicates[:, 0] - replicates[:, 1])
    low, high = stats.percentile_interval(differences, 0.95)
    strict = stats.percentile_interval(differences, 1 - 0.05 / max(bonferroni, 1))
    estimate = 100 * (stats.mean([r["final_test_acc"] for r in runs_a])
                      - stats.mean([r["final_test_acc"] for r in runs_b]))
    return {
        "comparison": f"{label(a, args.rank)} - {label(b, args.rank)}",
        "a": a, "b": b, "seeds_a": len(runs_a), "seeds_b": len(runs_b),
        "difference": estimate, "ci_low": low, "ci_high": high,
        "difference_text": f"{estimate:+.1f}", "ci": f"[{low:+.1f}, {high:+.1f}]",
        "resolved": verdict(low, high, a, b, args.rank),
        "resolved_bonferroni": verdict(*strict, a, b, args.rank),
    }


def verdict(low: float, high: float, a: str, b: str, rank: int) -> str:
    if low > 0:
        return f"yes: {label(a, rank)} better"
    if high < 0:
        return f"yes: {label(b, rank)} better"
    return "no"


def comparisons(args, runs: list[dict], chosen: dict) -> tuple[list[dict], list[dict]]:
    """The report's comparisons of interest, and every pair of methods (for the CSV)."""
    wanted = [pair for pair in COMPARISONS if pair[0] in chosen and pair[1] in chosen]
    of_interest = [compare(args, runs, chosen, a, b, len(wanted)) for a, b in wanted]
    methods = [m for m in args.methods if m in chosen]
    every_pair = [compare(args, runs, chosen, a, b, len(wanted)) for a, b in itertools.combinations(methods, 2)]
    return [row for row in of_interest if row], [row for row in every_pair if row]


def plot(args, runs: list[dict], chosen: dict, summary: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, (acc_ax, grid_ax, test_ax) = plt.subplots(1, 3, figsize=(17, 5.5))
    colors = plt.get_cmap("tab10")
    for index, method in enumerate(m for m in args.methods if m in chosen):
        color, name = colors(index), label(method, args.rank)
        picked = [r for r in runs if r["method"] == method and r["lr"] == chosen[method] and r.get("curve")
                  and r["seed"] in args.seeds]
        for run in picked:
            acc_ax.plot([p["step"] for p in run["curve"]], [100 * p["val_acc"] for p in run["curve"]], color=color,
                        alpha=0.25, linewidth=1)
        if picked and len({len(r["curve"]) for r in picked}) == 1:
            steps = [p["step"] for p in picked[0]["curve"]]
            values = [100 * stats.mean([r["curve"][i]["val_acc"] for r in picked]) for i in range(len(steps))]
            acc_ax.plot(steps, values, color=color, linewidth=2, label=f"{name} (lr {chosen[method]:g})")
        grid = sorted((r["lr"], r.get("final_val_acc", 0.0)) for r in runs
                      if r["method"] == method and r["seed"] == args.seeds[0])
        grid_ax.plot([lr for lr, _ in grid], [100 * a for _, a in grid], "o-", color=color, label=name)
    rows = [row for row in summary if row["test_acc_mean"] is not None]
    for y, row in enumerate(rows):
        test_ax.errorbar(row["test_acc_mean"], y, color=colors(y), fmt="o", capsize=4,
                         xerr=[[row["test_acc_mean"] - row["test_acc_ci_low"]],
                               [row["test_acc_ci_high"] - row["test_acc_mean"]]])
    test_ax.set_yticks(range(len(rows)), [row["method"] for row in rows], fontsize=7)
    test_ax.invert_yaxis()
    acc_ax.set(xlabel="optimizer step", ylabel="validation accuracy (%)",
               title="Validation accuracy: mean over seeds (bold), each seed (faint)")
    grid_ax.set_xscale("log")
    grid_ax.set(xlabel="peak learning rate", ylabel="final validation accuracy (%), seed 0",
                title="Learning-rate grid (seed 0)")
    test_ax.set(xlabel="test accuracy (%)", title="Test accuracy, 95% bootstrap CI")
    for axis in (acc_ax, grid_ax, test_ax):
        axis.grid(True, which="both", alpha=0.3)
    acc_ax.legend(fontsize=7)
    grid_ax.legend(fontsize=7)
    figure.tight_layout()
    figure.savefig(path, dpi=110)
    plt.close(figure)


def protocol_span_minutes(runs: list[dict]) -> float | None:
    """Minutes from the first run's start to the last run's end (the sweep's wall time when it ran in one go);
    None when the runs carry no timestamps."""
    timed = [r for r in runs if "started_at" in r and "finished_at" in r]
    if not timed:
        return None
    return (max(r["finished_at"] for r in timed) - min(r["started_at"] for r in timed)) / 60


def timing_line(runs: list[dict], seconds: float | None) -> str:
    span = protocol_span_minutes(runs)
    wall_total = sum(r.get("wall_s", 0) for r in runs) / 60
    cpu_total = sum(r.get("cpu_s", 0) for r in runs) / 60
    return (f"- runs: {len(runs)}; protocol wall time (first run's start to last run's end): "
            + (f"{span:.0f} min" if span is not None else "unknown (runs without timestamps)")
            + f"; {wall_total:.0f} min wall and {cpu_total:.0f} min CPU summed over the runs"
            + (f"; this invocation {seconds / 60:.0f} min" if seconds else ""))


def setup_lines(args, runs: list[dict]) -> list[str]:
    sample = next((r for r in runs if "sizes" in r), {})
    sizes, counts = sample.get("sizes", {}), sample.get("class_counts", {})
    test_counts = counts.get("test", [])
    majority = 100 * max(test_counts) / sum(test_counts) if test_counts else float("nan")
    model = ("Tiny BERT from a config (smoke test)" if args.smoke else
             "The real pretrained all-MiniLM-L6-v2 (22.7M parameters, `AutoModelForSequenceClassification`, new "
             "9-way head)")
    data = ("`DocstringClassificationDataModule(packages=['json', 'http'], cap_per_class=20)`" if args.smoke else
            f"`DocstringClassificationDataModule(cap_per_class=None, fractions={FRACTIONS}, batch_size={BATCH_SIZE}, "
            f"max_length={MAX_LENGTH})`")
    return [
        "## Setup",
        "",
        f"{model} on {data}: which standard-library package a docstring paragraph comes from, every distinct "
        f"paragraph of the packages split by a stable hash of its text: **{sizes.get('train', '?')} / "
        f"{sizes.get('validation', '?')} / {sizes.get('test', '?')} train / validation / test paragraphs**; test "
        f"paragraphs per class {test_counts} (majority-class rate {majority:.1f}%). Same budget for every method: "
        f"{args.steps} optimizer steps of {BATCH_SIZE if not args.smoke else 8} paragraphs, warm-up {args.warmup} "
        f"steps then cosine to 0, decoupled weight decay {WEIGHT_DECAY}, AdamW betas (0.9, 0.999); dropout 0.1 as "
        "in the model config.",
        "",
        f"LoRA: r={args.rank}, alpha={2 * args.rank} on query/key/value/dense (all 36 linear layers of the 6 blocks), "
        "classifier head trained fully (in LoRA-Pro's second param group, plain AdamW). rsLoRA: the same with "
        f"`LoRAConfig(rslora=True)`, scaling alpha/sqrt(r) = {2 * args.rank / math.sqrt(args.rank):.2f} instead of "
        f"alpha/r = 2. LoRA+: the same adapters, AdamW with every `lora_B` at {LORAPLUS_RATIO:g} x the learning rate "
        "of the `lora_A` matrices and the head (the reported lr). LoRA-Pre Adam: no adapters, every parameter "
        f"trained, rank {args.rank} factors for the 36 block matrices, `scale=1` (the paper's fine-tuning alpha), "
        "embeddings / norms / pooler / head on AdamW. The task is built exactly as the CLI builds it "
        "(`SequenceClassificationTask(...).configure_optimizers()`); the loop is plain PyTorch.",
        "",
        "Learning rates (same protocol for every method): a log-spaced grid of 3 peak learning rates per method, "
        "seed 0, full budget; chosen by final validation accuracy (ties: lower validation loss); where the best was "
        f"at an edge, up to {args.extend} more point(s) past it; then the chosen lr with seeds "
        f"{', '.join(map(str, args.seeds[1:]))}. Validation every {args.eval_every} steps; the test split once, "
        "with the final model.",
        "",
        "Statistics: the test accuracy of a method is the mean over its seeds and the test paragraphs. Its 95% "
        f"interval is a percentile bootstrap ({stats.BOOTSTRAP_RESAMPLES} resamples, RNG seed "
        f"{stats.BOOTSTRAP_SEED}): each resample draws the test paragraphs with replacement (one draw shared by "
        "every seed and method: they all saw the same paragraphs) and, per method, its seeds with replacement. "
        "A difference between two methods is bootstrapped the same way, paired on the paragraphs; it is "
        "**resolved** when its 95% interval excludes 0. The last column applies a Bonferroni correction over the "
        "comparisons listed (each at 1 - 0.05/k), so that all of them hold together at 95%.",
        "",
    ]


def results_lines(summary: list[dict], pairs: list[dict]) -> list[str]:
    return [
        "## Results",
        "",
        *report.markdown_table(summary, [
            ("method", "method"), ("lr", "chosen lr"), ("seeds", "seeds"), ("test_examples", "test examples"),
            ("test_acc_mean", "test acc %"), ("test_acc_ci", "95% CI"), ("test_acc_per_seed", "per seed"),
            ("test_loss_mean", "test loss"), ("trainable_M", "trainable M params"),
            ("state_MiB", "optimizer state MiB"), ("step_ms", "step ms (in-run median)"),
            ("run_wall_s", "run s (wall)"), ("run_cpu_s", "run s (CPU)"),
            ("lr_grid", "lr grid, seed 0: final val acc %")], digits=4),
        "",
        "### Differences (points of test accuracy, paired bootstrap)",
        "",
        *report.markdown_table(pairs, [
            ("comparison", "comparison (first - second)"), ("difference_text", "difference"), ("ci", "95% CI"),
            ("resolved", "resolved (95% CI excludes 0)"), ("resolved_bonferroni", "resolved, Bonferroni")], digits=3),
        "",
        f"![validation curves, lr grids and test intervals]({NAME}.png)",
        "",
        f"Per-run values: `{NAME}.csv`; method summary with intervals: `{NAME}_summary.csv`; every pair of methods: "
        f"`{NAME}_pairs.csv`; validation curves: `{NAME}_curves.csv`; per-example test predictions: the run JSON in "
        "the runs folder. In-run times include other processes' load; see `train_step_speed.md` for the controlled "
        "step timing.",
        "",
    ]


RUN_COLUMNS = ["method", "label", "lr", "seed", "rank", "steps", "test_examples", "final_val_acc", "final_val_loss",
               "final_test_acc", "final_test_loss", "best_val_step", "best_val_acc", "diverged", "trainable_params",
               "state_bytes", "peak_rss_mib", "rss_before_training_mib", "step_ms_median", "wall_s", "cpu_s",
               "load_average_at_start", "started_at", "finished_at", "error"]


def write_report(args, runs: list[dict], env: dict, seconds: float | None) -> list[dict]:
    summary, chosen = summarise(args, runs)
    of_interest, every_pair = comparisons(args, runs, chosen)
    csvs = {f"{NAME}.csv": runs, f"{NAME}_summary.csv": summary, f"{NAME}_pairs.csv": every_pair,
            f"{NAME}_curves.csv": [{"method": r["method"], "lr": r["lr"], "seed": r["seed"], **p} for r in runs
                                   for p in r.get("curve", [])]}
    report.write_result(args.out, NAME, "Fine-tuning quality: all-MiniLM-L6-v2 on the docstring task", env,
                        [*setup_lines(args, runs), *results_lines(summary, of_interest)], csvs,
                        {f"{NAME}.csv": RUN_COLUMNS}, header=[timing_line(runs, seconds)], smoke=args.smoke)
    plot(args, runs, chosen, summary, args.out / f"{NAME}.png")
    return summary


def main(argv=None) -> list[dict]:
    args = parse_args(argv)
    return sweep.sweep_main(__file__, argv, args, GRIDS, run_one, runner, score, write_report, summary_line)


def summary_line(row: dict) -> str:
    if row["test_acc_mean"] is None:
        return f"{row['method']:34s} lr {row['lr']:<7g} no finished run with test predictions"
    return (f"{row['method']:34s} lr {row['lr']:<7g} test acc {row['test_acc_mean']:.1f}% {row['test_acc_ci']} "
            f"({row['test_acc_per_seed']})")


if __name__ == "__main__":
    main()
