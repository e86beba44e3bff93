"""Pre-training quality: a byte-level Llama on the standard library's source, AdamW vs low-rank optimizers.

The LoRA-Pre paper's main table at CPU scale, with the parameters in the block matrices as in a real LLM. Every
method trains the same Llama (hidden 128, MLP 352, 4 layers, 4 heads, tied byte vocabulary of 257: 836,864
parameters, 802,816 = 95.9% of them in the 28 block matrices, 32,896 in the embedding) from the same
initialisation (per seed) on the same token blocks in the same order: ``TextBlocksDataModule(source=
"python-source", tokenizer="bytes", block_size=256, batch_size=4)``, i.e. the standard library's ``.py`` files
(test folders and site-packages left out) plus the pydoc topics and docstrings, 13.7M bytes, split by a SHA-256 of
each file's path relative to the stdlib folder (51,188 training / 2,056 validation blocks on CPython 3.11). 1000
steps of 4 x 256 = 1024 tokens (1.02M tokens, 8% of the training bytes: no block is seen twice), linear warm-up
over the first 10% then cosine decay to 10% (``WarmupCosineLR``), no weight decay, no gradient clipping; Adam
betas (0.9, 0.999), eps 1e-8 wherever a method has them. Validation: token-weighted loss on 192 blocks spread
evenly over the validation split (49k bytes, the same for every run), every 200 steps; bits per byte = loss / ln 2.

Methods (``--rank`` r, default 32; the block matrices are 128 x 128 and 352 x 128; the embedding (= tied head)
and the norms get AdamW inside each optimizer, except in Adam-mini):
    adamw                  torch.optim.AdamW on every tensor
    adamw_scaled           the fair full-rank reference of the low-rank methods: AdamW with the block matrices' lr
                           multiplied by --scale (the learning-rate split of GaLore and LoRA-Pre Adam, full-rank
                           moments); the report gives every row's loss against AdamW and against it, per seed
    galore                 GaLoreAdamW (galore-torch) rank r, scale 0.25, projection refreshed every 200 steps
    lora_pre_adam          LoRAPreAdamW rank r with its defaults, scale 0.25 (GaLore's alpha, as the LoRA-Pre paper)
    lora_pre_adam_low      the same at rank r / 8
    lora_pre_adam_no_first_moment   control, not run by default: the default with beta1 = 0 on the block matrices
                           (m_t = g; the embedding and norms keep AdamW's betas): what the low-rank momentum adds
    lora_pre_adam_no_residual, lora_pre_adam_low_no_residual, lora_pre_muon_no_residual   the defaults until
                           2026-12-07: residual_step=False (the paper's first moment / momentum), rank r and r / 8
    lora_pre_muon          LoRAPreMuon rank r, scale_rule "adamw_rms" so one lr serves Muon and AdamW tensors
    muon                   full-rank reference of lora_pre_muon: torch.optim.Muon (momentum 0.95, Nesterov, 5
                           Newton-Schulz steps, run in float32 here) on the block matrices with
                           adjust_lr_fn="match_rms_adamw" (lr x 0.2 sqrt(max(p, q)): update RMS ~0.2 lr like
                           AdamW's, the rule of LoRA-Pre Muon's "adamw_rms"), plus torch.optim.AdamW on the other
                           tensors at the same lr, stepped together (``MuonWithAdamW``)
    apollo                 APOLLOAdamW (apollo-torch) rank r, channel-wise scaling, scale 1, random projection
                           refreshed every 200 steps (the APOLLO paper's setting: rank 1/4 of hidden)
    apollo_mini            APOLLO-Mini: the same optimizer at rank 1, tensor-wise scaling, scale 128 (the paper's)
    adam_mini              Adam_mini (adam-mini): one second moment per head (q, k), per output neuron (v, o, MLP),
                           per token (embedding) and per tensor (norms)
  not run by default (``--methods``):
    lora_pre_adam_adam_floor, lora_pre_adam_rms_clip    LoRA-Pre Adam's other update bounds
    lora_pre_adam_debias   the debiased second moment alone (update_bound="none")
    lora_pre_adam_paper, lora_pre_adam_low_paper   the paper's formula (debias_second_moment=False,
                           update_bound="none"), rank r and r / 8
  research rows (issue 26; ``--methods``, names canonicalised, so each is one stable set of run files):
    NAME@r=N               NAME (lora_pre_adam, lora_pre_muon, galore, apollo) at rank N instead of --rank
    lora_pre_variant@m=M,v=V[,mrank=K][,r=N]
                           LoRA-Pre Adam's step in plain torch with switchable moments (lora_pre_variants.py), block
                           matrices at scale x lr, the rest Adam at lr. M (first moment): factored (the spec),
                           dense (Adam's EMA), factored_residual (+ the part of g outside span(B) at full weight,
                           momentum-free), factored_residual_rows (the same outside the row space of A); K: m's
                           factors at K x r; V (second moment): factored_abs (the spec), dense_sq (Adam's v),
                           adafactor (row and column EMAs of g^2, p + q numbers)

Learning rates: each method's log-spaced 3-point grid on seed 0 with the full step budget, chosen by final
validation loss, up to two points added past an edge holding the best (``--extend 2``), then the chosen lr with seeds 1
and 2: about 55 runs. Each (method, lr, seed) runs in its own single-threaded process (``--threads 1``); its JSON
lands in ``--runs`` and is reused when present, so an interrupted sweep resumes, several invocations with
disjoint ``--methods`` can share the folder, and ``--report-only`` rebuilds the CSV / markdown / PNG from the runs.
The report states the protocol's wall time (first run's start to last run's end).

Time (2026-11-30, AMD EPYC, 2 cores shared with other jobs, load 3.5-6.5): one run took 153-221 s of CPU (AdamW
153, GaLore 155, LoRA-Pre Adam 185 / r/8 187, LoRA-Pre Muon 218, Muon 221, APOLLO 196, APOLLO-Mini 180, Adam-mini
177) and 205-387 s of wall time; on an idle core a run is ~2.3-3 min, and the whole protocol with two runs at a
time about 65-75 min (longer on a loaded machine).

    python benchmarks/pretrain_quality.py                 # whole protocol, two runs at a time (--workers 2)
    python benchmarks/pretrain_quality.py --report-only   # report from benchmarks/results/pretrain_quality_runs
    python benchmarks/pretrain_quality.py --smoke --out /tmp/bench   # seconds: tiny model, in-process

Research rows at a fixed lr: ``--lr METHOD=LR`` runs METHOD at that lr on every seed, without a grid (a bare
base such as ``lora_pre_muon=1e-2`` fixes each of its ``@r=N`` rows; ``--lrs`` gives one grid to every method). Give
them their own ``--out`` (the default ``--out`` is the committed report) and the shared ``--runs``; the report
then compares them with the folder's AdamW and adamw_scaled runs. The rows of issue 26, resumable:

    R=benchmarks/results/pretrain_quality_runs
    # adamw_scaled's protocol rows (its grid, then seeds 1 and 2), then the default report with them
    python benchmarks/pretrain_quality.py --methods adamw_scaled --runs $R --out /tmp/pretrain_scaled
    python benchmarks/pretrain_quality.py --report-only
    # rank sweeps of LoRA-Pre Adam (lr 3e-3) and LoRA-Pre Muon (lr 1e-2), seeds 0 1 2 (bash expands the braces)
    python benchmarks/pretrain_quality.py --methods lora_pre_adam@r={4,8,16,32,64,112} \
        lora_pre_muon@r={4,8,16,32,64,112} --lr lora_pre_adam=3e-3 lora_pre_muon=1e-2 --seeds 0 1 2 \
        --runs $R --out /tmp/pretrain_ranks
    # moment ablations of LoRA-Pre Adam at lr 3e-3, seeds 0 1 2 (the spec first: the prototype vs the library)
    python benchmarks/pretrain_quality.py --methods lora_pre_variant@m=factored,v=factored_abs \
        lora_pre_variant@m=dense,v=factored_abs lora_pre_variant@m=factored,v=dense_sq \
        lora_pre_variant@m=dense,v=dense_sq lora_pre_variant@m=factored_residual,v=factored_abs \
        lora_pre_variant@m=factored_residual_rows,v=factored_abs lora_pre_variant@m=factored,v=adafactor,mrank=2 \
        lora_pre_variant@m=factored_residual,v=adafactor lora_pre_variant@m=factored_residual,v=adafactor,mrank=2 \
        lora_pre_variant@m=factored_residual,v=dense_sq,mrank=2 \
        --lr lora_pre_variant=3e-3 --seeds 0 1 2 --runs $R --out /tmp/pretrain_moments

Where the sweep driver (sweep.py) has no ``--workers``, two invocations with disjoint method lists (balanced by
run time) use the two cores, then one report covers all their runs:

    R=benchmarks/results/pretrain_quality_runs
    python benchmarks/pretrain_quality.py --methods lora_pre_adam lora_pre_adam_low lora_pre_muon muon adamw_scaled \\
        --runs $R --out /tmp/pretrain_a > /tmp/pretrain_a.log 2>&1 &
    python benchmarks/pretrain_quality.py --methods adamw galore apollo apollo_mini adam_mini \\
        --runs $R --out /tmp/pretrain_b > /tmp/pretrain_b.log 2>&1 &
    wait; python benchmarks/pretrain_quality.py --report-only
"""

