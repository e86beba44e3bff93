"""``lit-lowrank memory``: GiB per GPU of every method for a model config, as a markdown table (no GPU needed).

    lit-lowrank memory --config llama-2-7b llama-3.1-8b --rank 16 --world-size 1 8 --strategy fsdp
    python cli.py memory --config path/to/config.json --methods adamw lora_pre_adam --dtype bfloat16 --detail
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from lit_lowrank import memory
from lit_lowrank.memory import METHODS, STRATEGIES, estimate_memory

GiB = 2**30
_JSON_KINDS = {list: "an array", str: "a string", int: "a number", float: "a number", bool: "a boolean",
               type(None): "null"}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="lit-lowrank memory", description=__doc__.split("\n\n")[0],
                                     epilog=__doc__.split("\n\n", 1)[1],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", nargs="+", required=True,
                        help=f"known names ({', '.join(memory.KNOWN_CONFIGS)}), config.json paths, local folders or "
                             "hub names already in the local cache (nothing is downloaded)")
    parser.add_argument("--methods", nargs="+", default=list(METHODS), choices=METHODS)
    parser.add_argument("--rank", type=int, default=16, help="LoRA / LoRA-Pre / GaLore rank (default 16)")
    parser.add_argument("--world-size", type=int, nargs="+", default=[1, 8], help="GPUs (default: 1 8)")
    parser.add_argument("--strategy", choices=STRATEGIES, default="fsdp", help="default fsdp (FSDP2 row shards)")
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"], help="parameter dtype")
    parser.add_argument("--lora-pro-full-replicated", action="store_true",
                        help="count LoRA-Pro full mode's m x n moments as whole on every GPU under FSDP (LoRAPro "
                             "before it sharded them by rows; default: "
                             "lit_lowrank.memory.LORA_PRO_FULL_MOMENTS_SHARDED)")
    parser.add_argument("--detail", action="store_true", help="also weights, adapters and gradients per world size")
    return parser


def read_config_file(config: str):
    """A path to a file becomes the model config its JSON object describes, or a ValueError naming the file and what
    is wrong in it; known names, folders and hub names pass through unchanged."""
    path = Path(config)
    if not path.is_file():
        return config
    hint = ("HINT: pass a model's config.json, a JSON object such as {\"model_type\": \"llama\", \"hidden_size\": "
            f"4096, ...}}, or a known name ({', '.join(memory.KNOWN_CONFIGS)}).")
    try:
        content = path.read_bytes()
    except OSError as error:
        raise ValueError(f"config file {path}: cannot be read ({error}). HINT: check its permissions.") from None
    try:
        entries = json.loads(content)
    except ValueError as error:  # JSONDecodeError, UnicodeDecodeError
        what = "is empty" if not content.strip() else f"is not JSON ({type(error).__name__}: {error})"
        raise ValueError(f"config file {path}: {what}. {hint}") from None
    if not isinstance(entries, dict):
        raise ValueError(f"config file {path}: holds {_JSON_KINDS.get(type(entries), 'a JSON value')}, not a JSON "
                         f"object. {hint}")
    try:
        return memory.resolve_config(entries)
    except ValueError as error:  # ours, with its own HINT
        raise ValueError(f"config file {path}: {error}") from None
    except Exception as error:  # transformers' checks of the values (a string for hidden_size, ...)
        raise ValueError(f"config file {path}: transformers cannot build a model config from it "
                         f"({type(error).__name__}: {error}). HINT: fix that entry; compare with the model's own "
                         "config.json.") from None


def table(args: argparse.Namespace, config) -> list[str]:
    """Markdown lines for one config: a row per method, GiB per rank for each world size."""
    parts = ["total", "optimizer state"] + (["weights", "adapters", "gradients"] if args.detail else [])
    gpus = [f"{world} GPU{'s' if world > 1 else ''}" for world in args.world_size]
    sharded = False if args.lora_pro_full_replicated else None
    lines = [f"| method | {' | '.join(f'{gpu}: {part}' for gpu in gpus for part in parts)} |",
             "|---|" + "---:|" * (len(gpus) * len(parts))]
    for method in args.methods:
        cells = []
        for world in args.world_size:
            found = estimate_memory(config, method, args.rank, world, args.strategy, args.dtype,
                                    lora_pro_full_sharded=sharded)
            values = [found.total, found.optimizer_state.total, found.weights, found.adapters, found.gradients]
            cells += [f"{value / GiB:.2f}" for value in values[:len(parts)]]
        lines.append(f"| {method} | {' | '.join(cells)} |")
    return lines


def notes(args: argparse.Namespace) -> list[str]:
    full_sharded = memory.LORA_PRO_FULL_MOMENTS_SHARDED and not args.lora_pro_full_replicated
    lines = [(f"GiB per GPU (rank 0, the largest shard), {args.dtype} parameters, rank {args.rank}, "
              f"{args.strategy.upper()}. Activations, temporary buffers and the CUDA context are not included.")]
    if args.strategy == "fsdp":
        lines.append(f"LoRA-Pro full: m x n moments {'split by rows' if full_sharded else 'replicated on every GPU'}. "
                     "GaLore: projected state replicated (galore-torch has no FSDP path).")
    return lines


def main(argv: list | None = None) -> int:
    """Print one table per ``--config``; return the exit status (2 for a config or setting it cannot use).

    Example:
        >>> main(["--config", "llama-2-7b", "--methods", "adamw", "--world-size", "1", "8"])  # doctest: +ELLIPSIS
        ### llama-2-7b
        ...
        | adamw | 100.41 | 50.21 | 12.55 | 6.28 |
        ...
        0
    """
    args = build_parser().parse_args(argv)
    if any(world < 1 for world in args.world_size) or args.rank < 1:
        print("error: --world-size and --rank must be >= 1. HINT: e.g. --world-size 1 8 --rank 16", file=sys.stderr)
        return 2
    for config in args.config:
        try:
            entries = read_config_file(config)
            lines = table(args, entries)
        except ValueError as error:
            print(f"error: {error}", file=sys.stderr)
            return 2
        print("\n".join([f"### {config}", "", *lines, "", *notes(args), ""]))
    return 0


if __name__ == "__main__":
    sys.exit(main())
