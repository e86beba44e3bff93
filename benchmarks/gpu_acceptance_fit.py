"""One ``cli.py`` run for ``benchmarks/gpu_acceptance.sh``, failed unless the expected Triton kernels really ran.

    python benchmarks/gpu_acceptance_fit.py --expect lora_pro_full -- fit --config configs/quickstart.yaml ...

A fit that silently took the torch path would pass as a fit, so this counts the launches of each kernel module's
entry point and every KernelFallbackWarning (a fallback, or a failed self-check) during the run, and prints one
line starting ``kernels:`` with them and the self-check verdicts. Exit status 1 when an expected kernel never
launched, never passed its self-check, or a kernel warned; else the CLI's own status.
"""
from __future__ import annotations

import argparse
import os
import sys
import warnings
from collections import Counter

#: kernel -> the module attribute the dispatcher launches
ENTRIES = {"lora_pro_full": "moments_and_projections", "lora_pre_adam": "lora_pre_adam_update_"}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--expect", nargs="*", default=[], choices=sorted(ENTRIES), help="kernels that must run")
    parser.add_argument("cli_args", nargs=argparse.REMAINDER, help="-- then the arguments of cli.py")
    args = parser.parse_args(argv)
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


if __name__ == "__main__":
    sys.exit(main())