from __future__ import annotations

import argparse
import contextlib
import importlib.util
import inspect
import math
import statistics
import sys
import time
import warnings
from pathlib import Path
from typing import NamedTuple

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import environment  # noqa: E402
import lora_pre_variants  # noqa: E402
import report  # noqa: E402
import stats  # noqa: E402
import sweep  # noqa: E402

NAME = "pretrain_quality"
BETAS, EPS = (0.9, 0.999), 1e-8
BLOCK, BATCH = 256, 4  # 1024 tokens per step: one 1000-step run in ~2.5 min on one idle core
STEPS, WARMUP_SHARE, EVAL_EVERY = 1000, 0.1, 200
VAL_BLOCKS = 192  # validation blocks evaluated, spread evenly over the split (49k bytes, ~2 s per pass)
PROJECTION_GAP = 200  # GaLore's and APOLLO's update_proj_gap (their papers' value)
LLAMA = dict(model_type="llama", vocab_size=257, hidden_size=128, intermediate_size=352, num_hidden_layers=4,
             num_attention_heads=4, num_key_value_heads=4, max_position_embeddings=BLOCK, tie_word_embeddings=True)
SMOKE_LLAMA = dict(LLAMA, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
                   num_key_value_heads=2, max_position_embeddings=32)
# Log-spaced grids (x ~3.3 apart) around each method's likely best. GaLore and LoRA-Pre Adam scale their matrices'
# update by 0.25 and APOLLO by ~0.5 (sqrt(r / 128)), so their usual lr is high (GaLore's and APOLLO's papers: 1e-2).
# AdamW and Adam-mini are centred there too: in the timing runs AdamW at 3e-3 ended far behind GaLore at 1e-2, whose
# embedding gets the whole 1e-2. Both Muons: LoRA-Pre Muon's best in the previous setting was 1e-2. LoRA-Pre Adam
# (all options) keeps its previous grid, whose best was 3e-3 (9e-4 for the paper-literal rows).
GRIDS = {
    "adamw": [3e-3, 1e-2, 3e-2],
    "galore": [3e-3, 1e-2, 3e-2],
    "lora_pre_adam": [9e-4, 3e-3, 1e-2],
    "lora_pre_adam_low": [9e-4, 3e-3, 1e-2],
    "lora_pre_muon": [3e-3, 1e-2, 3e-2],
    "muon": [3e-3, 1e-2, 3e-2],
    "apollo": [3e-3, 1e-2, 3e-2],
    "apollo_mini": [3e-3, 1e-2, 3e-2],
    "adam_mini": [3e-3, 1e-2, 3e-2],
    "lora_pre_adam_debias": [9e-4, 3e-3, 1e-2],
    "lora_pre_adam_adam_floor": [9e-4, 3e-3, 1e-2],
    "lora_pre_adam_rms_clip": [9e-4, 3e-3, 1e-2],
    "lora_pre_adam_paper": [9e-4, 3e-3, 1e-2],
    "lora_pre_adam_low_paper": [9e-4, 3e-3, 1e-2],
    "lora_pre_adam_no_residual": [9e-4, 3e-3, 1e-2],
    "lora_pre_adam_low_no_residual": [9e-4, 3e-3, 1e-2],
    "lora_pre_adam_no_first_moment": [9e-4, 3e-3, 1e-2],
    "lora_pre_muon_no_residual": [3e-3, 1e-2, 3e-2],
    # AdamW with the block matrices at scale x lr: 3e-3 (matrices at 7.5e-4, near AdamW's best 9e-4) reached 1.475
    # at seed 0 outside the protocol, so the grid is centred there
    "adamw_scaled": [9e-4, 3e-3, 1e-2],
}
PAPER_METHODS = ["adamw", "galore", "lora_pre_adam", "lora_pre_adam_low", "lora_pre_muon"]
# Full-rank Muon (LoRA-Pre Muon's reference) and the other memory-efficient optimizers of the LoRA-Pre paper's table
REFERENCE_METHODS = ["muon", "apollo", "apollo_mini", "adam_mini"]
# LoRA-Pre Adam's default until 2026-12-07 (the paper's first moment: no residual step), kept in the table so that
# the change of default is measured, not asserted
PREVIOUS_DEFAULT_METHODS = ["lora_pre_adam_no_residual", "lora_pre_adam_low_no_residual", "lora_pre_muon_no_residual"]
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
    "lora_pre_adam_paper": {"debias_second_moment": False, "update_bound": "none", "residual_step": False},
    "lora_pre_adam_low_paper": {"debias_second_moment": False, "update_bound": "none", "residual_step": False},
    "lora_pre_adam_no_residual": {"residual_step": False},
    "lora_pre_adam_low_no_residual": {"residual_step": False},
}
CONTROL_METHODS = ["adamw_scaled"]  # AdamW's memory and step time: left out of memory.py and step_timing.py training
#: The package (the ``bench`` extra) each third-party method imports; its rows are left out where it is missing.
REQUIRES = {"galore": "galore_torch", "apollo": "apollo_torch", "apollo_mini": "apollo_torch",
            "adam_mini": "adam_mini"}


def installed(method: str) -> bool:
    """Whether the package ``method`` needs (if any) is importable."""
    module = REQUIRES.get(method.partition("@")[0])
    return module is None or importlib.util.find_spec(module) is not None


def cost_methods(references: bool = False) -> list[str]:
    """The methods whose optimizer state or step differ (memory.py, step_timing.py training): the paper's rows and the
    paper formula's step (no floor), plus with ``references`` full-rank Muon, APOLLO, APOLLO-Mini and Adam-mini;
    the other LoRA-Pre Adam options cost what the default costs."""
    methods = PAPER_METHODS + ["lora_pre_adam_paper"] + (REFERENCE_METHODS if references else [])
    return [m for m in methods if installed(m)]


def default_methods() -> list[str]:
    """The sweep's methods: AdamW and its fair counterpart ``adamw_scaled`` (the learning-rate split of GaLore and
    LoRA-Pre Adam with full-rank moments), the paper's other rows and the reference optimizers (whose packages are
    installed)."""
    order = PAPER_METHODS[:1] + CONTROL_METHODS + PAPER_METHODS[1:] + PREVIOUS_DEFAULT_METHODS + REFERENCE_METHODS
    return [m for m in order if installed(m)]


