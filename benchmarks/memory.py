"""Memory per method: exact optimizer-state bytes and peak process memory, for the two quality settings and
for Llama-60M..1B shapes.

1. ``runs``: every method of ``pretrain_quality.py`` (its paper rows and its references: full-rank Muon, APOLLO,
   APOLLO-Mini, Adam-mini) and ``finetune_quality.py`` (same model, data and optimizer builders), each in a fresh
   process that builds the data, the model and the optimizer and takes ``--steps`` training steps. Reported: the
   optimizer's state bytes (``state_bytes()`` where the optimizer has it, else every state tensor it holds after
   those steps, GaLore's and APOLLO's projection matrices included), parameter and gradient bytes, and peak memory:
   ``ru_maxrss`` on CPU (the whole process: interpreter, libraries, data, model, activations, state), also shown
   above the process's resident size right after the imports; on CUDA ``torch.cuda.max_memory_allocated``.
2. ``llama``: optimizer state of GaLore's Llama configurations (60M / 130M / 350M / 1B: hidden 512 / 768 / 1024 /
   2048, MLP 1376 / 2048 / 2736 / 5461, 8 / 12 / 24 / 24 layers, 8 / 12 / 16 / 32 heads, vocabulary 32000, untied
   head), built on the meta device: parameters have shapes but no storage. AdamW, GaLore (its paper's ranks 128 /
   256 / 256 / 512), LoRA-Pre Adam and LoRA-Pre Muon (``--ranks``, default 16 and 128) are built on the same split
   (``lowrank_param_groups``: the 7 projection matrices of each block low-rank, embeddings / head / norms AdamW),
   every parameter gets a meta gradient, and one real ``optimizer.step()`` runs on the meta device. The bytes are
   then read from the optimizer's own state (``nbytes`` of the state tensors; GaLore keeps its projection matrix
   inside a projector object in the state, which is counted too; torch.optim.AdamW's 4-byte ``step`` scalars are
   left out) and compared with the formulas, per p x q matrix of the low-rank group:

       AdamW 2 p q    GaLore r min(p, q) + 2 r max(p, q)    LoRA-Pre Adam 2 (p + q) r    LoRA-Pre Muon (p + q) r

   (float32 elements), plus 2 p q for every other tensor (AdamW moments in all four). Then LoRA r=8 on all linear
   layers of the blocks: plain LoRA + AdamW, LoRA-Pro efficient (both 2 (m + n) r per adapted layer) and LoRA-Pro
   full (2 m n per adapted layer: fp32 Adam moments of the m x n equivalent gradient, i.e. the same as full
   fine-tuning's AdamW for those matrices). The script exits 1 when a measured state differs from its formula.

Results, under ``--out`` (default ``benchmarks/results/``), all from one invocation:

    python benchmarks/memory.py                 # memory.md (both sections), memory_runs.csv, memory.png and
                                                # memory_llama.csv: about 12 min on 2 CPU cores
    python benchmarks/memory.py --sections llama --out /tmp/llama   # the Llama table alone (a minute or two)
    python benchmarks/memory.py --smoke --out /tmp/bench

``--sections`` writes the sections named only, and ``memory.md`` with only them: rebuild the results folder with
both. The Llama table's AdamW, GaLore and LoRA-Pre rows were ``lora_pre_memory.py``'s table
(``lora_pre_memory.csv`` / ``.md``) before that script became this section.
"""

from __future__ import annotations

import argparse
import importlib
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import environment  # noqa: E402
import report  # noqa: E402
import sweep  # noqa: E402

