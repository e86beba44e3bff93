"""Pre-training quality: a small Llama on the embedded corpus, AdamW vs GaLore vs LoRA-Pre Adam / Muon.

The LoRA-Pre paper's main table at small scale. Every method trains the same Llama (hidden 128, MLP 352,
4 layers, 4 heads, tied 8192-token vocabulary, ~1.85M parameters) from the same initialisation (per seed) on the
same token blocks in the same order (``TextBlocksDataModule(source="python", block_size=128, batch_size=16,
max_vocab=8192)``: pydoc topics + standard-library docstrings, 4295 training / 213 validation blocks), for the
same number of steps with linear warm-up + cosine decay to 10% (``WarmupCosineLR``), no weight decay and no
gradient clipping. Validation loss is token-weighted over all validation blocks; perplexity is its exp.

Methods (``--rank`` r, default 32: the matrices are 128 x 128 and 128 x 352):
    adamw                  torch.optim.AdamW on every tensor
    galore                 GaLoreAdamW (galore-torch) rank r on the 28 block matrices, scale 0.25, projection
                           refreshed every --galore-gap steps; embeddings / norms AdamW in the same optimizer
    lora_pre_adam          LoRAPreAdamW rank r with its defaults (debiased second moment, update_bound="v_floor"),
                           scale 0.25 (GaLore's alpha, as the LoRA-Pre paper)
    lora_pre_adam_low      the same at rank r / 8
    lora_pre_muon          LoRAPreMuon rank r, scale_rule "adamw_rms" so one lr serves Muon and AdamW tensors
    lora_pre_adam_adam_floor, lora_pre_adam_rms_clip    the other update bounds (with the debiased second moment)
    lora_pre_adam_debias   the debiased second moment alone (update_bound="none")
    lora_pre_adam_paper, lora_pre_adam_low_paper   the paper's formula (debias_second_moment=False,
                           update_bound="none"), rank r and r / 8: the library's behaviour before 2026-11-30
    adamw_scaled           control row: AdamW with the block matrices' lr multiplied by --scale, i.e. GaLore's and
                           LoRA-Pre Adam's two learning rates with full-rank moments (separates the effect of
                           the low-rank momenta from that of the smaller step on the matrices)

Learning rates: each method's log-spaced grid on seed 0 with the full step budget, chosen by final validation
loss, extended past an edge when the best is at it (``--extend``), then the chosen one with the other seeds.
Each (method, lr, seed) runs in its own process; its JSON lands in ``--runs`` and is reused when present, so an
interrupted sweep resumes and ``--report-only`` rebuilds the CSV / markdown / PNG from the runs.

    python benchmarks/pretrain_quality.py                      # about 1 h on 2 idle CPU cores
    python benchmarks/pretrain_quality.py --report-only
    python benchmarks/pretrain_quality.py --smoke --out /tmp/bench   # seconds, tiny model, in-process
"""

from __future__ import annotations

import argparse
import inspect
import math
import statistics
import sys
import time
import warnings
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common  # noqa: E402

NAME = "pretrain_quality"
BETAS, EPS = (0.9, 0.999), 1e-8
LLAMA = dict(model_type="llama", vocab_size=8192, hidden_size=128, intermediate_size=352, num_hidden_layers=4,
             num_attention_heads=4, num_key_value_heads=4, max_position_embeddings=128, tie_word_embeddings=True)
SMOKE_LLAMA = dict(LLAMA, vocab_size=256, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                   num_attention_heads=2, num_key_value_heads=2, max_position_embeddings=32)
# Log-spaced grids around each method's usual range (x ~3.3 apart). GaLore and LoRA-Pre Adam scale their
# matrices' update by 0.25, so their usual lr is higher (GaLore's paper: 1e-2 with scale 0.25 vs AdamW 1e-3).
GRIDS = {
    "adamw": [1e-3, 3e-3, 1e-2],
    "galore": [3e-3, 1e-2, 3e-2],
    # One notch lower than the paper-literal rows' grid: with bounded steps their best lr was 3e-3 or below.
    "lora_pre_adam": [9e-4, 3e-3, 1e-2],
    "lora_pre_adam_low": [9e-4, 3e-3, 1e-2],
    "lora_pre_muon": [1e-3, 3e-3, 1e-2],
    "lora_pre_adam_debias": [3e-3, 1e-2, 3e-2],
    "lora_pre_adam_adam_floor": [9e-4, 3e-3, 1e-2],
    "lora_pre_adam_rms_clip": [9e-4, 3e-3, 1e-2],
    "lora_pre_adam_paper": [3e-3, 1e-2, 3e-2],
    "lora_pre_adam_low_paper": [3e-3, 1e-2, 3e-2],
    "adamw_scaled": [3e-3, 1e-2, 3e-2],
}
PAPER_METHODS = ["adamw", "galore", "lora_pre_adam", "lora_pre_adam_low", "lora_pre_muon"]
# LoRA-Pre Adam's options against its default (the bound candidates of the 2026-11-30 amendment, the paper's formula)
EXTRA_METHODS = ["lora_pre_adam_adam_floor", "lora_pre_adam_rms_clip", "lora_pre_adam_debias", "lora_pre_adam_paper",
                 "lora_pre_adam_low_paper"]