# ------------------------------------------------------------------------------------ research method names
# Research rows (issue 26), never in the default list: a registered method at another rank (``galore@r=64``), or a
# LoRA-Pre Adam variant of lora_pre_variants.py (``lora_pre_variant@m=factored_residual,v=adafactor,mrank=2``).
# The name is the run files' name, so it is canonicalised (keys in a fixed order, defaults left out) and says
# everything that changes the run: two spellings of one run never make two files, and an explicit ``r=`` does not
# depend on --rank.
RANKED_METHODS = ("lora_pre_adam", "lora_pre_muon", "galore", "apollo")
VARIANT_METHOD = "lora_pre_variant"
VARIANT_KEYS = ("m", "v", "mrank", "r")


class MethodName(NamedTuple):
    """A parsed method name: ``base`` (a key of GRIDS or ``lora_pre_variant``), an explicit rank, the variant."""

    base: str
    rank: int | None = None
    variant: lora_pre_variants.Variant | None = None

    @property
    def name(self) -> str:
        """The canonical spelling."""
        options = [self.variant.name] if self.variant is not None else []
        options += [f"r={self.rank}"] if self.rank is not None else []
        return self.base + ("@" + ",".join(options) if options else "")


def parse_method(name: str) -> MethodName:
    """``NAME``, ``NAME@r=N`` (NAME in RANKED_METHODS) or ``lora_pre_variant[@m=...,v=...,mrank=K,r=N]`` (keys in any
    order; m and v default to the spec's ``factored`` / ``factored_abs``); a ValueError naming what is wrong."""
    base, at, rest = name.partition("@")
    options: dict[str, str] = {}
    for item in filter(None, rest.split(",")):
        key, equals, value = item.partition("=")
        if not equals or key in options:
            raise ValueError(f"{name!r}: {item!r} is not a new key=value option")
        options[key] = value
    allowed = VARIANT_KEYS if base == VARIANT_METHOD else ("r",) if base in RANKED_METHODS else ()
    if base not in GRIDS and base != VARIANT_METHOD:
        raise ValueError(f"{name!r}: unknown method {base!r}; one of {', '.join([*GRIDS, VARIANT_METHOD])}")
    if set(options) - set(allowed) or (at and not options):
        raise ValueError(f"{name!r}: {base} takes {'options ' + ', '.join(allowed) if allowed else 'no options'}")

    def positive(key: str) -> int | None:
        if key not in options:
            return None
        if not options[key].isdigit() or int(options[key]) < 1:
            raise ValueError(f"{name!r}: {key} must be a positive integer, got {options[key]!r}")
        return int(options[key])

    variant = None
    if base == VARIANT_METHOD:
        variant = lora_pre_variants.Variant(options.get("m", "factored"), options.get("v", "factored_abs"),
                                            positive("mrank") or 1)
        try:
            lora_pre_variants.check_variant(variant)
        except ValueError as error:
            raise ValueError(f"{name!r}: {error}") from None
    return MethodName(base, positive("r"), variant)


def canonical_method(name: str) -> str:
    """``--methods``' type: the canonical spelling of a method name, or argparse's error for a bad one."""
    try:
        return parse_method(name).name
    except ValueError as error:
        raise argparse.ArgumentTypeError(str(error)) from None


def method_rank(method: str, rank: int) -> int:
    """The run's ``rank`` field: the row's explicit ``r=``, else --rank (as always recorded: the low rows run at
    r / 8 and say so in their label)."""
    return parse_method(method).rank or rank


def method_grid(method: str) -> list[float]:
    """The default lr grid of ``method``: its base's (LoRA-Pre Adam's for the variants, which share its scale)."""
    base = parse_method(method).base
    return GRIDS["lora_pre_adam" if base == VARIANT_METHOD else base]


def fixed_lrs(methods: list[str], items: list[str]) -> dict[str, float]:
    """``--lr METHOD=LR`` items resolved for ``methods``: a key names a method exactly or the base of research rows
    (``lora_pre_muon=1e-2`` fixes ``lora_pre_muon`` and every ``lora_pre_muon@r=N``); an exact key wins. A
    ValueError for an item that is malformed or fixes none of ``methods`` (a typo would silently run the grid)."""
    by_key: dict[str, float] = {}
    for item in items:
        key, _, value = item.rpartition("=")  # the last '=': a variant's own name holds some
        try:  # a bare base stays itself (lora_pre_variant alone would otherwise read as the spec's variant)
            key, lr = (parse_method(key).name if "@" in key else parse_method(key).base), float(value)
        except ValueError:
            raise ValueError(f"--lr {item!r}: expected METHOD=LR with a known method, e.g. lora_pre_adam=3e-3") \
                from None
        if not lr > 0:
            raise ValueError(f"--lr {item!r}: the learning rate must be > 0")
        by_key[key] = lr
    bases = {method: parse_method(method).base for method in methods}
    unused = [key for key in by_key if key not in methods and key not in bases.values()]
    if unused:
        raise ValueError(f"--lr {', '.join(unused)}: no method of --methods is or starts with that name")
    return {method: by_key.get(method, by_key.get(bases[method])) for method in methods
            if method in by_key or bases[method] in by_key}


def label(method: str, rank: int) -> str:
    """The row's name in the report; ``rank`` is --rank (research rows with ``r=`` say their own)."""
    parsed = parse_method(method)
    rank = parsed.rank or rank
    if parsed.variant is not None:
        return f"LoRA-Pre Adam variant r={rank}: {parsed.variant.describe()} (benchmark prototype)"
    if parsed.rank is not None and parsed.base == "lora_pre_adam":
        return f"LoRA-Pre Adam r={rank} (default)"
    method = parsed.base
    return {
        "adamw": "AdamW",
        "galore": f"GaLore r={rank}",
        "lora_pre_adam": f"LoRA-Pre Adam r={rank} (default: residual step, debiased, v_floor)",
        "lora_pre_adam_low": f"LoRA-Pre Adam r={max(1, rank // 8)} (default)",
        "lora_pre_muon": f"LoRA-Pre Muon r={rank} (default: residual step)",
        "lora_pre_muon_no_residual": f"LoRA-Pre Muon r={rank}, no residual step (default until 2026-12-07)",
        "muon": "Muon (full rank, torch.optim.Muon + AdamW)",
        "apollo": f"APOLLO r={rank} (channel-wise)",
        "apollo_mini": "APOLLO-Mini r=1 (tensor-wise)",
        "adam_mini": "Adam-mini",
        "lora_pre_adam_adam_floor": f"LoRA-Pre Adam r={rank}, debiased, adam_floor",
        "lora_pre_adam_rms_clip": f"LoRA-Pre Adam r={rank}, debiased, rms_clip",
        "lora_pre_adam_debias": f"LoRA-Pre Adam r={rank}, debiased, no bound",
        "lora_pre_adam_paper": f"LoRA-Pre Adam r={rank}, paper-literal (unsafe)",
        "lora_pre_adam_low_paper": f"LoRA-Pre Adam r={max(1, rank // 8)}, paper-literal (unsafe)",
        "lora_pre_adam_no_residual": f"LoRA-Pre Adam r={rank}, no residual step (default until 2026-12-07)",
        "lora_pre_adam_low_no_residual": f"LoRA-Pre Adam r={max(1, rank // 8)}, no residual step (previous default)",
        "lora_pre_adam_no_first_moment": f"LoRA-Pre Adam r={rank}, no first moment on the matrices (control)",
        "adamw_scaled": "AdamW, block matrices at lr x scale (fair reference)",
    }[method]


