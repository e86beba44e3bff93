"""One ``cli.py`` run for ``benchmarks/gpu_acceptance.sh``, failed unless the expected Triton kernels really ran.

    python benchmarks/gpu_acceptance_fit.py --expect lora_pro_full -- fit --config configs/quickstart.yaml ...
    python benchmarks/gpu_acceptance_fit.py --launch-counts 4 16

A fit that silently took the torch path would pass as a fit, so this counts the launches of each kernel module's
entry point and every KernelFallbackWarning (a fallback, or a failed self-check) during the run, and prints one
line starting ``kernels:`` with them and the self-check verdicts. Exit status 1 when an expected kernel never
launched, never passed its self-check, or a kernel warned; else the CLI's own status.

``--launch-counts L...``: no fit; for each L, the CUDA kernels one ``LoRAPreAdamW(use_triton=True).step()``
launches for a model of L same-shape matrices (torch.profiler, after warm-up steps), printed per step. Exit status
1 unless both LoRA-Pre passes ran as Triton kernels and the count does not grow with L (the step is batched).
"""
from __future__ import annotations

import argparse
import os
import sys
import warnings
from collections import Counter

#: kernel -> the module attribute the dispatcher launches (for LoRA-Pre Adam: the first pass, once per batch)
ENTRIES = {"lora_pro_full": "moments_and_projections", "lora_pre_adam": "first_pass"}
#: The profile of ``--launch-counts``: L matrices of WIDTH x WIDTH at RANK (one batch), WARMUP steps first
#: (compilation, autotuning, the self-check, the pointer tables).
WIDTH, RANK, WARMUP = 256, 8, 3


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--expect", nargs="*", default=[], choices=sorted(ENTRIES), help="kernels that must run")
    parser.add_argument("--launch-counts", type=int, nargs="+", metavar="L",
                        help="no fit: count the CUDA kernels of one LoRA-Pre Adam step for each number of matrices")
    parser.add_argument("cli_args", nargs=argparse.REMAINDER, help="-- then the arguments of cli.py")
    args = parser.parse_args(argv)
    if args.launch_counts:
        return check_launch_counts(args.launch_counts)
    cli_args = args.cli_args[1:] if args.cli_args[:1] == ["--"] else args.cli_args
    os.environ.pop("TRITON_INTERPRET", None)  # the compiled kernels, not the interpreter

    import importlib

    from lit_lowrank.kernels import dispatch

    launches: Counter = Counter()
    for kernel, entry in ENTRIES.items():
        module = importlib.import_module(f"lit_lowrank.kernels.{kernel}")
        original = getattr(module, entry)

        def counted(*a, _kernel=kernel, _original=original, **k):
            launches[_kernel] += 1
            return _original(*a, **k)

        setattr(module, entry, counted)
    warned: list[str] = []
    show = warnings.showwarning

    def record(message, category, *rest, **kwargs):
        if issubclass(category, dispatch.KernelFallbackWarning):
            warned.append(str(message))
        return show(message, category, *rest, **kwargs)

    warnings.showwarning = record
    warnings.simplefilter("always", dispatch.KernelFallbackWarning)  # each is already issued once per cause

    from lit_lowrank.cli import main as cli_main

    status = 0
    try:
        cli_main(cli_args)
    except SystemExit as done:
        status = done.code if isinstance(done.code, int) else (0 if done.code is None else 1)
    passed = Counter(key[0] for key, ok in dispatch._checked.items() if ok)
    failed = Counter(key[0] for key, ok in dispatch._checked.items() if not ok)
    print(f"kernels: launches {dict(launches)}; self-checks passed {dict(passed)}, failed {dict(failed)}; "
          f"kernel warnings {len(warned)}", flush=True)
    problems = [f"{kernel} never launched" for kernel in args.expect if not launches[kernel]]
    problems += [f"{kernel} never passed a self-check" for kernel in args.expect if not passed[kernel]]
    problems += [f"kernel warning: {message}" for message in warned]
    for problem in problems:
        print(f"FAILED: {problem}", flush=True)
    return 1 if problems else status


def step_kernels(layers: int) -> list[str]:
    """The names of the CUDA kernels (memory copies and sets included) that one ``LoRAPreAdamW(use_triton=True)``
    step launches for ``layers`` bias-free WIDTH x WIDTH linear layers, with fixed gradients (so that only the
    step is profiled, and the gradients' pointer table is built once)."""
    import torch
    from torch import nn
    from torch.autograd import DeviceType
    from torch.profiler import ProfilerActivity, profile

    from lit_lowrank.optim import LoRAPreAdamW

    torch.manual_seed(0)
    model = nn.Sequential(*(nn.Linear(WIDTH, WIDTH, bias=False) for _ in range(layers))).cuda()
    # residual_step=False: the kernels form m_t without the residual step (with it the batched torch path runs,
    # whose operations per step the CPU tests count: tests/optim/test_lora_pre_batched.py)
    optimizer = LoRAPreAdamW(model.parameters(), lr=1e-3, rank=RANK, use_triton=True, residual_step=False)
    model(torch.randn(16, WIDTH, device="cuda")).square().mean().backward()
    for _ in range(WARMUP):
        optimizer.step()
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:  # device events: the kernels
        optimizer.step()
        torch.cuda.synchronize()
    return [event.name for event in prof.events() if event.device_type == DeviceType.CUDA]


def check_launch_counts(layer_counts: list[int]) -> int:
    """Print each L's kernels per step; 1 if the passes were not Triton's, a kernel warned, or the count grows."""
    os.environ.pop("TRITON_INTERPRET", None)  # the compiled kernels, not the interpreter
    import torch

    from lit_lowrank.kernels import dispatch

    if not torch.cuda.is_available():
        print("launch counts: needs a CUDA GPU (torch sees none)", flush=True)
        return 2
    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always", dispatch.KernelFallbackWarning)
        kernels = {layers: step_kernels(layers) for layers in layer_counts}
    warned = [w for w in record if issubclass(w.category, dispatch.KernelFallbackWarning)]
    problems = [f"kernel warning: {w.message}" for w in warned]
    for layers, names in kernels.items():
        triton = Counter(kernel for name in names for kernel in ("_first_pass", "_second_pass") if kernel in name)
        print(f"launches per step: L={layers}: {len(names)} CUDA kernels, LoRA-Pre passes {dict(triton)}", flush=True)
        print(f"  by name: {dict(Counter(names).most_common())}", flush=True)
        if not (triton["_first_pass"] and triton["_second_pass"]):
            problems.append(f"L={layers}: the LoRA-Pre passes did not run as Triton kernels")
    counts = [len(kernels[layers]) for layers in sorted(kernels)]
    if any(later > first for first, later in zip(counts, counts[1:])):
        problems.append(f"launches per step grow with L: {dict(zip(sorted(kernels), counts))}")
    for problem in problems:
        print(f"FAILED: {problem}", flush=True)
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())
