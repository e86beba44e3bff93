"""The measurements of ``step_timing.py``, one ``measure_*`` function per subcommand: each builds its methods'
steppers (one function per method running one step), times them with ``timing.time_interleaved`` and returns its
tables, CSV file name -> rows, the first being the main one. The subcommands, what they measure and the commands
that regenerate their results are in ``step_timing.py``'s docstring.
"""

from __future__ import annotations

import copy
import statistics
import time
import warnings
from collections import defaultdict
from collections.abc import Callable
from typing import NamedTuple

import environment
import numpy as np
import report
import timing
import torch
from torch import nn

from lit_lowrank import LoRAConfig, inject_lora
from lit_lowrank.adapters import lora_modules
from lit_lowrank.optim import LoRAPreAdamW, LoRAPro, apply_lora_pro_

PROFILE_CATEGORIES = {  # torch.profiler's op names behind each part of a LoRA-Pre step (lora-pre --profile)
    "products (bmm: p x q x r, and the r x r Grams)": (
        "aten::addmm", "aten::addmm_", "aten::bmm", "aten::baddbmm", "aten::baddbmm_"),
    "damped pseudo-inverses (Cholesky, solves)": (
        "aten::linalg_cholesky_ex", "aten::cholesky_inverse", "aten::tril", "aten::stack", "aten::cat",
        "aten::sum", "aten::div", "aten::add", "aten::any"),
    "element-wise passes (squares, floor, sqrt, abs, addcdiv, add)": (
        "aten::hypot", "aten::abs", "aten::add_", "aten::addcdiv_", "aten::mul_", "aten::mul", "aten::addcmul_",
        "aten::maximum", "aten::sqrt_", "aten::aminmax"),
    "copies (factor stacks, dtype staging)": ("aten::copy_", "aten::_to_copy"),
}
LORA_PRO_METHODS = ("lora_adamw", "lora_pro_efficient", "lora_pro_full")


# ------------------------------------------------------------------------------------------------ shared
def summary(values: list[float], baseline: list[float]) -> dict:
    """Median and minimum in ms, and the median of per-repeat ratios to ``baseline`` (``timing.paired_ratio``)."""
    return {"median_ms": 1e3 * statistics.median(values), "min_ms": 1e3 * min(values),
            "ratio": timing.paired_ratio(values, baseline)}


def amortised(plain: list[float], svd: list[float], gap: int) -> list[float]:
    """Per-repeat GaLore step time with one re-projection (SVD) step every ``gap`` steps."""
    return [p + (s - p) / gap for p, s in zip(plain, svd)]


def set_galore_step(optimizer: torch.optim.Optimizer, value: int) -> None:
    """GaLore re-projects when its step count, read before the step, is a multiple of its gap: set the count of
    every GaLore parameter that has state to choose a plain step (1) or an SVD step (the gap)."""
    for group in optimizer.param_groups:
        if "rank" in group:
            for param in group["params"]:
                if "step" in optimizer.state[param]:
                    optimizer.state[param]["step"] = value


def training_step(model, optimizer, loss: Callable, optimizer_times: list[float], before: Callable = lambda: None,
                  sync: Callable = lambda: None) -> Callable[[], None]:
    """One training step as a function: ``before()``, zero_grad, ``loss(model).backward()``, ``optimizer.step()``;
    the optimizer step's own time is appended to ``optimizer_times`` (``sync``: wait for the GPU around it)."""

    def step():
        before()
        optimizer.zero_grad(set_to_none=True)
        loss(model).backward()
        sync()
        start = time.perf_counter()
        optimizer.step()
        sync()
        optimizer_times.append(time.perf_counter() - start)

    return step


# ------------------------------------------------------------------------------------------------ lora-pre
def galore_optimizer(param: nn.Parameter, rank: int, period: int):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        from galore_torch import GaLoreAdamW

        group = {"params": [param], "rank": rank, "update_proj_gap": period, "scale": 0.25, "proj_type": "std"}
        return GaLoreAdamW([group], no_deprecation_warning=True)