def parse_args(argv=None) -> argparse.Namespace:
    # conflict_handler="resolve": --methods is redefined below over sweep.py's (which only takes GRIDS' names)
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], epilog=__doc__.split("\n\n", 1)[1],
                                     formatter_class=argparse.RawDescriptionHelpFormatter, conflict_handler="resolve")
    sweep.add_sweep_arguments(parser, NAME, GRIDS)
    parser.add_argument("--methods", nargs="+", type=canonical_method, metavar="METHOD",
                        help=f"methods to run: {', '.join(GRIDS)}; research rows: NAME@r=N for NAME in "
                             f"{', '.join(RANKED_METHODS)}, and {VARIANT_METHOD}@m=M,v=V[,mrank=K][,r=N] with M in "
                             f"{', '.join(lora_pre_variants.M_MODES)} and V in {', '.join(lora_pre_variants.V_MODES)} "
                             "(see the module docstring)")
    parser.add_argument("--lr", nargs="+", action="extend", default=[], metavar="METHOD=LR",
                        help="run METHOD at this one lr on every seed, no grid (wins over --lrs); METHOD may be the "
                             "base of research rows: lora_pre_muon=1e-2 fixes every lora_pre_muon@r=N")
    # Packages that are missing leave their rows out. One thread per run and two runs at once use two cores
    # without oversubscribing them (``workers`` is read by sweep drivers that have a --workers option). Two grid
    # points past an edge: with one, AdamW's best lr (9e-4) was still at the edge of its extended grid.
    parser.set_defaults(methods=default_methods(), threads=1, workers=2, extend=2)
    parser.add_argument("--steps", type=int, default=STEPS, help="optimizer steps (of BATCH x BLOCK tokens)")
    parser.add_argument("--warmup", type=int,
                        help=f"linear warm-up steps (default: {WARMUP_SHARE * 100:g}%% of --steps)")
    parser.add_argument("--eval-every", type=int, default=EVAL_EVERY, help="steps between validation passes")
    parser.add_argument("--rank", type=int, default=32, help="rank r (GaLore, LoRA-Pre, APOLLO); the low row: r/8")
    parser.add_argument("--galore-gap", type=int, default=PROJECTION_GAP, help="GaLore's and APOLLO's update_proj_gap")
    parser.add_argument("--scale", type=float, default=0.25, help="GaLore / LoRA-Pre Adam update scale (alpha)")
    parser.add_argument("--smoke", action="store_true", help="tiny model and data, 6 steps, in-process")
    args = parser.parse_args(argv)
    if args.smoke:
        args.steps, args.warmup, args.eval_every, args.rank, args.seeds = 6, 2, 3, 8, [0, 1]
        args.extend, args.in_process, args.wait_load = 0, True, 0.0
        args.lrs = args.lrs or [1e-2]
    args.warmup = round(WARMUP_SHARE * args.steps) if args.warmup is None else args.warmup
    args.runs = args.runs or args.out / f"{NAME}_runs"
    args.methods = list(dict.fromkeys(args.methods))  # two spellings of one method: one row
    try:
        fixed = fixed_lrs(args.methods, args.lr)
    except ValueError as error:
        parser.error(str(error))
    # Each method's grid: its fixed lr, else --lrs, else its default grid (a one-point grid has no extension, so
    # the sweep runs that lr on every seed). sweep_main reads --lrs before the grids: it is folded in here.
    args.grids = {m: [fixed[m]] if m in fixed else list(args.lrs or method_grid(m)) for m in args.methods}
    args.lrs = None
    return args


# ------------------------------------------------------------------------------------------------ one run
def data_module(smoke: bool, seed: int):
    from lit_lowrank.data import TextBlocksDataModule

    if smoke:  # one standard-library source file: ~100k bytes, no corpus build
        import argparse as some_module

        return TextBlocksDataModule(source=inspect.getfile(some_module), tokenizer="bytes", block_size=32,
                                    batch_size=4, max_val_blocks=8, seed=seed)
    return TextBlocksDataModule(source="python-source", tokenizer="bytes", block_size=BLOCK, batch_size=BATCH,
                                seed=seed)


def validation_blocks(blocks: torch.Tensor, count: int = VAL_BLOCKS) -> torch.Tensor:
    """``count`` blocks spread evenly over the validation split: every held-out file is represented, at a
    fraction of the cost of evaluating all of them (the split holds ~2000 blocks)."""
    if len(blocks) <= count:
        return blocks
    return blocks[torch.linspace(0, len(blocks) - 1, count).round().long()]


def build_model(smoke: bool, seed: int):
    from lit_lowrank.backbones import transformers_backbone

    torch.manual_seed(seed)
    return transformers_backbone(config=SMOKE_LLAMA if smoke else LLAMA, tokenizer=False).model.train()


def model_name() -> str:
    """The pre-trained model in words (for memory.py's and the reports' titles)."""
    return (f"Llama hidden {LLAMA['hidden_size']}, {LLAMA['num_hidden_layers']} layers, byte vocabulary "
            f"{LLAMA['vocab_size']}")


def parameter_counts(model) -> dict[str, int]:
    """Parameters in the block matrices (the low-rank methods' group), in the embedding (= tied head), elsewhere."""
    from lit_lowrank.optim import lowrank_param_groups

    matrices, _ = lowrank_param_groups(model)
    embedding = model.get_input_embeddings().weight
    total = sum(p.numel() for p in model.parameters())
    counts = {"matrix_params": sum(p.numel() for p in matrices["params"]), "embedding_params": embedding.numel()}
    return {**counts, "other_params": total - sum(counts.values()), "total_params": total}


def newton_schulz_float32(matrix: torch.Tensor, coefficients: tuple[float, float, float], steps: int,
                          eps: float) -> torch.Tensor:
    """The quintic Newton-Schulz orthogonalisation of ``torch.optim.Muon`` (same coefficients and step count, handed
    over by it), in float32: ``X <- a X + (b G + c G^2) X`` with ``G = X X^T``, ``X`` the wide orientation of the
    matrix scaled to unit Frobenius norm."""
    a, b, c = coefficients
    tall = matrix.size(0) > matrix.size(1)
    x = matrix.float().T if tall else matrix.float()
    x = x / x.norm().clamp(min=eps)
    for _ in range(steps):
        gram = x @ x.T
        x = a * x + (b * gram + c * gram @ gram) @ x
    return x.T if tall else x


@contextlib.contextmanager
def float32_newton_schulz():
    """Run ``torch.optim.Muon``'s steps with :func:`newton_schulz_float32` in place of its bfloat16 iteration.

    torch casts to bfloat16 for GPUs; on a CPU without bfloat16 matrix units each bfloat16 matmul is ~4x slower
    than float32, and Muon's step took 650 ms of a 770 ms training step here (60 ms in float32). float32 is also
    what LoRA-Pre Muon uses, so the two differ in the momentum's rank only. The swap is of a private function
    of torch 2.14 (``torch.optim._muon._zeropower_via_newtonschulz``); a torch without it fails loudly here."""
    from torch.optim import _muon

    original = _muon._zeropower_via_newtonschulz
    _muon._zeropower_via_newtonschulz = newton_schulz_float32
    try:
        yield
    finally:
        _muon._zeropower_via_newtonschulz = original