NAME = "memory"
MiB = 2**20
LORA_RANK = 8
LORA_METHODS = ("LoRA + AdamW", "LoRA-Pro efficient", "LoRA-Pro full")
# GaLore's configs/llama_*.json: hidden, intermediate, layers, heads; vocabulary 32000.
LLAMA_CONFIGS = {
    "60M": (512, 1376, 8, 8),
    "130M": (768, 2048, 12, 12),
    "350M": (1024, 2736, 24, 16),
    "1B": (2048, 5461, 24, 32),
}
GALORE_RANKS = {"60M": 128, "130M": 256, "350M": 256, "1B": 512}  # GaLore paper, pre-training table


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], epilog=__doc__.split("\n\n", 1)[1],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sections", nargs="+", default=["runs", "llama"], choices=["runs", "llama"])
    parser.add_argument("--steps", type=int, default=3, help="training steps per measured run")
    parser.add_argument("--device", default="cpu", help="cpu, or cuda (peak = torch.cuda.max_memory_allocated)")
    parser.add_argument("--threads", type=int, default=2, help="torch.set_num_threads in each run")
    parser.add_argument("--models", nargs="+", default=list(LLAMA_CONFIGS), choices=list(LLAMA_CONFIGS),
                        help="Llama shapes")
    parser.add_argument("--ranks", type=int, nargs="+", default=[16, 128], help="LoRA-Pre ranks of the Llama table")
    parser.add_argument("--smoke", action="store_true",
                        help="smoke sizes, one step, in-process; Llama 60M only, LoRA-Pre rank 16")
    parser.add_argument("--out", type=Path, default=environment.RESULTS, help="folder for CSV, markdown and PNG")
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    parser.add_argument("--result", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.smoke:
        args.steps, args.models, args.ranks = 1, ["60M"], [16]
    return args


# --------------------------------------------------------------------------------------- 1. the quality runs
def settings(smoke: bool) -> dict[str, list[str]]:
    import finetune_quality
    import pretrain_quality

    return {"pretrain": pretrain_quality.cost_methods(references=True), "finetune": finetune_quality.cost_methods()}


def measure_one(spec: dict) -> dict:
    """Build data, model and optimizer as the quality benchmark does, take a few steps, read the memory."""
    import warnings

    import finetune_quality
    import pretrain_quality
    import torch
    import transformers

    from lit_lowrank import data, optim, tasks  # noqa: F401 - every import before the baseline reading

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for package in ("galore_torch", "apollo_torch", "adam_mini"):  # the same imports in every run's baseline
            try:
                importlib.import_module(package)
            except ImportError:
                pass
    transformers.LlamaForCausalLM, transformers.BertForSequenceClassification  # noqa: B018 - resolve lazy imports
    rss_imports = environment.peak_rss_mib()
    torch.set_num_threads(spec["threads"])
    device = torch.device(spec["device"])
    smoke, method = spec["smoke"], spec["method"]
    if spec["setting"] == "pretrain":
        dm = pretrain_quality.data_module(smoke, 0)
        dm.setup("fit")
        model = pretrain_quality.build_model(smoke, 0).to(device)
        rank = 8 if smoke else 32
        optimizer = pretrain_quality.make_optimizer(method, model, 1e-3, rank, 0.25, 50)
        label = pretrain_quality.label(method, rank)
        state_bytes = pretrain_quality.optimizer_state_bytes

        def loss_of(batch):
            return model(input_ids=batch["input_ids"], labels=batch["labels"]).loss
    else:
        dm = finetune_quality.data_module(smoke, 0)
        dm.setup("fit")
        rank = 2 if smoke else 8
        task, optimizer, _ = finetune_quality.build_task(method, 1e-4, 0, rank, 80, 8, smoke)
        model = task.model.to(device)
        label = finetune_quality.label(method, rank)
        state_bytes = finetune_quality.optimizer_state_bytes

        def loss_of(batch):
            return model(**batch).loss
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    rss_built = environment.peak_rss_mib()
    loader = iter(dm.train_dataloader())
    for _ in range(spec["steps"]):
        batch = {k: v.to(device) for k, v in next(loader).items()}
        optimizer.zero_grad(set_to_none=True)
        loss_of(batch).backward()
        optimizer.step()
    params = list(model.parameters())
    trainable = [p for p in params if p.requires_grad]
    return {
        "setting": spec["setting"],
        "method": method,
        "label": label,
        "params_MiB": sum(p.nbytes for p in params) / MiB,
        "trainable_MiB": sum(p.nbytes for p in trainable) / MiB,
        "state_MiB": state_bytes(optimizer) / MiB,
        "state_vs_trainable": state_bytes(optimizer) / max(1, sum(p.nbytes for p in trainable)),
        "peak_rss_MiB": environment.peak_rss_mib(),
        "rss_after_imports_MiB": rss_imports,
        "rss_after_build_MiB": rss_built,
        "peak_above_imports_MiB": environment.peak_rss_mib() - rss_imports,
        "cuda_peak_MiB": torch.cuda.max_memory_allocated(device) / MiB if device.type == "cuda" else None,
        "steps": spec["steps"],
        "device": spec["device"],
    }


def measure_runs(args) -> list[dict]:
    rows = []
    script = Path(__file__).resolve()
    for setting, methods in settings(args.smoke).items():
        for method in methods:
            spec = dict(setting=setting, method=method, steps=args.steps, device=args.device, threads=args.threads,
                        smoke=args.smoke)
            if args.smoke:
                row = measure_one(spec)
            else:
                scratch = args.out / f".{NAME}_{setting}_{method}.json"
                row = sweep.run_worker(script, spec, scratch)
                scratch.unlink(missing_ok=True)
                if "error" in row:
                    raise RuntimeError(f"{setting} {method}: {row['error']}")
            rows.append(row)
            print(f"{setting:9s} {row['label']:55s} state {row['state_MiB']:8.2f} MiB  "
                  f"peak {row['peak_rss_MiB']:8.1f} MiB", flush=True)
    for setting in ("pretrain", "finetune"):
        same = [row for row in rows if row["setting"] == setting]
        base = same[0]
        for row in same:
            row["state_vs_baseline"] = row["state_MiB"] / base["state_MiB"] if base["state_MiB"] else None
            row["peak_above_imports_vs_baseline"] = (row["peak_above_imports_MiB"] / base["peak_above_imports_MiB"]
                                                     if base["peak_above_imports_MiB"] > 0 else None)
    return rows


# ------------------------------------------------------------------------------------------ 2. Llama shapes
def meta_llama(name: str):
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    hidden, intermediate, layers, heads = LLAMA_CONFIGS[name]
    config = LlamaConfig(
        hidden_size=hidden,
        intermediate_size=intermediate,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        num_key_value_heads=heads,
        vocab_size=32000,
        max_position_embeddings=1024,
        tie_word_embeddings=False,
    )
    with torch.device("meta"):
        model = LlamaForCausalLM(config)
    for param in model.parameters():
        param.grad = torch.empty_like(param)
    return model


def formula_bytes(method: str, groups: list[dict], rank: int) -> tuple[int, int]:
    """(low-rank group, other tensors) state bytes by the formulas, float32."""
    lowrank = sum(
        {
            "AdamW": lambda p, q: 2 * p * q,
            "GaLore": lambda p, q: rank * min(p, q) + 2 * rank * max(p, q),
            "LoRA-Pre Adam": lambda p, q: 2 * (p + q) * rank,
            "LoRA-Pre Muon": lambda p, q: (p + q) * rank,
        }[method](*param.shape)
        for param in groups[0]["params"]
    )
    others = sum(2 * param.numel() for param in groups[1]["params"])
    return 4 * lowrank, 4 * others


def measured_bytes(optimizer, groups: list[dict]) -> tuple[int, int]:
    """(low-rank group, other tensors) bytes of the optimizer's state tensors after its step."""
    import torch

    def state_tensors(param):
        for key, value in optimizer.state[param].items():
            if key == "projector":  # GaLore's projection matrix lives in this object
                yield value.ortho_matrix
            elif isinstance(value, torch.Tensor) and key != "step":
                yield value

    return tuple(sum(t.nbytes for p in group["params"] for t in state_tensors(p)) for group in groups)


def llama_optimizer(method: str, model, rank: int, galore_rank: int):
    """The optimizer of ``method`` on ``lowrank_param_groups(model)``, and those groups."""
    import torch

    from lit_lowrank.optim import LoRAPreAdamW, LoRAPreMuon, lowrank_param_groups

    groups = lowrank_param_groups(model, rank=rank)
    if method == "AdamW":
        return torch.optim.AdamW([{"params": g["params"]} for g in groups], foreach=False), groups
    if method == "GaLore":
        from galore_torch import GaLoreAdamW

        galore_groups = [
            {
                "params": groups[0]["params"],
                "rank": galore_rank,
                "update_proj_gap": 200,
                "scale": 0.25,
                "proj_type": "std",
            },
            {"params": groups[1]["params"]},
        ]
        return GaLoreAdamW(galore_groups, no_deprecation_warning=True), groups
    optimizer_class = LoRAPreAdamW if method == "LoRA-Pre Adam" else LoRAPreMuon
    return optimizer_class(groups, rank=rank), groups


def optimizer_rows(model_name: str, ranks: list[int]) -> list[dict]:
    """AdamW, GaLore (where installed) and LoRA-Pre Adam / Muon at each of ``ranks`` on one Llama shape."""
    model = meta_llama(model_name)
    methods = [("AdamW", None)] + ([("GaLore", None)] if sweep.galore_available() else [])
    methods += [(name, rank) for rank in ranks for name in ("LoRA-Pre Adam", "LoRA-Pre Muon")]
    rows, adamw = [], None
    for method, rank in methods:
        rank = GALORE_RANKS[model_name] if method == "GaLore" else rank
        optimizer, groups = llama_optimizer(method, model, rank or 16, GALORE_RANKS[model_name])
        optimizer.step()
        measured, expected = measured_bytes(optimizer, groups), formula_bytes(method, groups, rank or 0)
        adamw = adamw or measured
        rows.append(
            {
                "model": model_name,
                "method": method,
                "rank": rank or "",
                "lowrank_matrices": len(groups[0]["params"]),
                "lowrank_state_MiB": round(measured[0] / MiB, 2),
                "other_state_MiB": round(measured[1] / MiB, 2),
                "total_MiB": round(sum(measured) / MiB, 2),
                "formula_total_MiB": round(sum(expected) / MiB, 2),
                "matches_formula": measured == expected,
                "total_vs_AdamW": round(sum(measured) / sum(adamw), 3),
                "lowrank_vs_AdamW": round(measured[0] / adamw[0], 4),
            }
        )
    return rows


def lora_rows(model_name: str, adamw_bytes: tuple[int, int]) -> list[dict]:
    """LoRA r=8 on every linear layer of the blocks (meta device): state after one real ``step()``."""
    import torch

    from lit_lowrank import LoRAConfig, inject_lora
    from lit_lowrank.adapters import lora_modules
    from lit_lowrank.optim import LoRAPro

    model = meta_llama(model_name)
    for param in model.parameters():
        param.grad = None
    with torch.device("meta"):
        inject_lora(model, LoRAConfig(r=LORA_RANK, alpha=2 * LORA_RANK, target_modules="all-linear"))
    adapters = [module for _, module in lora_modules(model)]
    for param in model.parameters():
        if param.requires_grad:
            param.grad = torch.empty_like(param)
    rows = []
    for method in LORA_METHODS:
        if method == "LoRA + AdamW":
            optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], foreach=False)
        else:
            optimizer = LoRAPro(model, mode="full" if method.endswith("full") else "efficient")
        optimizer.step()
        measured = sum(v.nbytes for state in optimizer.state.values() for v in state.values()
                       if isinstance(v, torch.Tensor) and v.dim() > 0)
        shapes = [(m.lora_B.shape[0], m.lora_A.shape[1]) for m in adapters]  # W0 is m x n
        per_layer = (lambda p, q: 2 * p * q) if method.endswith("full") else (lambda p, q: 2 * (p + q) * LORA_RANK)
        formula = 4 * sum(per_layer(p, q) for p, q in shapes)
        rows.append({
            "model": model_name,
            "method": method,
            "rank": LORA_RANK,
            "lowrank_matrices": len(adapters),
            "lowrank_state_MiB": round(measured / MiB, 2),
            "other_state_MiB": 0.0,
            "total_MiB": round(measured / MiB, 2),
            "formula_total_MiB": round(formula / MiB, 2),
            "matches_formula": measured == formula,
            "total_vs_AdamW": round(measured / sum(adamw_bytes), 3),
            "lowrank_vs_AdamW": round(measured / adamw_bytes[0], 4),
        })
        optimizer.state.clear()
    return rows