def lora_pre_steppers(shape: tuple[int, int], ranks: list[int], period: int, galore: bool) -> dict:
    """name -> one optimizer step of that method on its own copy of one weight with a fixed random gradient."""
    generator = torch.Generator().manual_seed(0)
    weight, grad = torch.randn(shape, generator=generator), torch.randn(shape, generator=generator)

    def parameter():
        param = nn.Parameter(weight.clone())
        param.grad = grad
        return param

    steppers = {"adamw_foreach": torch.optim.AdamW([parameter()], foreach=True).step}
    for rank in ranks:
        steppers[f"lora_pre_r{rank}"] = LoRAPreAdamW([parameter()], rank=rank).step
        steppers[f"floor_products_r{rank}"] = products_floor(grad, rank)
    steppers["floor_elementwise"] = elementwise_floor(parameter())
    for rank in ranks if galore else []:
        optimizer = galore_optimizer(parameter(), rank, period)
        optimizer.step()  # creates the state and the first projection
        steppers[f"galore_r{rank}_plain"] = galore_step(optimizer, 1)
        steppers[f"galore_r{rank}_svd"] = galore_step(optimizer, period)
    return steppers


def products_floor(grad: torch.Tensor, rank: int) -> Callable[[], None]:
    """The six ``p x q x r`` products a LoRA-Pre Adam step cannot do without, alone, on the whole matrix: ``B A``
    and ``V_B V_A`` (the moments), ``g A_pinv^T``, ``|g| V_A_pinv^T``, ``B_pinv g``, ``V_B_pinv |g|`` (the
    regressions). Nothing else: with the element-wise floor below, a lower bound on any eager-torch step."""
    generator = torch.Generator().manual_seed(1)
    (p, q), r = grad.shape, rank
    left = [torch.randn(p, r, generator=generator) for _ in range(2)]
    right = [torch.randn(r, q, generator=generator) for _ in range(2)]
    moment, left_sums, right_sums = torch.empty(p, q), torch.empty(p, r), torch.empty(r, q)

    def step():
        torch.addmm(grad, left[0], right[0], out=moment)
        torch.mm(left[1], right[1], out=moment)
        torch.mm(grad, right[0].T, out=left_sums)
        torch.mm(moment, right[1].T, out=left_sums)
        torch.mm(left[0].T, grad, out=right_sums)
        torch.mm(left[1].T, moment, out=right_sums)

    return step


def elementwise_floor(param: nn.Parameter) -> Callable[[], None]:
    """The fewest eager element-wise passes of a LoRA-Pre Adam step's formula with its default bound, on the whole
    matrix, given ``m`` and ``rho V_B V_A`` (from the products): ``v = x^2 + g^2`` (two passes), the floor
    ``max(v, m^2)`` (two), ``sqrt``, ``+ eps``, the ``addcdiv_`` into W, ``|g|`` for the regressions. Each pass
    reads and writes ``p x q`` floats; torch cannot fuse them without a compiler."""
    grad = param.grad
    moment, second = grad * 0.5, grad * 0.25
    root_v, squares = torch.empty_like(grad), torch.empty_like(grad)

    def step():
        torch.mul(second, second, out=root_v).addcmul_(grad, grad)
        torch.maximum(root_v, torch.mul(moment, moment, out=squares), out=root_v)
        root_v.sqrt_().add_(1e-8)
        param.data.addcdiv_(moment, root_v, value=-1e-7)  # a tiny step: the work is the same, W stays put
        torch.abs(grad, out=squares)

    return step


def galore_step(optimizer: torch.optim.Optimizer, count: int) -> Callable[[], None]:
    """One GaLore step at step count ``count``: a plain step (1) or a re-projecting SVD step (its gap)."""

    def step():
        set_galore_step(optimizer, count)
        optimizer.step()

    return step