class MuonWithAdamW(torch.optim.Optimizer):
    """``torch.optim.Muon`` on the block matrices and ``torch.optim.AdamW`` on the other tensors, stepped as one.

    One learning rate serves both: Muon's ``adjust_lr_fn="match_rms_adamw"`` multiplies it by
    ``0.2 sqrt(max(p, q))`` for a ``p x q`` matrix, which brings the orthogonalised update's RMS to ~0.2 lr,
    about AdamW's (Moonlight's rule, the same as LoRA-Pre Muon's ``scale_rule="adamw_rms"``). Muon's
    Newton-Schulz runs in float32 (:func:`float32_newton_schulz`).
    """

    def __init__(self, muon: torch.optim.Muon, adamw: torch.optim.AdamW) -> None:
        # Optimizer.__init__ is not called: the groups and the state belong to the two inner optimizers, and this
        # object only shows them as one, so WarmupCosineLR (which wants an Optimizer) scales every group's lr.
        self.optimizers = (muon, adamw)
        self.param_groups = muon.param_groups + adamw.param_groups
        self.defaults = {}

    @property
    def state(self) -> dict:
        return {**self.optimizers[0].state, **self.optimizers[1].state}

    def zero_grad(self, set_to_none: bool = True) -> None:
        for optimizer in self.optimizers:
            optimizer.zero_grad(set_to_none=set_to_none)

    @torch.no_grad()
    def step(self, closure=None):
        muon, adamw = self.optimizers
        with float32_newton_schulz():
            muon.step()
        adamw.step()


def adamw_optimizer(params, lr: float) -> torch.optim.AdamW:
    return torch.optim.AdamW(params, lr=lr, betas=BETAS, eps=EPS, weight_decay=0.0)


def apollo_optimizer(matrices, others, lr: float, rank: int, gap: int, mini: bool):
    """APOLLOAdamW with the APOLLO paper's settings: rank r channel-wise scaling at scale 1, or APOLLO-Mini (rank 1,
    tensor-wise, scale 128); random projections refreshed every ``gap`` steps; the rest plain Adam in it."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # it imports bitsandbytes, which warns about missing GPU libraries
        from apollo_torch import APOLLOAdamW
    options = dict(rank=1, scale_type="tensor", scale=128) if mini else dict(rank=rank, scale_type="channel", scale=1)
    groups = [{"params": matrices, "proj": "random", "proj_type": "std", "update_proj_gap": gap, **options},
              {"params": others}]
    return APOLLOAdamW(groups, lr=lr, betas=BETAS, eps=EPS, weight_decay=0.0)


def adam_mini_optimizer(model, lr: float):
    """Adam_mini on the named parameters; it recognises Llama's names (embed_tokens, q/k/v/o_proj, mlp)."""
    from adam_mini import Adam_mini

    config = model.config
    return Adam_mini(model.named_parameters(), lr=lr, betas=BETAS, eps=EPS, weight_decay=0.0,
                     dim=config.hidden_size, n_heads=config.num_attention_heads,
                     n_kv_heads=config.num_key_value_heads, verbose=False)


