"""Time LoRA-Pro against plain LoRA: whole training steps, and the solver against per-layer host Sylvester solves.

Two measurements, each interleaving its methods repeat by repeat so that machine noise hits all alike:

1. ``step``: forward + backward + optimizer step of a small Llama built from a config (no download), LoRA on
   all linear layers: plain LoRA + ``torch.optim.AdamW`` vs ``LoRAPro(mode="efficient")`` vs
   ``LoRAPro(mode="full")``. The optimizer step alone is timed inside the same steps.
2. ``solver``: the LoRA-Pro gradient rewrite of L adapted (hidden x hidden) layers: our batched solve
   (``apply_lora_pro_``: stack, one eigh per Gram batch, scatter) vs the reference code's way, one layer
   at a time with r x r inverses in torch and ``scipy.linalg.solve_sylvester`` on the host, with skinny
   products (``per_layer_scipy``) and with the reference's explicit m x m projector (``_mxm``).

Writes ``lora_pro_step.csv`` and ``lora_pro_step.md`` under ``--out``.

    python benchmarks/lora_pro_step.py              # full run (minutes on 2 CPU cores)
    python benchmarks/lora_pro_step.py --smoke --out /tmp/bench   # seconds, for tests
"""
from __future__ import annotations

import argparse
import copy
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import torch
from torch import nn

from lit_lowrank import LoRAConfig, inject_lora
from lit_lowrank.adapters import lora_modules
from lit_lowrank.optim import LoRAPro, apply_lora_pro_

sys.path.insert(0, str(Path(__file__).resolve().parent))
import environment  # noqa: E402
import report  # noqa: E402
from timing import paired_ratio  # noqa: E402

STEP_METHODS = ("lora_adamw", "lora_pro_efficient", "lora_pro_full")


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--layers", type=int, default=8, help="decoder layers of the Llama")
    parser.add_argument("--hidden", type=int, default=512, help="hidden size")
    parser.add_argument("--intermediate", type=int, default=1376, help="MLP size")
    parser.add_argument("--heads", type=int, default=8, help="attention heads (key/value heads = heads / 2)")
    parser.add_argument("--vocab", type=int, default=2048, help="vocabulary size")
    parser.add_argument("--batch", type=int, default=4, help="sequences per step")
    parser.add_argument("--seq", type=int, default=128, help="tokens per sequence")
    parser.add_argument("--ranks", type=int, nargs="+", default=[8, 64], help="LoRA ranks")
    parser.add_argument("--solver-layers", type=int, nargs="+", default=[8, 32, 64], help="layer counts of the solver comparison")
    parser.add_argument("--repeats", type=int, default=11, help="timed repeats per method (median reported)")
    parser.add_argument("--warmup", type=int, default=2, help="untimed repeats first")
    parser.add_argument("--threads", type=int, default=2, help="torch.set_num_threads")
    parser.add_argument("--smoke", action="store_true", help="tiny sizes, one repeat: checks that the script runs")
    parser.add_argument("--out", type=Path, default=environment.RESULTS, help="folder for the CSV and markdown")
    args = parser.parse_args(argv)
    if args.smoke:
        args.layers, args.hidden, args.intermediate, args.heads, args.vocab = 2, 32, 64, 4, 128
        args.batch, args.seq, args.ranks, args.solver_layers = 2, 16, [4], [2, 4]
        args.repeats, args.warmup = 1, 0
    return args


def tiny_llama(args: argparse.Namespace, r: int) -> nn.Module:
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(hidden_size=args.hidden, intermediate_size=args.intermediate, num_hidden_layers=args.layers,
                         num_attention_heads=args.heads, num_key_value_heads=max(1, args.heads // 2),
                         vocab_size=args.vocab, max_position_embeddings=max(128, args.seq))
    torch.manual_seed(0)
    model = inject_lora(LlamaForCausalLM(config), LoRAConfig(r=r, alpha=2.0 * r))
    with torch.no_grad():  # a trained-looking B, so every solve does real work (B = 0 is the easy case)
        for _, module in lora_modules(model):
            module.lora_B.normal_(std=0.01)
    return model


def make_optimizer(method: str, model: nn.Module) -> torch.optim.Optimizer:
    if method == "lora_adamw":
        return torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)
    return LoRAPro(model, lr=1e-4, mode=method.removeprefix("lora_pro_"))


def timed_step(model: nn.Module, optimizer: torch.optim.Optimizer, tokens: torch.Tensor) -> tuple[float, float]:
    start = time.perf_counter()
    optimizer.zero_grad(set_to_none=True)
    model(input_ids=tokens, labels=tokens).loss.backward()
    mid = time.perf_counter()
    optimizer.step()
    end = time.perf_counter()
    return end - start, end - mid