#: LoRAPreAdamW options of each LoRA-Pre Adam method besides rank and scale ({}: the library's defaults).
LORA_PRE_ADAM_OPTIONS = {
    "lora_pre_adam": {},
    "lora_pre_adam_low": {},
    "lora_pre_adam_adam_floor": {"update_bound": "adam_floor"},
    "lora_pre_adam_rms_clip": {"update_bound": "rms_clip"},
    "lora_pre_adam_debias": {"update_bound": "none"},
    "lora_pre_adam_paper": {"debias_second_moment": False, "update_bound": "none"},
    "lora_pre_adam_low_paper": {"debias_second_moment": False, "update_bound": "none"},
}
CONTROL_METHODS = ["adamw_scaled"]  # AdamW's memory and step time: left out of memory.py and train_step_speed.py


def cost_methods() -> list[str]:
    """The methods whose optimizer state or step differ (memory.py, train_step_speed.py): the paper's rows and the
    paper formula's step (no floor); the other LoRA-Pre Adam options cost what the default costs."""
    return [m for m in PAPER_METHODS + ["lora_pre_adam_paper"] if m != "galore" or common.galore_available()]


def default_methods(controls: bool = True) -> list[str]:
    methods = PAPER_METHODS + EXTRA_METHODS + (CONTROL_METHODS if controls else [])
    return [m for m in methods if m != "galore" or common.galore_available()]


def label(method: str, rank: int) -> str:
    return {
        "adamw": "AdamW",
        "galore": f"GaLore r={rank}",
        "lora_pre_adam": f"LoRA-Pre Adam r={rank} (default: debiased, v_floor)",
        "lora_pre_adam_low": f"LoRA-Pre Adam r={max(1, rank // 8)} (default)",
        "lora_pre_muon": f"LoRA-Pre Muon r={rank}",
        "lora_pre_adam_adam_floor": f"LoRA-Pre Adam r={rank}, debiased, adam_floor",
        "lora_pre_adam_rms_clip": f"LoRA-Pre Adam r={rank}, debiased, rms_clip",
        "lora_pre_adam_debias": f"LoRA-Pre Adam r={rank}, debiased, no bound",
        "lora_pre_adam_paper": f"LoRA-Pre Adam r={rank}, paper-literal (unsafe)",
        "lora_pre_adam_low_paper": f"LoRA-Pre Adam r={max(1, rank // 8)}, paper-literal (unsafe)",
        "adamw_scaled": "AdamW, block matrices at lr x scale (control)",
    }[method]


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], epilog=__doc__.split("\n\n", 1)[1],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    common.add_sweep_arguments(parser, NAME, GRIDS)
    parser.set_defaults(methods=default_methods())  # GaLore only when galore-torch is installed
    parser.add_argument("--steps", type=int, default=256, help="optimizer steps (268 = one pass over the blocks)")
    parser.add_argument("--warmup", type=int, default=25, help="linear warm-up steps")
    parser.add_argument("--eval-every", type=int, default=32, help="steps between validation passes")
    parser.add_argument("--rank", type=int, default=32, help="rank r (GaLore, LoRA-Pre); the low-rank row uses r/8")
    parser.add_argument("--galore-gap", type=int, default=50, help="GaLore's update_proj_gap (steps)")
    parser.add_argument("--scale", type=float, default=0.25, help="GaLore / LoRA-Pre Adam update scale (alpha)")
    parser.add_argument("--smoke", action="store_true", help="tiny model and data, 6 steps, in-process")
    args = parser.parse_args(argv)
    if args.smoke:
        args.steps, args.warmup, args.eval_every, args.rank, args.seeds = 6, 2, 3, 8, [0, 1]
        args.extend, args.in_process, args.wait_load = 0, True, 0.0
        args.lrs = args.lrs or [1e-2]
    args.runs = args.runs or args.out / f"{NAME}_runs"
    return args