def lora_pre_rows(shape, times: dict[str, list[float]], clean: list[bool], ranks: list[int], period: int) -> list:
    """Median / min per method and the median of per-repeat ratios to AdamW, over the clean repeats (all of them
    if fewer than 10 were clean); GaLore amortised over its period."""
    times = timing.clean_subset(times, clean)
    per_repeat = {name: values for name, values in times.items() if not name.startswith("galore")}
    for rank in ranks:
        if f"galore_r{rank}_plain" in times:
            plain, svd = times[f"galore_r{rank}_plain"], times[f"galore_r{rank}_svd"]
            per_repeat[f"galore_r{rank}_amortised"] = amortised(plain, svd, period)
    rows = []
    for name, values in per_repeat.items():
        measured = summary(values, times["adamw_foreach"])
        rows.append({"shape": f"{shape[0]}x{shape[1]}", "method": name, "median_ms": round(measured["median_ms"], 3),
                     "min_ms": round(measured["min_ms"], 3), "median_ratio_to_adamw": round(measured["ratio"], 2),
                     "repeats": len(values), "disturbed_repeats": len(clean) - sum(clean)})
        if name.endswith("_amortised"):
            svd = times[name.replace("_amortised", "_svd")]
            rows[-1]["note"] = f"SVD step median {statistics.median(svd) * 1e3:.1f} ms, once per {period} steps"
    return rows


def profile_lora_pre(shape: tuple[int, int], rank: int, steps: int = 10) -> list[dict]:
    """torch.profiler's self CPU time per step of a LoRA-Pre step, by ``PROFILE_CATEGORIES``."""
    from torch.profiler import ProfilerActivity, profile

    param = nn.Parameter(torch.randn(shape))
    param.grad = torch.randn(shape)
    optimizer = LoRAPreAdamW([param], rank=rank)
    for _ in range(3):
        optimizer.step()
    start = time.perf_counter()
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        for _ in range(steps):
            optimizer.step()
    wall_ms = (time.perf_counter() - start) / steps * 1e3
    by_category = defaultdict(float)
    for event in prof.key_averages():
        if event.key.startswith("Optimizer."):  # the step's record_function: its self time is our Python code
            category = "Python (optimizer and update code)"
        else:
            category = next((c for c, ops in PROFILE_CATEGORIES.items() if event.key in ops),
                            "views and other small ops")
        by_category[category] += event.self_cpu_time_total / steps / 1e3
    by_category["unaccounted (wall - profiled)"] = wall_ms - sum(by_category.values())
    return [{"shape": f"{shape[0]}x{shape[1]}", "rank": rank, "category": category, "ms_per_step": round(ms, 3),
             "share": round(ms / wall_ms, 3)} for category, ms in by_category.items()]


def measure_lora_pre(args) -> dict[str, list[dict]]:
    from sweep import galore_available

    rows, profile_rows = [], []
    for shape in args.shapes:
        steppers = lora_pre_steppers(shape, args.ranks, args.period, galore_available())
        times, clean = timing.time_interleaved(steppers, args.repeats, args.warmup, args.wait_idle)
        rows += lora_pre_rows(shape, times, clean, args.ranks, args.period)
        if args.profile:
            profile_rows += [row for rank in args.ranks for row in profile_lora_pre(shape, rank)]
    for row in rows + profile_rows:
        print(row)
    return {"lora_pre_step.csv": rows, **({"lora_pre_step_profile.csv": profile_rows} if profile_rows else {})}


# ------------------------------------------------------------------------------------------------ lora-pro
def tiny_llama(args, r: int) -> nn.Module:
    """A Llama built from a config (no download), LoRA on all linear layers with a trained-looking B."""
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(hidden_size=args.hidden, intermediate_size=args.intermediate, num_hidden_layers=args.layers,
                         num_attention_heads=args.heads, num_key_value_heads=max(1, args.heads // 2),
                         vocab_size=args.vocab, max_position_embeddings=max(128, args.seq))
    torch.manual_seed(0)
    model = inject_lora(LlamaForCausalLM(config), LoRAConfig(r=r, alpha=2.0 * r))
    with torch.no_grad():  # so every solve does real work (B = 0 is the easy case)
        for _, module in lora_modules(model):
            module.lora_B.normal_(std=0.01)
    return model


def lora_pro_optimizer(method: str, model: nn.Module) -> torch.optim.Optimizer:
    if method == "lora_adamw":
        return torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)
    return LoRAPro(model, lr=1e-4, mode=method.removeprefix("lora_pro_"))