def bench_steps(args: argparse.Namespace, r: int) -> list[dict]:
    base = tiny_llama(args, r)
    runs = {method: copy.deepcopy(base) for method in STEP_METHODS}
    optimizers = {method: make_optimizer(method, model) for method, model in runs.items()}
    tokens = torch.randint(0, args.vocab, (args.batch, args.seq), generator=torch.Generator().manual_seed(0))
    times: dict[str, list[tuple[float, float]]] = {method: [] for method in STEP_METHODS}
    for repeat in range(args.warmup + args.repeats):
        for method in STEP_METHODS:  # interleaved: noise and thermal drift hit every method alike
            sample = timed_step(runs[method], optimizers[method], tokens)
            if repeat >= args.warmup:
                times[method].append(sample)
    rows = []
    for method in STEP_METHODS:
        rows.append(dict(section="step", r=r, layers=args.layers, method=method,
                         median_ms=1e3 * statistics.median(t for t, _ in times[method]),
                         min_ms=1e3 * min(t for t, _ in times[method]),
                         optimizer_ms=1e3 * statistics.median(o for _, o in times[method]),
                         ratio=paired_ratio([t for t, _ in times[method]], [t for t, _ in times["lora_adamw"]])))
    return rows


def host_sylvester_rewrite_(modules, dense_projector: bool = False, damping: float = 1e-8) -> None:
    """The reference code's way: layer by layer, r x r inverses in torch, the Sylvester equation on the host.

    ``dense_projector=True`` also forms ``I - P_B`` (m x m) as the reference code does; ``False`` keeps the
    products skinny, so that comparison isolates batching and eigh against per-layer host solves.
    """
    from scipy.linalg import solve_sylvester

    for module in modules:
        A, B, gA, gB, s = module.lora_A, module.lora_B, module.lora_A.grad, module.lora_B.grad, module.scaling
        eye = torch.eye(A.shape[0], dtype=A.dtype, device=A.device)
        gram_A, gram_B = A @ A.T, B.T @ B
        q_A, q_B = torch.linalg.inv(gram_A + damping * eye), torch.linalg.inv(gram_B + damping * eye)
        dA = q_B @ gA / s**2
        if dense_projector:
            perp = torch.eye(B.shape[0], dtype=B.dtype, device=B.device) - B @ q_B @ B.T
            dB = perp @ gB @ q_A / s**2
        else:
            dB = (gB - B @ (q_B @ (B.T @ gB))) @ q_A / s**2
        host = [t.detach().cpu().numpy() for t in (gram_B, gram_A, -dA @ A.T)]
        X = torch.from_numpy(np.ascontiguousarray(solve_sylvester(*host))).to(A)
        gA.copy_(dA + X @ A)
        gB.copy_(dB - B @ X)


def bench_solver(args: argparse.Namespace, r: int, n_layers: int) -> list[dict]:
    torch.manual_seed(0)
    width = args.hidden
    model = inject_lora(nn.Sequential(*[nn.Linear(width, width) for _ in range(n_layers)]), LoRAConfig(r=r, alpha=2.0 * r))
    modules = [m for _, m in lora_modules(model)]
    raw = []
    for module in modules:
        with torch.no_grad():
            module.lora_B.normal_(std=0.01)
        module.lora_A.grad, module.lora_B.grad = torch.randn_like(module.lora_A), torch.randn_like(module.lora_B)
        raw.append((module.lora_A.grad.clone(), module.lora_B.grad.clone()))

    def restore():
        for module, (gA, gB) in zip(modules, raw):
            module.lora_A.grad.copy_(gA)
            module.lora_B.grad.copy_(gB)

    methods = {
        "batched_eigh": lambda: apply_lora_pro_(model),
        "per_layer_scipy": lambda: host_sylvester_rewrite_(modules),
        "per_layer_scipy_mxm": lambda: host_sylvester_rewrite_(modules, dense_projector=True),
    }
    times: dict[str, list[float]] = {name: [] for name in methods}
    for repeat in range(args.warmup + args.repeats):
        for name, fn in methods.items():
            restore()
            start = time.perf_counter()
            with torch.no_grad():
                fn()
            if repeat >= args.warmup:
                times[name].append(time.perf_counter() - start)
    return [
        dict(section="solver", r=r, layers=n_layers, method=name, median_ms=1e3 * statistics.median(t), min_ms=1e3 * min(t),
             optimizer_ms=1e3 * statistics.median(t), ratio=paired_ratio(t, times["batched_eigh"]))
        for name, t in times.items()
    ]


def write_results(args: argparse.Namespace, env: dict, rows: list[dict]) -> None:
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
        f"## Training step: Llama {args.layers} layers, hidden {args.hidden}, MLP {args.intermediate}, vocab {args.vocab}, "
        f"batch {args.batch} x {args.seq} tokens, LoRA on all linear layers",
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


def main(argv=None) -> list[dict]:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    env = environment.environment(environment.command_line(__file__, argv), args.threads)
    start = time.perf_counter()
    rows = []
    for r in args.ranks:
        rows += bench_steps(args, r)
        for n_layers in args.solver_layers:
            rows += bench_solver(args, r, n_layers)
    env["load average at end"] = environment.load_average()
    env["duration"] = f"{time.perf_counter() - start:.0f} s"
    write_results(args, env, rows)
    for row in rows:
        print(f"{row['section']:6s} r={row['r']:<3d} L={row['layers']:<3d} {row['method']:20s} "
              f"{row['median_ms']:9.2f} ms  optimizer {row['optimizer_ms']:8.2f} ms  ratio {row['ratio']:.3f}")
    return rows


if __name__ == "__main__":
    main()