def make_optimizer(method: str, model, lr: float, rank: int, scale: float, galore_gap: int):
    from lit_lowrank.optim import LoRAPreAdamW, LoRAPreMuon, lowrank_param_groups

    parsed = parse_method(method)  # a research row: its base method (or the variant) at its own rank
    method, rank = parsed.base, parsed.rank or rank
    matrices, others = (group["params"] for group in lowrank_param_groups(model, rank=rank))
    if method == "lora_pre_adam_no_first_moment":  # beta1 = 0 on the block matrices: m_t = g, v factored as usual
        return LoRAPreAdamW([{"params": matrices, "betas": (0.0, BETAS[1])}, {"params": others, "lowrank": False}],
                            lr=lr, betas=BETAS, eps=EPS, weight_decay=0.0, scale=scale, rank=rank)
    if parsed.variant is not None:
        # the same parameter split as LoRAPreAdamW's: block matrices at scale x lr, the rest plain Adam at lr
        return lora_pre_variants.LoRAPreVariant([{"params": matrices, "lowrank": True}, {"params": others}], lr=lr,
                                                rank=rank, scale=scale, variant=parsed.variant, betas=BETAS, eps=EPS)
    if method == "adamw":
        return adamw_optimizer(model.parameters(), lr)
    if method == "adamw_scaled":
        return adamw_optimizer([{"params": matrices, "lr": lr * scale}, {"params": others}], lr)
    if method == "muon":
        muon = torch.optim.Muon(matrices, lr=lr, weight_decay=0.0, adjust_lr_fn="match_rms_adamw")
        return MuonWithAdamW(muon, adamw_optimizer(others, lr))
    if method in ("apollo", "apollo_mini"):
        return apollo_optimizer(matrices, others, lr, rank, galore_gap, mini=method == "apollo_mini")
    if method == "adam_mini":
        return adam_mini_optimizer(model, lr)
    if method == "galore":
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            from galore_torch import GaLoreAdamW
        groups = [{"params": matrices, "rank": rank, "update_proj_gap": galore_gap, "scale": scale,
                   "proj_type": "std"}, {"params": others}]
        return GaLoreAdamW(groups, lr=lr, betas=BETAS, eps=EPS, weight_decay=0.0, no_deprecation_warning=True)
    if method in ("lora_pre_muon", "lora_pre_muon_no_residual"):
        return LoRAPreMuon(model, lr=lr, rank=rank, adamw_lr=lr, adamw_betas=BETAS, adamw_eps=EPS,
                           scale_rule="adamw_rms", residual_step=method == "lora_pre_muon")
    return LoRAPreAdamW(model, lr=lr, betas=BETAS, eps=EPS, weight_decay=0.0, scale=scale,
                        rank=max(1, rank // 8) if method.startswith("lora_pre_adam_low") else rank,
                        **LORA_PRE_ADAM_OPTIONS[method])


def optimizer_state_bytes(optimizer) -> int:
    """``state_bytes()`` where the optimizer has it; else the bytes of every state tensor it holds after a step:
    moments, Adam-mini's and APOLLO's scalars, GaLore's and APOLLO's projection matrices (held in a projector
    object), but not step counters (Python ints in LoRA-Pre)."""
    if hasattr(optimizer, "state_bytes"):
        return int(optimizer.state_bytes().total)
    total = 0
    for state in optimizer.state.values():
        for key, value in state.items():
            if key == "projector" and getattr(value, "ortho_matrix", None) is not None:
                total += value.ortho_matrix.nbytes
            elif isinstance(value, torch.Tensor) and key != "step":
                total += value.nbytes
    return total


def train_batches(dm):
    epoch = 0
    while True:
        loader = dm.train_dataloader()
        loader.sampler.set_epoch(epoch)
        yield from loader
        epoch += 1


def evaluate(model, blocks: torch.Tensor, batch_size: int = 32) -> float:
    """Token-weighted mean next-token loss over ``blocks`` (as CausalLMTask's val/loss)."""
    model.eval()
    total, count = 0.0, 0
    with torch.no_grad():
        for batch in blocks.split(batch_size):
            tokens = batch[:, 1:].numel()  # every position but the first is predicted; no padding
            total += float(model(input_ids=batch, labels=batch).loss) * tokens
            count += tokens
    model.train()
    return total / count


def train_step(model, optimizer, scheduler, batch) -> float:
    optimizer.zero_grad(set_to_none=True)
    loss = model(input_ids=batch["input_ids"], labels=batch["labels"]).loss
    loss.backward()
    optimizer.step()
    scheduler.step()
    return loss.detach().item()


def train(spec: dict, dm, model, optimizer) -> tuple[list[dict], list[float], bool]:
    """The training loop: validation curve, step times, whether the loss went non-finite."""
    from lit_lowrank.optim import WarmupCosineLR

    scheduler = WarmupCosineLR(optimizer, warmup_steps=spec["warmup"], total_steps=spec["steps"], min_ratio=0.1)
    val = validation_blocks(dm.val_blocks)
    curve = [{"step": 0, "val_loss": evaluate(model, val), "train_loss": None}]
    batches, window, step_times = train_batches(dm), [], []
    for step in range(1, spec["steps"] + 1):
        batch = next(batches)
        start = time.perf_counter()
        window.append(train_step(model, optimizer, scheduler, batch))
        step_times.append(time.perf_counter() - start)
        if not math.isfinite(window[-1]):
            return curve, step_times, True
        if step % spec["eval_every"] == 0 or step == spec["steps"]:
            curve.append({"step": step, "val_loss": evaluate(model, val), "train_loss": stats.mean(window)})
            window = []
    return curve, step_times, not math.isfinite(curve[-1]["val_loss"])


def run_one(spec: dict) -> dict:
    torch.set_num_threads(spec["threads"])
    started_at, started, cpu_started = time.time(), time.perf_counter(), environment.cpu_seconds()
    dm = data_module(spec["smoke"], spec["seed"])
    dm.setup("fit")
    model = build_model(spec["smoke"], spec["seed"])
    optimizer = make_optimizer(spec["method"], model, spec["lr"], spec["rank"], spec["scale"], spec["galore_gap"])
    rss_before = environment.peak_rss_mib()
    curve, step_times, diverged = train(spec, dm, model, optimizer)
    final = float("inf") if diverged else curve[-1]["val_loss"]
    return {
        **{k: spec[k] for k in ("method", "lr", "seed", "steps", "warmup")},
        "rank": method_rank(spec["method"], spec["rank"]),
        "label": label(spec["method"], spec["rank"]),
        "final_val_loss": final,
        "final_val_bpb": final / math.log(2),
        "final_val_ppl": math.exp(min(final, 50.0)),
        "diverged": diverged,
        "curve": curve,
        "state_bytes": optimizer_state_bytes(optimizer),
        "peak_rss_mib": environment.peak_rss_mib(),
        "rss_before_training_mib": rss_before,
        "step_ms_median": 1e3 * statistics.median(step_times),
        "wall_s": time.perf_counter() - started,
        "cpu_s": environment.cpu_seconds() - cpu_started,
        "started_at": started_at,
        "finished_at": time.time(),
        "threads": spec["threads"],
        "versions": {name: environment.version(name)
                     for name in ("torch", "galore-torch", "apollo-torch", "adam-mini")},
        "train_blocks": int(dm.train_blocks.shape[0]),
        "val_blocks": int(dm.val_blocks.shape[0]),
        "val_blocks_evaluated": int(validation_blocks(dm.val_blocks).shape[0]),
        **parameter_counts(model),
    }


# ----------------------------------------------------------------------------------------- sweep, report
def score(result: dict) -> float:
    loss = result.get("final_val_loss", float("inf"))
    return loss if loss == loss and not result.get("diverged") else float("inf")  # NaN -> inf


def describe(result: dict) -> str:
    if "error" in result:
        return "FAILED: " + result["error"][-500:]
    return (f"val loss {result['final_val_loss']:.4f} ({result['final_val_loss'] / math.log(2):.3f} bits/byte) "
            f"({result.get('wall_s', 0):.0f} s)")


def runner(args):
    base = dict(steps=args.steps, warmup=args.warmup, eval_every=args.eval_every, rank=args.rank, scale=args.scale,
                galore_gap=args.galore_gap, threads=args.threads, smoke=args.smoke)
    return sweep.make_runner(Path(__file__).resolve(), args.runs, base, run_one, describe, args.in_process,
                             args.wait_load)


#: The full-rank references every row is compared with, paired by seed (same seed: same initialisation and data
#: order). adamw_scaled is the fair one for the low-rank methods: their learning-rate split with full-rank moments.
REFERENCES = ("adamw", "adamw_scaled")


def chosen_losses(runs: list[dict], method: str, lr: float, seeds: list[int]) -> dict[int, float]:
    """Final validation loss per seed of ``method`` at ``lr``."""
    return {r["seed"]: r["final_val_loss"] for r in runs if r["method"] == method and r["lr"] == lr
            and r["seed"] in seeds}


def reference_columns(method: str, losses: dict[int, float], state_bytes: int | None, reference_runs: list[dict],
                      seeds: list[int]) -> dict:
    """A row's differences against each of REFERENCES (at the reference's chosen lr; blank where it has no runs):
    ``vs_REF`` the difference of the means over each one's seeds, ``vs_REF_paired_mean`` / ``_std`` / ``_per_seed``
    the per-seed differences over the seeds both have (negative: lower loss than the reference), and the row's
    optimizer state over AdamW's."""
    columns: dict = {}
    chosen = sweep.choose(reference_runs, score, seeds[0])
    for reference in REFERENCES:
        if reference == method or reference not in chosen:
            continue
        theirs = chosen_losses(reference_runs, reference, chosen[reference], seeds)
        paired = [losses[seed] - theirs[seed] for seed in sorted(losses) if seed in theirs]
        columns[f"vs_{reference}"] = stats.mean(list(losses.values())) - stats.mean(list(theirs.values()))
        columns[f"vs_{reference}_paired_mean"] = stats.mean(paired) if paired else None
        columns[f"vs_{reference}_paired_std"] = stats.std(paired)
        columns[f"vs_{reference}_per_seed"] = " / ".join(
            f"{losses[seed] - theirs[seed]:+.3f}" for seed in sorted(losses) if seed in theirs)
    adamw = [r for r in reference_runs if r["method"] == "adamw" and r.get("state_bytes")]
    if adamw and state_bytes:
        columns["state_vs_adamw"] = state_bytes / adamw[0]["state_bytes"]
    return columns


def summarise(args, runs: list[dict], reference_runs: list[dict] | None = None) -> tuple[list[dict], list[dict], dict]:
    """One row per method at its chosen lr (with its differences against REFERENCES, taken from
    ``reference_runs``: by default ``runs``), every run's row for the CSV, and the chosen lrs."""
    reference_runs = runs if reference_runs is None else reference_runs
    chosen = sweep.choose(runs, score, args.seeds[0])
    summary = []
    for method in [m for m in args.methods if m in chosen]:
        lr = chosen[method]
        final = sorted((r for r in runs if r["method"] == method and r["lr"] == lr and r["seed"] in args.seeds),
                       key=lambda r: r["seed"])
        losses = [r["final_val_loss"] for r in final]
        grid = sorted((r["lr"], r["final_val_loss"]) for r in runs
                      if r["method"] == method and r["seed"] == args.seeds[0])
        summary.append({
            "method": label(method, args.rank),
            "key": method,
            "lr": lr,
            "seeds": len(final),
            "val_loss_mean": stats.mean(losses),
            "val_loss_std": stats.std(losses),
            "val_bpb_mean": stats.mean(losses) / math.log(2),
            "val_ppl_mean": stats.mean([math.exp(min(x, 50)) for x in losses]),
            "val_bpb_per_seed": " / ".join(f"{x / math.log(2):.4f}" for x in losses),
            "lr_grid": ", ".join(f"{g:g}: {v:.3f}" for g, v in grid),
            "state_MiB": final[0].get("state_bytes", 0) / 2**20 if final else None,
            "peak_rss_MiB": stats.mean([r["peak_rss_mib"] for r in final if "peak_rss_mib" in r]),
            "step_ms": stats.mean([r["step_ms_median"] for r in final if "step_ms_median" in r]),
            "run_s": stats.mean([r["wall_s"] for r in final if "wall_s" in r]),
            **reference_columns(method, {r["seed"]: r["final_val_loss"] for r in final},
                                final[0].get("state_bytes") if final else None, reference_runs, args.seeds),
        })
    rows = [{k: v for k, v in run.items() if k != "curve"} for run in runs]
    return summary, rows, chosen


def plot(args, runs: list[dict], chosen: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, (curves, grid_ax) = plt.subplots(1, 2, figsize=(13, 5), gridspec_kw={"width_ratios": [3, 2]})
    shown = [m for m in args.methods if m in chosen]
    palette = 10 if len(shown) <= 10 else 20  # research reports have more rows than tab10 has colours
    colors = plt.get_cmap(f"tab{palette}")
    for index, method in enumerate(shown):
        color = colors(index % palette)
        chosen_runs = [r for r in runs if r["method"] == method and r["lr"] == chosen[method] and r.get("curve")]
        for run in chosen_runs:
            curves.plot([p["step"] for p in run["curve"]], [p["val_loss"] / math.log(2) for p in run["curve"]],
                        color=color, alpha=0.25, linewidth=1)
        lengths = {len(r["curve"]) for r in chosen_runs}
        if chosen_runs and len(lengths) == 1:
            steps = [p["step"] for p in chosen_runs[0]["curve"]]
            mean_loss = [stats.mean([r["curve"][i]["val_loss"] for r in chosen_runs]) for i in range(len(steps))]
            curves.plot(steps, [v / math.log(2) for v in mean_loss], color=color, linewidth=2,
                        label=f"{label(method, args.rank)} (lr {chosen[method]:g}, {len(chosen_runs)} seeds)")
        sweep_runs = sorted((r["lr"], r["final_val_loss"]) for r in runs
                            if r["method"] == method and r["seed"] == args.seeds[0])
        grid_ax.plot([lr for lr, _ in sweep_runs], [min(v, 20) / math.log(2) for _, v in sweep_runs], "o-",
                     color=color, label=label(method, args.rank))
    finals = [r["final_val_loss"] / math.log(2) for r in runs if math.isfinite(r.get("final_val_loss", float("inf")))]
    if finals:
        # the curves' first points (8 bits/byte at initialisation) would flatten the differences that matter
        curves.set_ylim(min(finals) * 0.97, min(finals) * 1.6)
        grid_ax.set_ylim(min(finals) - 0.05, min(max(finals), min(finals) + 1.0) + 0.05)
    curves.set_xlabel("optimizer step")
    curves.set_ylabel("validation bits per byte")
    curves.set_title("Validation loss, chosen lr: mean over seeds (bold), each seed (faint)")
    curves.legend(fontsize=7)
    curves.grid(True, alpha=0.3)
    grid_ax.set_xscale("log")
    grid_ax.set_xlabel("peak learning rate")
    grid_ax.set_ylabel("final validation bits per byte (seed 0)")
    grid_ax.set_title("Learning-rate grid (seed 0)")
    grid_ax.grid(True, which="both", alpha=0.3)
    grid_ax.legend(fontsize=6)
    figure.tight_layout()
    figure.savefig(path, dpi=110)
    plt.close(figure)


def timing_line(runs: list[dict], seconds: float | None) -> str:
    """Sum of the runs' wall and CPU time, and the protocol's wall time: first run's start to last run's end
    (over every invocation that shared the runs folder, e.g. two side by side)."""
    wall_total = sum(r.get("wall_s", 0) for r in runs) / 60
    cpu_total = sum(r.get("cpu_s", 0) for r in runs) / 60
    stamped = [r for r in runs if "started_at" in r]
    span = (max(r["finished_at"] for r in stamped) - min(r["started_at"] for r in stamped)) / 60 if stamped else 0
    return (f"- runs: {len(runs)}; protocol wall time {span:.0f} min (first run's start to last run's end); "
            f"{wall_total:.0f} min wall and {cpu_total:.0f} min CPU summed over the runs"
            + (f"; this invocation {seconds / 60:.0f} min" if seconds else ""))


def model_and_data_lines(args, first: dict) -> list[str]:
    """The model (with its parameter split), the data and the schedule, from the first run's record."""
    config = SMOKE_LLAMA if args.smoke else LLAMA
    block, batch = (32, 4) if args.smoke else (BLOCK, BATCH)
    matrix_share = first.get("matrix_params", 0) / max(1, first.get("total_params", 1))
    return [
        f"Llama {'(smoke sizes) ' if args.smoke else ''}hidden {config['hidden_size']}, MLP "
        f"{config['intermediate_size']}, {config['num_hidden_layers']} layers, {config['num_attention_heads']} heads, "
        f"byte vocabulary {config['vocab_size']} (tied), trained from scratch. Parameters: "
        f"{first.get('total_params', '?')}, of which **{first.get('matrix_params', '?')} ({matrix_share:.1%}) in the "
        f"block matrices**, {first.get('embedding_params', '?')} in the embedding (= head) and "
        f"{first.get('other_params', '?')} in the norms.",
        "",
        "Data: `TextBlocksDataModule(source=\"python-source\", tokenizer=\"bytes\", "
        f"block_size={block}, batch_size={batch})`: the standard library's .py files (test folders and site-packages "
        "left out) plus the pydoc topics and docstrings, UTF-8 bytes with an end-of-text id between documents, split "
        "by a SHA-256 of each file's path relative to the stdlib folder (a file's code and docstrings on the same "
        f"side): {first.get('train_blocks', '?')} training / {first.get('val_blocks', '?')} validation blocks. "
        f"{args.steps} steps of {batch * block} tokens ({args.steps * batch * block / 1e6:.2f}M tokens, no block "
        f"seen twice), linear warm-up {args.warmup} steps then cosine to 10% (`WarmupCosineLR`), no weight decay, no "
        f"clipping; Adam betas {BETAS}, eps {EPS:g} wherever a method has them. Same initialisation and data order "
        f"per seed for every method. Validation: token-weighted loss over {first.get('val_blocks_evaluated', '?')} "
        f"blocks spread evenly over the validation split, every {args.eval_every} steps; bits per byte = loss / ln 2, "
        "perplexity (per byte) = exp(loss).",
    ]


def method_lines(args, first: dict) -> list[str]:
    """How each method is set up (package versions from the first run's record)."""
    versions = first.get("versions", {})
    return [
        "Low-rank methods project or factor the block matrices (the 2-D weights inside the transformer blocks); the "
        "embedding and norms stay on AdamW inside the same optimizer (except in Adam-mini).",
        "",
        f"- AdamW at two learning rates (`adamw_scaled`): `torch.optim.AdamW` with the block matrices at {args.scale} "
        "x lr and the embedding and norms at lr, the split of GaLore and LoRA-Pre Adam with full-rank moments.",
        f"- GaLore: galore-torch {versions.get('galore-torch', '')} `GaLoreAdamW`, rank {args.rank}, "
        f"`proj_type=\"std\"`, `scale={args.scale}`, `update_proj_gap={args.galore_gap}`.",
        f"- LoRA-Pre Adam: `LoRAPreAdamW` with the library's defaults, `scale={args.scale}` (the paper's pre-training "
        "alpha).",
        "- LoRA-Pre Muon: `LoRAPreMuon`, momentum 0.95 Nesterov, `scale_rule=\"adamw_rms\"` (update RMS ~0.2 lr, "
        "like AdamW's, so one lr serves its Muon and AdamW tensors), Newton-Schulz in float32.",
        "- Muon (full rank, LoRA-Pre Muon's reference): `torch.optim.Muon` (momentum 0.95 Nesterov, 5 Newton-Schulz "
        "steps, `adjust_lr_fn=\"match_rms_adamw\"`: lr x 0.2 sqrt(max(p, q)), the same rule) on the block matrices "
        "plus `torch.optim.AdamW` on the rest at the same lr, stepped together. torch's Newton-Schulz runs in "
        "bfloat16, which has no fast path on this CPU (650 ms of a 770 ms step); the benchmark runs the same "
        "iteration in float32.",
        f"- APOLLO / APOLLO-Mini: apollo-torch {versions.get('apollo-torch', '')} `APOLLOAdamW`, random projection "
        f"refreshed every {args.galore_gap} steps; rank {args.rank} channel-wise at scale 1 (APOLLO) and rank 1 "
        "tensor-wise at scale 128 (APOLLO-Mini), the APOLLO paper's settings; the package's default Fira "
        "norm-growth limiter on. The package seeds each matrix's projections by its position in the optimizer, so "
        "they are the same for every run seed.",
        f"- Adam-mini: adam-mini {versions.get('adam-mini', '')} `Adam_mini`: one second moment per q/k head, per "
        "output neuron of v/o/MLP, per embedding row and per norm tensor.",
        *(["- LoRA-Pre Adam variants (`lora_pre_variant@...`, research rows): LoRA-Pre Adam's step written in plain "
            "torch, one matrix at a time, with the first and second moments switchable (`benchmarks/"
            "lora_pre_variants.py`: the library's default semantics for `m=factored,v=factored_abs`), the block "
            f"matrices at {args.scale} x lr and the rest plain Adam at lr."]
          if any(parse_method(m).variant is not None for m in args.methods) else []),
        "",
        "Optimizer state: the bytes of the optimizer's tensors after the run (GaLore's and APOLLO's projection "
        "matrices included, step counters not).",
    ]


def tuning_lines(args) -> list[str]:
    return [
        "Learning-rate tuning (same protocol for every method): a log-spaced grid of 3 peak learning rates per method "
        "around its usual range, seed 0, full step budget; chosen by final validation loss; where the best was at an "
        f"edge of the grid, up to {args.extend} more point(s) past that edge; then the chosen lr with seeds "
        f"{', '.join(map(str, args.seeds[1:]))}. The grid and its losses are in the last column. A row whose grid "
        "holds one lr was run at that lr only (research rows, `--lr`): not tuned.",
    ]


def missing_lines(args, runs: list[dict]) -> list[str]:
    """What the table lacks and why: default methods whose package is not installed, runs that failed."""
    lines = [f"- not run: {label(m, args.rank)} (`{m}`): its package `{REQUIRES[m]}` is not installed (the `bench` "
             "extra)" for m in PAPER_METHODS + REFERENCE_METHODS if not installed(m)]
    lines += [f"- failed: `{r['method']}` lr {r['lr']:g} seed {r['seed']}: "
              f"{r['error'].strip().splitlines()[-1][:300] if r['error'].strip() else 'no message'}"
              for r in runs if "error" in r]
    return ["", *lines] if lines else []


def reference_lines(summary: list[dict]) -> list[str]:
    """The table of every row's final validation loss against AdamW and against adamw_scaled (the fair reference)."""
    if not any(f"vs_{reference}" in row for row in summary for reference in REFERENCES):
        return []

    def signed(value) -> str:
        return "" if value is None else f"{value:+.4f}"

    def per_seed(row: dict, reference: str) -> str:
        shown = row.get(f"vs_{reference}_per_seed", "")
        spread = row.get(f"vs_{reference}_paired_std")
        return shown + (f" (sd {spread:.3f})" if spread is not None else "")

    table = [{"method": row["method"], "lr": row["lr"], "seeds": row["seeds"],
              **{f"{ref}_mean": signed(row.get(f"vs_{ref}")) for ref in REFERENCES},
              **{f"{ref}_seeds": per_seed(row, ref) for ref in REFERENCES},
              "state": row.get("state_vs_adamw")} for row in summary]
    return [
        "### Against the full-rank references",
        "",
        "Final validation loss minus the reference's (nats per byte; negative: lower loss than the reference), each "
        "at its chosen lr: the difference of the means over the seeds, and per seed (same seed: same "
        "initialisation and data order), with the spread of the paired differences. `adamw_scaled` is the fair "
        "full-rank reference for the low-rank methods: AdamW with the learning-rate split that GaLore and LoRA-Pre "
        "Adam use (block matrices at scale x lr, embedding and norms at lr; APOLLO's scaling likewise steps its "
        "matrices at a fraction of lr), so the difference against it is what the low-rank moments cost or gain, "
        "while the difference against AdamW also holds the split's effect.",
        "",
        *report.markdown_table(table, [
            ("method", "method"), ("lr", "chosen lr"), ("seeds", "seeds"),
            ("adamw_mean", "vs AdamW (means)"), ("adamw_seeds", "vs AdamW per seed"),
            ("adamw_scaled_mean", "vs adamw_scaled (means)"), ("adamw_scaled_seeds", "vs adamw_scaled per seed"),
            ("state", "optimizer state / AdamW's")], digits=3),
        "",
    ]


def write_report(args, runs: list[dict], env: dict, seconds: float | None) -> list[dict]:
    # the references' runs come from the runs folder whatever --methods holds, so that a report of research rows
    # alone still compares them with AdamW and adamw_scaled
    others = [r for r in sweep.load_runs(args.runs, REFERENCES) if r["method"] not in args.methods]
    summary, rows, chosen = summarise(args, runs, runs + others)
    first = next((r for r in runs if "train_blocks" in r), {})
    body = [
        "## Setup",
        "",
        *model_and_data_lines(args, first),
        "",
        *method_lines(args, first),
        "",
        *tuning_lines(args),
        "",
        "## Results",
        "",
        *report.markdown_table(summary, [
            ("method", "method"), ("lr", "chosen lr"), ("seeds", "seeds"), ("val_loss_mean", "val loss (mean)"),
            ("val_loss_std", "std"), ("val_bpb_mean", "bits/byte (mean)"),
            ("val_bpb_per_seed", "bits/byte per seed"), ("val_ppl_mean", "val ppl (mean)"),
            ("state_MiB", "optimizer state MiB"), ("step_ms", "step ms (in-run median)"), ("run_s", "s per run"),
            ("lr_grid", "lr grid, seed 0: final val loss")]),
        *missing_lines(args, runs),
        "",
        *reference_lines(summary),
        f"![validation curves]({NAME}.png)",
        "",
        "Per-run values (every lr and seed): `pretrain_quality.csv`; one row per method with its differences "
        "against the references: `pretrain_quality_summary.csv`; curves: `pretrain_quality_curves.csv`. "
        "The step times above are measured inside the quality runs (the other worker shared the CPU); "
        "`train_step_speed.md` has the controlled timing.",
        "",
    ]
    csvs = {f"{NAME}.csv": rows,
            f"{NAME}_curves.csv": [{"method": r["method"], "lr": r["lr"], "seed": r["seed"], **point}
                                   for r in runs for point in r.get("curve", [])],
            f"{NAME}_summary.csv": summary}
    columns = {f"{NAME}.csv": ["method", "label", "lr", "seed", "steps", "warmup", "rank", "final_val_loss",
                               "final_val_bpb", "final_val_ppl", "diverged", "state_bytes", "peak_rss_mib",
                               "rss_before_training_mib", "step_ms_median", "wall_s", "cpu_s", "threads",
                               "load_average_at_start", "error"],
               f"{NAME}_summary.csv": ["key", "method", "lr", "seeds", "val_loss_mean", "val_loss_std", "val_bpb_mean",
                                       "val_bpb_per_seed", "state_MiB", "state_vs_adamw",
                                       *[f"vs_{ref}{part}" for ref in REFERENCES
                                         for part in ("", "_paired_mean", "_paired_std", "_per_seed")],
                                       "step_ms", "run_s", "lr_grid"]}
    report.write_result(args.out, NAME, "Pre-training quality: byte-level Llama on the Python standard library's "
                        "source", env, body, csvs, columns, header=[timing_line(runs, seconds)], smoke=args.smoke)
    plot(args, runs, chosen, args.out / f"{NAME}.png")
    return summary


def main(argv=None) -> list[dict]:
    args = parse_args(argv)
    return sweep.sweep_main(__file__, argv, args, args.grids, run_one, runner, score, write_report,
                            lambda row: f"{row['method']:55s} lr {row['lr']:<7g} val loss {row['val_loss_mean']:.4f} "
                                        f"({row['val_bpb_mean']:.3f} bits/byte)")


if __name__ == "__main__":
    main()
