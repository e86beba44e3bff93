"""How far one LoRA-Pre Adam step can move a weight: the probe behind the 2026-11-30 defaults.

A 16-32-32-4 tanh MLP, cross-entropy on a fixed random batch, lr 1e-2, rank 2, six steps; optionally one all-zero
gradient at step 2 or 4. For each variant it records the largest |change| of any weight per step and the final
loss. AdamW moves no weight by much more than lr (its bound is lr * sqrt(C_t), C_t <= ~53, in practice ~1).

    python benchmarks/lora_pre_bound_probe.py            # a few seconds; writes results/lora_pre_bound_probe.md
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import environment  # noqa: E402
import report  # noqa: E402

VARIANTS = {  # LoRAPreAdamW options; None: torch.optim.AdamW
    "AdamW": None,
    "paper-literal (debias_second_moment=False, update_bound='none')": {"debias_second_moment": False,
                                                                         "update_bound": "none"},
    "debiased, no bound": {"update_bound": "none"},
    "debiased, v_floor (default)": {},
    "debiased, adam_floor": {"update_bound": "adam_floor"},
    "debiased, rms_clip": {"update_bound": "rms_clip"},
}


def probe(options, zero_at, steps=6, lr=1e-2):
    import torch

    from lit_lowrank.optim import LoRAPreAdamW

    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(16, 32), torch.nn.Tanh(), torch.nn.Linear(32, 32), torch.nn.Tanh(),
                                torch.nn.Linear(32, 4))
    if options is None:
        optimizer = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.0)
    else:
        optimizer = LoRAPreAdamW(model.parameters(), lr=lr, rank=2, **options)
    generator = torch.Generator().manual_seed(1)
    x, y = torch.randn(64, 16, generator=generator), torch.randint(0, 4, (64,), generator=generator)
    moves = []
    for step in range(1, steps + 1):
        optimizer.zero_grad()
        torch.nn.functional.cross_entropy(model(x), y).backward()
        if step == zero_at:
            for param in model.parameters():
                param.grad.zero_()
        before = [param.detach().clone() for param in model.parameters()]
        optimizer.step()
        moves.append(max(float((p.detach() - b).abs().max()) for p, b in zip(model.parameters(), before)))
    with torch.no_grad():
        loss = float(torch.nn.functional.cross_entropy(model(x), y))
    return moves, loss


def main(argv=None) -> list[dict]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=environment.RESULTS, help="folder for the markdown and CSV")
    args = parser.parse_args(argv)
    rows = []
    with environment.library_warnings_silenced():  # the paper-literal warning, once per variant
        runs = {(name, zero_at): probe(options, zero_at)
                for name, options in VARIANTS.items() for zero_at in (None, 2, 4)}
    for name, options in VARIANTS.items():
        for zero_at in (None, 2, 4):
            moves, loss = runs[(name, zero_at)]
            rows.append({"variant": name, "zero gradient at step": zero_at or "-",
                         "largest move per step (x lr)": " / ".join(f"{m / 1e-2:.3g}" for m in moves),
                         "largest move (x lr)": round(max(moves) / 1e-2, 3), "final loss": round(loss, 3)})
    columns = [(key, key) for key in rows[0]]
    env = environment.environment(environment.command_line(__file__, argv))
    body = [__doc__.split("\n\n")[1].replace("\n", " "), "", *report.markdown_table(rows, columns, digits=3), ""]
    report.write_result(args.out, "lora_pre_bound_probe", __doc__.splitlines()[0], env, body,
                        {"lora_pre_bound_probe.csv": rows})
    print("\n".join(report.markdown_table(rows, columns, digits=3)))
    return rows


if __name__ == "__main__":
    main()