# ------------------------------------------------------------------------------------------------ one run
def data_module(smoke: bool, seed: int):
    from lit_lowrank.data import TextBlocksDataModule

    if smoke:  # one standard-library source file: ~30k tokens, no corpus build
        import argparse as some_module

        return TextBlocksDataModule(source=inspect.getfile(some_module), block_size=32, batch_size=4,
                                    max_vocab=SMOKE_LLAMA["vocab_size"], max_val_blocks=8, seed=seed)
    return TextBlocksDataModule(source="python", block_size=128, batch_size=16, max_vocab=LLAMA["vocab_size"],
                                seed=seed)


def build_model(smoke: bool, seed: int):
    import torch

    from lit_lowrank.backbones import transformers_backbone

    torch.manual_seed(seed)
    return transformers_backbone(config=SMOKE_LLAMA if smoke else LLAMA, tokenizer=False).model.train()


def make_optimizer(method: str, model, lr: float, rank: int, scale: float, galore_gap: int):
    import torch

    from lit_lowrank.optim import LoRAPreAdamW, LoRAPreMuon, lowrank_param_groups

    if method == "adamw":
        return torch.optim.AdamW(model.parameters(), lr=lr, betas=BETAS, eps=EPS, weight_decay=0.0)
    if method == "adamw_scaled":
        matrices, others = lowrank_param_groups(model, rank=rank)
        groups = [{"params": matrices["params"], "lr": lr * scale}, {"params": others["params"]}]
        return torch.optim.AdamW(groups, lr=lr, betas=BETAS, eps=EPS, weight_decay=0.0)
    if method == "galore":
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            from galore_torch import GaLoreAdamW
        matrices, others = lowrank_param_groups(model, rank=rank)
        groups = [{"params": matrices["params"], "rank": rank, "update_proj_gap": galore_gap, "scale": scale,
                   "proj_type": "std"}, {"params": others["params"]}]
        return GaLoreAdamW(groups, lr=lr, betas=BETAS, eps=EPS, weight_decay=0.0, no_deprecation_warning=True)
    if method == "lora_pre_muon":
        return LoRAPreMuon(model, lr=lr, rank=rank, adamw_lr=lr, adamw_betas=BETAS, adamw_eps=EPS,
                           scale_rule="adamw_rms")
    return LoRAPreAdamW(model, lr=lr, betas=BETAS, eps=EPS, weight_decay=0.0, scale=scale,
                        rank=max(1, rank // 8) if method.startswith("lora_pre_adam_low") else rank,
                        **LORA_PRE_ADAM_OPTIONS[method])


def optimizer_state_bytes(optimizer) -> int:
    """``state_bytes()`` where the optimizer has it; else the bytes of its state tensors, GaLore's projection
    matrices included (torch's 0-d ``step`` tensors left out, as LoRA-Pre's Python-int steps are)."""
    import torch

    if hasattr(optimizer, "state_bytes"):
        return int(optimizer.state_bytes().total)
    total = 0
    for state in optimizer.state.values():
        for key, value in state.items():
            if key == "projector" and getattr(value, "ortho_matrix", None) is not None:
                total += value.ortho_matrix.nbytes
            elif isinstance(value, torch.Tensor) and value.dim() > 0:
                total += value.nbytes
    return total


def train_batches(dm):
    epoch = 0
    while True:
        loader = dm.train_dataloader()
        loader.sampler.set_epoch(epoch)
        yield from loader
        epoch += 1


def evaluate(model, loader) -> float:
    """Token-weighted mean next-token loss (as CausalLMTask's val/loss)."""
    import torch

    model.eval()
    total, count = 0.0, 0
    with torch.no_grad():
        for batch in loader:
            tokens = int((batch["labels"][:, 1:] != -100).sum())
            total += float(model(input_ids=batch["input_ids"], labels=batch["labels"]).loss) * tokens
            count += tokens
    model.train()
    return total / count


def run_one(spec: dict) -> dict:
    import torch

    from lit_lowrank.optim import WarmupCosineLR

    torch.set_num_threads(spec["threads"])
    started, cpu_started = time.perf_counter(), common.cpu_seconds()
    dm = data_module(spec["smoke"], spec["seed"])
    dm.setup("fit")
    model = build_model(spec["smoke"], spec["seed"])
    optimizer = make_optimizer(spec["method"], model, spec["lr"], spec["rank"], spec["scale"], spec["galore_gap"])
    scheduler = WarmupCosineLR(optimizer, warmup_steps=spec["warmup"], total_steps=spec["steps"], min_ratio=0.1)
    rss_before = common.peak_rss_mib()
    val_loader = dm.val_dataloader()
    curve = [{"step": 0, "val_loss": evaluate(model, val_loader), "train_loss": None}]
    batches, window, step_times, diverged = train_batches(dm), [], [], False
    for step in range(1, spec["steps"] + 1):
        batch = next(batches)
        start = time.perf_counter()
        optimizer.zero_grad(set_to_none=True)
        loss = model(input_ids=batch["input_ids"], labels=batch["labels"]).loss
        loss.backward()
        optimizer.step()
        scheduler.step()
        step_times.append(time.perf_counter() - start)
        window.append(loss.detach().item())
        if not math.isfinite(window[-1]):
            diverged = True
            break
        if step % spec["eval_every"] == 0 or step == spec["steps"]:
            curve.append({"step": step, "val_loss": evaluate(model, val_loader), "train_loss": common.mean(window)})
            window = []
    final = curve[-1]["val_loss"] if not diverged else float("inf")
    diverged = diverged or not math.isfinite(final)
    return {
        **{k: spec[k] for k in ("method", "lr", "seed", "steps", "rank")},
        "label": label(spec["method"], spec["rank"]),
        "final_val_loss": final if not diverged else float("inf"),
        "final_val_ppl": math.exp(min(final, 50.0)) if not diverged else float("inf"),
        "diverged": diverged,
        "curve": curve,
        "state_bytes": optimizer_state_bytes(optimizer),
        "peak_rss_mib": common.peak_rss_mib(),
        "rss_before_training_mib": rss_before,
        "step_ms_median": 1e3 * statistics.median(step_times),
        "wall_s": time.perf_counter() - started,
        "cpu_s": common.cpu_seconds() - cpu_started,
        "train_blocks": int(dm.train_blocks.shape[0]),
        "val_blocks": int(dm.val_blocks.shape[0]),
    }


# ----------------------------------------------------------------------------------------- sweep, report
def score(result: dict) -> float:
    loss = result.get("final_val_loss", float("inf"))
    return loss if loss == loss and not result.get("diverged") else float("inf")  # NaN -> inf


def describe(result: dict) -> str:
    if "error" in result:
        return "FAILED: " + result["error"][-500:]
    return f"val loss {result['final_val_loss']:.4f} ppl {result['final_val_ppl']:.2f} ({result.get('wall_s', 0):.0f} s)"


def runner(args):
    base = dict(steps=args.steps, warmup=args.warmup, eval_every=args.eval_every, rank=args.rank, scale=args.scale,
                galore_gap=args.galore_gap, threads=args.threads, smoke=args.smoke)
    return common.make_runner(Path(__file__).resolve(), args.runs, base, run_one, describe, args.in_process,
                              args.wait_load)


def summarise(args, runs: list[dict]) -> tuple[list[dict], list[dict], dict]:
    chosen = common.choose(runs, score, args.seeds[0])
    summary = []
    for method in [m for m in args.methods if m in chosen]:
        lr = chosen[method]
        final = sorted((r for r in runs if r["method"] == method and r["lr"] == lr and r["seed"] in args.seeds),
                       key=lambda r: r["seed"])
        losses = [r["final_val_loss"] for r in final]
        grid = sorted((r["lr"], r["final_val_loss"]) for r in runs if r["method"] == method and r["seed"] == args.seeds[0])
        summary.append({
            "method": label(method, args.rank),
            "key": method,
            "lr": lr,
            "seeds": len(final),
            "val_loss_mean": common.mean(losses),
            "val_loss_std": common.std(losses),
            "val_ppl_mean": common.mean([math.exp(min(x, 50)) for x in losses]),
            "val_ppl_per_seed": " / ".join(f"{math.exp(min(x, 50)):.2f}" for x in losses),
            "lr_grid": ", ".join(f"{g:g}: {v:.3f}" for g, v in grid),
            "state_MiB": final[0].get("state_bytes", 0) / 2**20 if final else None,
            "peak_rss_MiB": common.mean([r["peak_rss_mib"] for r in final if "peak_rss_mib" in r]),
            "step_ms": common.mean([r["step_ms_median"] for r in final if "step_ms_median" in r]),
        })
    rows = [{k: v for k, v in run.items() if k != "curve"} for run in runs]
    return summary, rows, chosen


def plot(args, runs: list[dict], chosen: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, (curves, grid_ax) = plt.subplots(1, 2, figsize=(13, 5), gridspec_kw={"width_ratios": [3, 2]})
    colors = plt.get_cmap("tab10")
    for index, method in enumerate(m for m in args.methods if m in chosen):
        color = colors(index)
        chosen_runs = [r for r in runs if r["method"] == method and r["lr"] == chosen[method] and r.get("curve")]
        for run in chosen_runs:
            curves.plot([p["step"] for p in run["curve"]], [math.exp(min(p["val_loss"], 20)) for p in run["curve"]],
                        color=color, alpha=0.25, linewidth=1)
        lengths = {len(r["curve"]) for r in chosen_runs}
        if chosen_runs and len(lengths) == 1:
            steps = [p["step"] for p in chosen_runs[0]["curve"]]
            mean_loss = [common.mean([r["curve"][i]["val_loss"] for r in chosen_runs]) for i in range(len(steps))]
            curves.plot(steps, [math.exp(min(v, 20)) for v in mean_loss], color=color, linewidth=2,
                        label=f"{label(method, args.rank)} (lr {chosen[method]:g}, {len(chosen_runs)} seeds)")
        sweep_runs = sorted((r["lr"], r["final_val_loss"]) for r in runs if r["method"] == method and r["seed"] == args.seeds[0])
        grid_ax.plot([lr for lr, _ in sweep_runs], [min(v, 20) for _, v in sweep_runs], "o-",
                     color=color, label=label(method, args.rank))
    curves.set_yscale("log")
    curves.set_xlabel("optimizer step")
    curves.set_ylabel("validation perplexity (log scale)")
    curves.set_title("Validation perplexity, chosen lr: mean over seeds (bold), each seed (faint)")
    curves.legend(fontsize=8)
    curves.grid(True, which="both", alpha=0.3)
    finals = [r["final_val_loss"] for r in runs if math.isfinite(r.get("final_val_loss", float("inf")))]
    if finals:
        curves.set_ylim(math.exp(min(finals)) * 0.9, math.exp(max(p["val_loss"] for r in runs for p in r.get("curve", [])[:1])) * 1.1)
        grid_ax.set_ylim(min(finals) - 0.05, min(max(finals), min(finals) + 1.5) + 0.05)
    grid_ax.set_xscale("log")
    grid_ax.set_xlabel("peak learning rate")
    grid_ax.set_ylabel("final validation loss (seed 0)")
    grid_ax.set_title("Learning-rate grid (seed 0)")
    grid_ax.grid(True, which="both", alpha=0.3)
    grid_ax.legend(fontsize=7)
    figure.tight_layout()
    figure.savefig(path, dpi=110)
    plt.close(figure)


def write_report(args, runs: list[dict], env: dict, seconds: float | None) -> list[dict]:
    summary, rows, chosen = summarise(args, runs)
    args.out.mkdir(parents=True, exist_ok=True)
    common.write_csv(args.out / f"{NAME}.csv", rows,
                     ["method", "label", "lr", "seed", "steps", "rank", "final_val_loss", "final_val_ppl", "diverged",
                      "state_bytes", "peak_rss_mib", "rss_before_training_mib", "step_ms_median", "wall_s", "cpu_s",
                      "load_average_at_start", "error"])
    common.write_csv(args.out / f"{NAME}_curves.csv",
                     [{"method": r["method"], "lr": r["lr"], "seed": r["seed"], **point}
                      for r in runs for point in r.get("curve", [])])
    plot(args, runs, chosen, args.out / f"{NAME}.png")
    cpu_total = sum(r.get("cpu_s", 0) for r in runs) / 60
    wall_total = sum(r.get("wall_s", 0) for r in runs) / 60
    first = next((r for r in runs if "train_blocks" in r), {})
    lines = [
        "# Pre-training quality: small Llama on the embedded corpus",
        "",
        *common.environment_lines(env),
        f"- runs: {len(runs)} ({wall_total:.0f} min wall, {cpu_total:.0f} min CPU in the runs"
        + (f"; this invocation {seconds / 60:.0f} min" if seconds else "") + ")",
        "",
        "## Setup",
        "",
        f"Llama {'(smoke sizes) ' if args.smoke else ''}hidden {LLAMA['hidden_size']}, MLP {LLAMA['intermediate_size']}, "
        f"{LLAMA['num_hidden_layers']} layers, {LLAMA['num_attention_heads']} heads, vocabulary {LLAMA['vocab_size']} "
        "(tied), trained from scratch on `TextBlocksDataModule(source=\"python\", block_size=128, batch_size=16, "
        f"max_vocab=8192)`: {first.get('train_blocks', '?')} training / {first.get('val_blocks', '?')} validation "
        f"blocks. {args.steps} steps ({args.steps * 16 * 128 / 1e3:.0f}k tokens, about one pass), linear warm-up "
        f"{args.warmup} steps then cosine to 10% (`WarmupCosineLR`), no weight decay, no clipping; Adam betas "
        f"{BETAS}, eps {EPS:g} for every Adam-type method. Same initialisation and data order per seed for every "
        "method. Validation: token-weighted loss over all validation blocks every "
        f"{args.eval_every} steps; perplexity = exp(loss).",
        "",
        f"Low-rank methods factor or project the 28 block matrices (q/k/v/o 128x128, gate/up 352x128, down 128x352); "
        f"embedding (= tied head) and norms stay on AdamW inside the same optimizer. GaLore: galore-torch "
        f"{env.get('galore-torch', '')} `GaLoreAdamW`, rank {args.rank}, `proj_type=\"std\"`, `scale={args.scale}`, "
        f"`update_proj_gap={args.galore_gap}` (GaLore's paper: 200 over 10k+ steps; with {args.steps} steps 200 would "
        f"mean one refresh, so it is scaled down to {args.steps // args.galore_gap + 1} subspaces per run). LoRA-Pre Adam: "
        f"`scale={args.scale}` (the paper's pre-training alpha). LoRA-Pre Muon: momentum 0.95 Nesterov, "
        "`scale_rule=\"adamw_rms\"` (update RMS ~0.2 like AdamW's), so one lr serves its Muon matrices and its AdamW "
        "tensors.",
        "",
        "Learning-rate tuning (same protocol for every method): a log-spaced grid of 3 peak learning rates per method "
        "around its usual range, seed 0, full step budget; chosen by final validation loss; where the best was at an "
        f"edge of the grid, up to {args.extend} more point(s) past that edge; then the chosen lr with seeds "
        f"{', '.join(map(str, args.seeds[1:]))}. The grid and its losses are in the last column.",
        "",
        "## Results",
        "",
        *common.markdown_table(summary, [
            ("method", "method"), ("lr", "chosen lr"), ("seeds", "seeds"), ("val_loss_mean", "val loss (mean)"),
            ("val_loss_std", "std"), ("val_ppl_mean", "val ppl (mean)"), ("val_ppl_per_seed", "val ppl per seed"),
            ("state_MiB", "optimizer state MiB"), ("step_ms", "step ms (in-run median)"),
            ("lr_grid", "lr grid, seed 0: final val loss")]),
        "",
        f"![validation curves]({NAME}.png)",
        "",
        "Per-run values (every lr and seed): `pretrain_quality.csv`; curves: `pretrain_quality_curves.csv`. "
        "The step times above are measured inside the quality runs (other processes may have shared the CPU); "
        "`train_step_speed.md` has the controlled timing.",
        "",
    ]
    common.write_markdown(args.out, NAME, lines, args.smoke)
    return summary


def main(argv=None) -> list[dict]:
    args = parse_args(argv)
    return common.sweep_main(__file__, argv, args, GRIDS, run_one, runner, score, write_report,
                             lambda row: f"{row['method']:55s} lr {row['lr']:<7g} val ppl {row['val_ppl_mean']:.2f} ({row['val_ppl_per_seed']})")


if __name__ == "__main__":
    main()