def lora_pro_step_rows(args, r: int) -> list[dict]:
    """Whole training steps of the Llama: plain LoRA + AdamW vs LoRA-Pro efficient and full (fixed order)."""
    base = tiny_llama(args, r)
    tokens = torch.randint(0, args.vocab, (args.batch, args.seq), generator=torch.Generator().manual_seed(0))
    optimizer_times = {method: [] for method in LORA_PRO_METHODS}
    steppers = {}
    for method in LORA_PRO_METHODS:
        model = copy.deepcopy(base)
        steppers[method] = training_step(model, lora_pro_optimizer(method, model),
                                         lambda m: m(input_ids=tokens, labels=tokens).loss, optimizer_times[method])
    times, _ = timing.time_interleaved(steppers, args.repeats, 0.0, 0.0, warmup_repeats=args.warmup, rotate=False)
    return [dict(section="step", r=r, layers=args.layers, method=method, **summary(times[method], times["lora_adamw"]),
                 optimizer_ms=1e3 * statistics.median(optimizer_times[method][-args.repeats:]))
            for method in LORA_PRO_METHODS]


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


def lora_pro_solver_rows(args, r: int, n_layers: int) -> list[dict]:
    """The gradient rewrite of ``n_layers`` adapted hidden x hidden layers: batched vs per-layer host solves; the
    raw gradients are restored (untimed) before every solve."""
    torch.manual_seed(0)
    width = args.hidden
    model = inject_lora(nn.Sequential(*[nn.Linear(width, width) for _ in range(n_layers)]),
                        LoRAConfig(r=r, alpha=2.0 * r))
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

    solvers = {
        "batched_eigh": lambda: apply_lora_pro_(model),
        "per_layer_scipy": lambda: host_sylvester_rewrite_(modules),
        "per_layer_scipy_mxm": lambda: host_sylvester_rewrite_(modules, dense_projector=True),
    }
    steppers = {name: torch.no_grad()(solve) for name, solve in solvers.items()}
    times, _ = timing.time_interleaved(steppers, args.repeats, 0.0, 0.0, warmup_repeats=args.warmup, rotate=False,
                                       prepare=restore)
    rows = []
    for name, values in times.items():
        measured = summary(values, times["batched_eigh"])
        rows.append(dict(section="solver", r=r, layers=n_layers, method=name, **measured,
                         optimizer_ms=measured["median_ms"]))
    return rows


def measure_lora_pro(args) -> dict[str, list[dict]]:
    rows = []
    for r in args.ranks:
        rows += lora_pro_step_rows(args, r)
        for n_layers in args.solver_layers:
            rows += lora_pro_solver_rows(args, r, n_layers)
    for row in rows:
        print(f"{row['section']:6s} r={row['r']:<3d} L={row['layers']:<3d} {row['method']:20s} "
              f"{row['median_ms']:9.2f} ms  optimizer {row['optimizer_ms']:8.2f} ms  ratio {row['ratio']:.3f}")
    return {"lora_pro_step.csv": rows}


# ------------------------------------------------------------------------------------------------ training
TRAINING_LR = 1e-5  # the steps repeat one batch; a small lr keeps the weights (and so the work) unchanged


class Setting(NamedTuple):
    """One quality benchmark's setting, built by that benchmark's own code and ready to time."""

    steppers: dict[str, Callable[[], None]]  # method -> one training step
    optimizer_times: dict[str, list[float]]  # method -> its optimizer.step() times, warm-up rounds included
    baseline: str
    labels: dict[str, str]
    title: str  # what was built, for the report
    galore_gap: int = 0


def quality_options(setting: str, smoke: bool):
    """The quality benchmark's own defaults (rank, GaLore scale and gap, schedule), as its ``parse_args`` gives
    them, so that the timed setting is the quality run's."""
    import finetune_quality
    import pretrain_quality

    return (pretrain_quality if setting == "pretrain" else finetune_quality).parse_args(["--smoke"] if smoke else [])


def timed_steps(models: dict, optimizers: dict, loss: Callable, batch: dict, device: torch.device,
                step_counts: dict[str, int]) -> tuple[dict, dict]:
    """(method -> one training step on ``batch``, method -> its optimizer times); ``step_counts`` sets GaLore's
    step count before each step (1: plain step, the gap: SVD step)."""
    batch = {k: v.to(device) for k, v in batch.items()}
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    optimizer_times = {name: [] for name in models}
    steppers = {}
    for name, model in models.items():
        count = step_counts.get(name)
        before = (lambda o=optimizers[name], c=count: set_galore_step(o, c)) if count else (lambda: None)
        steppers[name] = training_step(model, optimizers[name], lambda m: loss(m, batch), optimizer_times[name],
                                       before, sync)
    return steppers, optimizer_times


