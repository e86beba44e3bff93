"""Optimizer-state memory of Llama pre-training shapes: AdamW, GaLore, LoRA-Pre Adam and LoRA-Pre Muon.

The models are GaLore's Llama configurations (60M / 130M / 350M / 1B: hidden 512 / 768 / 1024 / 2048, MLP
1376 / 2048 / 2736 / 5461, 8 / 12 / 24 / 24 layers, 8 / 12 / 16 / 32 heads, vocabulary 32000, untied head),
built on the meta device: parameters have shapes but no storage. Every optimizer is built on the same
split (``lowrank_param_groups``: the 7 projection matrices of each block low-rank, embeddings / head / norms
AdamW), every parameter gets a meta gradient, and one real ``optimizer.step()`` runs on the meta device. The
reported bytes are then read from the optimizer's own state (``nbytes`` of the state tensors; GaLore keeps
its projection matrix inside a projector object in the state, which is counted too; torch.optim.AdamW's
4-byte ``step`` scalars are left out) and compared with the formulas, per p x q matrix of the low-rank group:

    AdamW 2 p q    GaLore r min(p, q) + 2 r max(p, q)    LoRA-Pre Adam 2 (p + q) r    LoRA-Pre Muon (p + q) r

(float32 elements), plus 2 p q for every other tensor (AdamW moments in all four). GaLore uses the ranks of
its paper (128 / 256 / 256 / 512), LoRA-Pre ranks 16 and 128.

    python benchmarks/lora_pre_memory.py            # all four models (about a minute)
    python benchmarks/lora_pre_memory.py --smoke --out /tmp/bench
"""

from __future__ import annotations

import argparse
import csv
import datetime
import platform
import sys
import time
from pathlib import Path

import torch

from lit_lowrank.optim import LoRAPreAdamW, LoRAPreMuon, lowrank_param_groups

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import cpu_name, galore_available, version  # noqa: E402

# GaLore's configs/llama_*.json: hidden, intermediate, layers, heads; vocabulary 32000.
LLAMA_CONFIGS = {
    "60M": (512, 1376, 8, 8),
    "130M": (768, 2048, 12, 12),
    "350M": (1024, 2736, 24, 16),
    "1B": (2048, 5461, 24, 32),
}
GALORE_RANKS = {"60M": 128, "130M": 256, "350M": 256, "1B": 512}  # GaLore paper, pre-training table
MiB = 2**20


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.ArgumentDefaultsHelpFormatter
    )
    parser.add_argument("--models", nargs="+", default=list(LLAMA_CONFIGS), choices=list(LLAMA_CONFIGS))
    parser.add_argument("--ranks", type=int, nargs="+", default=[16, 128], help="LoRA-Pre ranks")
    parser.add_argument("--smoke", action="store_true", help="60M only, rank 16: checks that the script runs")
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "results", help="folder for CSV + md")
    args = parser.parse_args(argv)
    if args.smoke:
        args.models, args.ranks = ["60M"], [16]
    return args


def meta_llama(name: str) -> torch.nn.Module:
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


def measured_bytes(optimizer: torch.optim.Optimizer, groups: list[dict]) -> tuple[int, int]:
    """(low-rank group, other tensors) bytes of the optimizer's state tensors after its step."""

    def state_tensors(param):
        for key, value in optimizer.state[param].items():
            if key == "projector":  # GaLore's projection matrix lives in this object
                yield value.ortho_matrix
            elif isinstance(value, torch.Tensor) and key != "step":
                yield value

    return tuple(sum(t.nbytes for p in group["params"] for t in state_tensors(p)) for group in groups)


def make_optimizer(method: str, model: torch.nn.Module, rank: int, galore_rank: int):
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


def run(args: argparse.Namespace) -> list[dict]:
    rows = []
    methods = [("AdamW", None)] + ([("GaLore", None)] if galore_available() else [])
    methods += [(name, rank) for rank in args.ranks for name in ("LoRA-Pre Adam", "LoRA-Pre Muon")]
    for model_name in args.models:
        model = meta_llama(model_name)
        adamw = None
        for method, rank in methods:
            rank = GALORE_RANKS[model_name] if method == "GaLore" else rank
            optimizer, groups = make_optimizer(method, model, rank or 16, GALORE_RANKS[model_name])
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


def write_results(args: argparse.Namespace, rows: list[dict], seconds: float) -> None:
    args.out.mkdir(parents=True, exist_ok=True)
    with open(args.out / "lora_pre_memory.csv", "w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    versions = (
        f"torch {torch.__version__}, transformers {version('transformers')}, galore-torch {version('galore-torch')}"
    )
    lines = [
        "# LoRA-Pre optimizer-state memory (Llama pre-training shapes)",
        "",
        (
            f"`python benchmarks/lora_pre_memory.py{' --smoke' if args.smoke else ''}`; "
            f"{datetime.date.today().isoformat()}, {cpu_name()}, "
            f"Python {platform.python_version()}, {versions}; {seconds:.0f} s."
        ),
        "",
        (
            "Measured: bytes of each optimizer's state tensors after one `step()` on the meta device (GaLore's projector "
            "matrix included, AdamW's 4-byte step scalars excluded). Formula: AdamW 2pq, GaLore r min(p,q) + 2r max(p,q), "
            "LoRA-Pre Adam 2(p+q)r, LoRA-Pre Muon (p+q)r float32 elements per low-rank matrix, plus 2pq for every "
            "other tensor (embeddings, untied head, norms), which all four keep in AdamW."
        ),
        "",
        (
            "| model | method | rank | low-rank matrices | low-rank state MiB | other state MiB | total MiB | formula MiB "
            "| matches | total / AdamW | low-rank state / AdamW's |"
        ),
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for row in rows:
        lines.append("| " + " | ".join(str(value) for value in row.values()) + " |")
    (args.out / "lora_pre_memory.md").write_text("\n".join(lines) + "\n")


def main(argv=None) -> list[dict]:
    args = parse_args(argv)
    start = time.perf_counter()
    rows = run(args)
    write_results(args, rows, time.perf_counter() - start)
    for row in rows:
        print(row)
    if not all(row["matches_formula"] for row in rows):
        sys.exit("measured state bytes differ from the formulas")
    return rows


if __name__ == "__main__":
    main()