def llama_table(args) -> list[dict]:
    rows = []
    for model_name in args.models:
        rows += optimizer_rows(model_name, args.ranks)
        adamw = next(r for r in rows if r["model"] == model_name and r["method"] == "AdamW")
        adamw_bytes = (round(adamw["lowrank_state_MiB"] * MiB), round(adamw["other_state_MiB"] * MiB))
        rows += lora_rows(model_name, adamw_bytes)
    return rows


# ---------------------------------------------------------------------------------------------------- report
def plot(rows: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axes = plt.subplots(1, 2, figsize=(14, 5))
    import pretrain_quality

    for axis, setting, title in ((axes[0], "pretrain", f"Pre-training {pretrain_quality.model_name()}"),
                                 (axes[1], "finetune", "Fine-tuning MiniLM (22.7M params)")):
        same = [r for r in rows if r["setting"] == setting]
        labels = [r["label"].replace(", debias_second_moment (extension)", "\n+debias (ext.)") for r in same]
        positions = range(len(same))
        axis.barh([p + 0.2 for p in positions], [r["state_MiB"] for r in same], height=0.4, label="optimizer state")
        axis.barh([p - 0.2 for p in positions], [r["peak_above_imports_MiB"] for r in same], height=0.4,
                  label="peak RSS above the imports")
        axis.set_yticks(list(positions), labels, fontsize=8)
        axis.invert_yaxis()
        axis.set_xlabel("MiB")
        axis.set_title(title)
        axis.grid(True, axis="x", alpha=0.3)
        axis.legend(fontsize=8)
    figure.tight_layout()
    figure.savefig(path, dpi=110)
    plt.close(figure)


def write_report(args, env: dict, run_rows: list[dict], llama_rows: list[dict]) -> None:
    import pretrain_quality

    lines = []
    if run_rows:
        columns = [("label", "method"), ("trainable_MiB", "trainable params MiB"), ("state_MiB", "optimizer state MiB"),
                   ("state_vs_baseline", "state / baseline's"), ("peak_rss_MiB", "peak RSS MiB"),
                   ("peak_above_imports_MiB", "peak above imports MiB"),
                   ("peak_above_imports_vs_baseline", "(ratio to baseline)")]
        if args.device != "cpu":
            columns.append(("cuda_peak_MiB", "CUDA peak MiB"))
        lines += [
            "## The quality benchmarks' settings",
            "",
            f"Each method in a fresh process: data, model and optimizer built as in the quality benchmark, then "
            f"{args.steps} training step(s) on {args.device}. Optimizer state: exact bytes (`state_bytes()` for "
            "LoRA-Pre, every state tensor held after the steps otherwise: moments, Adam-mini's and APOLLO's scalars, "
            "GaLore's and APOLLO's projection matrices; step counters not). "
            "Peak RSS is the whole process (`ru_maxrss`: Python, torch, transformers, the tokenised data, the model, "
            "activations, gradients and state); 'above imports' subtracts the resident size after the imports, "
            "which the methods share. The baseline is AdamW (pre-training) and plain LoRA + AdamW (fine-tuning).",
            "",
            f"### Pre-training ({pretrain_quality.model_name()}, batch {pretrain_quality.BATCH} x "
            f"{pretrain_quality.BLOCK} bytes)",
            "",
            *report.markdown_table([r for r in run_rows if r["setting"] == "pretrain"], columns, digits=4),
            "",
            "### Fine-tuning (all-MiniLM-L6-v2, batch 32 x <= 64)",
            "",
            *report.markdown_table([r for r in run_rows if r["setting"] == "finetune"], columns, digits=4),
            "",
            f"![memory per method]({NAME}.png)",
            "",
        ]
    if llama_rows:
        lines += [
            "## Llama-60M..1B shapes (GaLore's configurations, vocabulary 32000, untied head)",
            "",
            "Optimizer state after one real `step()` on the meta device, checked against the formulas, per p x q "
            "matrix: AdamW 2pq, GaLore r min(p,q) + 2r max(p,q), LoRA-Pre Adam 2(p+q)r, LoRA-Pre Muon (p+q)r float32 "
            "elements, plus 2pq for every other tensor (embeddings, head, norms: AdamW in all four). The LoRA rows "
            f"are a fine-tuning setting: adapters of rank {LORA_RANK} on the 7 linear layers of every block, base "
            "weights, embeddings and head frozen (so no 'other' state): plain LoRA + AdamW and LoRA-Pro efficient keep "
            "2(m+n)r per adapted layer (AdamW moments of A and B); **LoRA-Pro full keeps 2mn per adapted layer** (fp32 "
            "Adam moments of the m x n equivalent gradient), exactly AdamW's state for those matrices. 'low-rank state "
            "/ AdamW's' compares the state of the block matrices only, the like-for-like column across both settings.",
            "",
            *report.markdown_table(llama_rows, [
                ("model", "model"), ("method", "method"), ("rank", "rank"), ("lowrank_matrices", "matrices"),
                ("lowrank_state_MiB", "low-rank state MiB"), ("other_state_MiB", "other state MiB"),
                ("total_MiB", "total MiB"), ("formula_total_MiB", "formula MiB"), ("matches_formula", "matches"),
                ("total_vs_AdamW", "total / AdamW"), ("lowrank_vs_AdamW", "low-rank state / AdamW's")], digits=6),
            "",
        ]
    csvs = {f"{NAME}_runs.csv": run_rows} if run_rows else {}
    csvs.update({f"{NAME}_llama.csv": llama_rows} if llama_rows else {})
    report.write_result(args.out, NAME, "Memory: optimizer state and peak memory per method", env, lines, csvs,
                        smoke=args.smoke)
    if run_rows:
        plot(run_rows, args.out / f"{NAME}.png")


def main(argv=None) -> dict:
    args = parse_args(argv)
    if args.worker:
        sweep.write_json(args.result, measure_one(json.loads(args.worker)))
        return {}
    env = environment.environment(environment.command_line(__file__, argv), args.threads)
    started = time.perf_counter()
    run_rows = measure_runs(args) if "runs" in args.sections else []
    llama_rows = llama_table(args) if "llama" in args.sections else []
    env["duration"] = f"{time.perf_counter() - started:.0f} s"
    write_report(args, env, run_rows, llama_rows)
    if llama_rows and not all(row["matches_formula"] for row in llama_rows):
        sys.exit("measured state bytes differ from the formulas")
    return {"runs": run_rows, "llama": llama_rows}


if __name__ == "__main__":
    main()