def pretrain_setting(args) -> Setting:
    """``pretrain_quality.py``'s model, data and optimizers; GaLore twice (plain step and SVD step)."""
    import pretrain_quality as quality

    options, device = quality_options("pretrain", args.smoke), torch.device(args.device)
    dm = quality.data_module(args.smoke, 0)
    dm.setup("fit")
    batch = next(iter(dm.train_dataloader()))
    # full-rank Muon (torch.optim.Muon + AdamW): the reference LoRA-Pre Muon's step is compared with
    methods = quality.cost_methods() + [method for method in ("muon",) if quality.installed(method)]
    models, optimizers, labels = {}, {}, {}
    for method in methods + (["galore_svd"] if "galore" in methods else []):
        kind = "galore" if method == "galore_svd" else method
        models[method] = quality.build_model(args.smoke, 0).to(device)
        optimizers[method] = quality.make_optimizer(kind, models[method], TRAINING_LR, options.rank, options.scale,
                                                    options.galore_gap)
        labels[method] = quality.label(kind, options.rank) + (" SVD step" if method == "galore_svd" else "")
    config, params = models["adamw"].config, sum(p.numel() for p in models["adamw"].parameters())
    title = (f"Pre-training: Llama hidden {config.hidden_size}, {config.num_hidden_layers} layers, byte vocabulary "
             f"{config.vocab_size} ({params:,} parameters), batch {' x '.join(map(str, batch['input_ids'].shape))}"
             " (baseline AdamW)")
    steppers, optimizer_times = timed_steps(
        models, optimizers, lambda m, b: m(input_ids=b["input_ids"], labels=b["labels"]).loss, batch, device,
        {"galore": 1, "galore_svd": options.galore_gap})
    return Setting(steppers, optimizer_times, "adamw", labels, title, options.galore_gap)


def finetune_setting(args) -> Setting:
    """``finetune_quality.py``'s model, data and optimizers, on its longest training batch."""
    import finetune_quality as quality

    options, device = quality_options("finetune", args.smoke), torch.device(args.device)
    dm = quality.data_module(args.smoke, 0)
    dm.setup("fit")
    batch = max(dm.train_dataloader(), key=lambda b: b["input_ids"].shape[1])  # a full-length batch
    models, optimizers, labels = {}, {}, {}
    for method in quality.cost_methods():
        task, optimizers[method], _ = quality.build_task(method, TRAINING_LR, 0, options.rank, options.steps,
                                                         options.warmup, args.smoke)
        models[method] = task.model.to(device)
        labels[method] = quality.label(method, options.rank)
    params = sum(p.numel() for p in models["full_ft"].parameters())
    adapted = "/".join(dict.fromkeys(name.rsplit(".", 1)[-1] for name, _ in lora_modules(models["lora_adamw"])))
    backbone = "tiny BERT" if args.smoke else quality.MINILM.split("/")[-1]
    title = (f"Fine-tuning: {backbone} ({params / 1e6:.1f}M parameters), LoRA r={options.rank} on {adapted}, batch "
             f"{' x '.join(map(str, batch['input_ids'].shape))} (baseline plain LoRA + AdamW)")
    steppers, optimizer_times = timed_steps(models, optimizers, lambda m, b: m(**b).loss, batch, device, {})
    return Setting(steppers, optimizer_times, "lora_adamw", labels, title)


def training_rows(setting: str, repeats: int, args) -> list[dict]:
    """Every method's whole step against the baseline's, over the clean repeats; GaLore also amortised."""
    built = (pretrain_setting if setting == "pretrain" else finetune_setting)(args)
    times, clean = timing.time_interleaved(built.steppers, repeats, 0.0, args.wait_idle, warmup_repeats=args.warmup)
    kept = timing.clean_subset(times, clean)
    optimizer_kept = timing.clean_subset({n: v[-repeats:] for n, v in built.optimizer_times.items()}, clean)
    common = {"disturbed_repeats": repeats - sum(clean), "setting_title": built.title}
    rows = [{"setting": setting, "method": name, "label": built.labels[name], **summary(values, kept[built.baseline]),
             "optimizer_ms": 1e3 * statistics.median(optimizer_kept[name]), "repeats_used": len(values), **common}
            for name, values in kept.items()]
    if "galore" in kept and "galore_svd" in kept:
        values = amortised(kept["galore"], kept["galore_svd"], built.galore_gap)
        rows.append({"setting": setting, "method": "galore_amortised",
                     "label": built.labels["galore"] + f" amortised (1 SVD step per {built.galore_gap})",
                     **summary(values, kept[built.baseline]), "optimizer_ms": None, "repeats_used": len(values),
                     **common})
    return rows


def measure_training(args) -> dict[str, list[dict]]:
    rows = []
    for setting in args.settings:
        rows += training_rows(setting, args.repeats[0] if setting == "pretrain" else args.repeats[1], args)
        for row in rows:
            if row["setting"] == setting:
                print(f"{setting:9s} {row['label']:60s} {row['median_ms']:8.1f} ms  ratio {row['ratio']:.3f}",
                      flush=True)
    return {"train_step_speed.csv": rows}


# ------------------------------------------------------------------------------------------------ defaults-cost
#: (key, header) of the defaults-cost table
DEFAULTS_COST_COLUMNS = [
    ("shape", "shape"), ("adamw", "AdamW ms"), ("paper", "paper ms"), ("default", "default ms"),
    ("paper_vs_adamw", "paper / AdamW"), ("default_vs_adamw", "default / AdamW"),
    ("check_cost", "paper + check / paper"), ("default_vs_paper", "default / paper")]


def paper_step_without_check(optimizer: LoRAPreAdamW) -> None:
    """A step of the paper formula without the finite check: exactly the step before the defaults changed."""
    from lit_lowrank.optim.lora_pre import base

    real = base.LowRankOptimizerBase._finite
    base.LowRankOptimizerBase._finite = lambda self, params: {p: True for p in params}
    try:
        optimizer.step()
    finally:
        base.LowRankOptimizerBase._finite = real


def defaults_cost_row(shape: tuple[int, int], rank: int, args) -> dict:
    """AdamW, the paper formula with and without the finite check, and the default step on one p x q weight."""
    grad = torch.randn(shape)
    weights = {name: nn.Parameter(torch.randn(shape)) for name in ("adamw", "paper", "checked", "default")}
    paper_options = {"debias_second_moment": False, "update_bound": "none"}
    paper = LoRAPreAdamW([weights["paper"]], rank=rank, **paper_options)
    steps = {"adamw": torch.optim.AdamW([weights["adamw"]], foreach=True).step,
             "paper": lambda: paper_step_without_check(paper),
             "checked": LoRAPreAdamW([weights["checked"]], rank=rank, **paper_options).step,
             "default": LoRAPreAdamW([weights["default"]], rank=rank).step}
    for weight in weights.values():
        weight.grad = grad
    # the warm-up brings the factors to steady state (their values settle in a few steps)
    times, _ = timing.time_interleaved(steps, args.repeats, args.warmup, 0.0, rotate=False)
    ms = {name: 1e3 * statistics.median(values) for name, values in times.items()}

    def ratio(a: str, b: str) -> float:
        return timing.paired_ratio(times[a], times[b])

    return {"shape": f"{shape[0]}x{shape[1]}", "adamw": f"{ms['adamw']:.2f}", "paper": f"{ms['paper']:.2f}",
            "default": f"{ms['default']:.2f}", "paper_vs_adamw": f"{ratio('paper', 'adamw'):.2f}",
            "default_vs_adamw": f"{ratio('default', 'adamw'):.2f}", "check_cost": f"{ratio('checked', 'paper'):.3f}",
            "default_vs_paper": f"{ratio('default', 'paper'):.3f}"}


def measure_defaults_cost(args) -> dict[str, list[dict]]:
    print("\n".join(report.markdown_table([], DEFAULTS_COST_COLUMNS)))  # the header; a row per shape as measured
    rows = []
    with environment.library_warnings_silenced():  # the paper formula's warning
        for shape in args.shapes:
            rows.append(defaults_cost_row(shape, args.rank, args))
            print(report.markdown_table(rows[-1:], DEFAULTS_COST_COLUMNS)[-1], flush=True)
    return {"lora_pre_defaults_cost.csv": rows}
