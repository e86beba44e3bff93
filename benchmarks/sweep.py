"""The learning-rate sweep driver of the quality benchmarks: the tuning protocol (every method's grid on the first
seed, grid extensions past an edge holding the best, then the other seeds at the chosen learning rate) as a queue
of runs (``SweepPlan``, ``sweep``), optionally several at once; each run in a fresh interpreter (``run_worker``: peak
memory is per run and a crash loses one run only) whose JSON is saved and reused, so a sweep resumes and
``--report-only`` rebuilds its report (``make_runner``, ``load_runs``); and the options and ``main`` body that every
sweep script shares (``add_sweep_arguments``, ``sweep_main``).
"""

from __future__ import annotations

import heapq
import json
import os
import subprocess
import sys
import time
from collections.abc import Callable, Iterable, Sequence
from concurrent.futures import FIRST_COMPLETED, ThreadPoolExecutor, wait
from pathlib import Path
from typing import NamedTuple

from environment import REPO, RESULTS, command_line, environment, load_average
from timing import wait_for_low_load


def run_worker(script: Path, spec: dict, result: Path, timeout: float | None = None) -> dict:
    """Run ``script --worker SPEC_JSON --result RESULT`` in a fresh interpreter and return the JSON it wrote.

    A run that crashes or times out returns ``{"error": ...}`` (and writes nothing), so the caller can go on."""
    result.parent.mkdir(parents=True, exist_ok=True)
    command = [sys.executable, str(script), "--worker", json.dumps(spec), "--result", str(result)]
    env = {**os.environ, "PYTHONWARNINGS": "ignore", "TOKENIZERS_PARALLELISM": "false"}
    try:
        done = subprocess.run(command, capture_output=True, text=True, timeout=timeout, env=env, cwd=REPO)
    except subprocess.TimeoutExpired:
        return {"error": f"timed out after {timeout} s"}
    if done.returncode != 0 or not result.exists():
        return {"error": f"exit {done.returncode}: {done.stderr.strip()[-2000:]}"}
    return json.loads(result.read_text())


def write_json(path: Path, data: dict) -> None:
    """Write atomically (a half-written file never looks like a finished run)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    partial = path.with_suffix(path.suffix + ".partial")
    partial.write_text(json.dumps(data, indent=1, default=float))
    partial.replace(path)


def read_json(path: Path) -> dict | None:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def lr_tag(lr: float) -> str:
    return f"{lr:.0e}".replace("e-0", "e-").replace("e+0", "e")


def next_lr(lrs: Sequence[float], side: str) -> float:
    """One more grid point past the low or high edge of a log-spaced grid, rounded to 1 significant digit."""
    lrs = sorted(lrs)
    value = lrs[0] ** 2 / lrs[1] if side == "low" else lrs[-1] ** 2 / lrs[-2]
    return float(f"{value:.1g}")


class SweepJob(NamedTuple):
    """One run of the protocol; ``priority`` orders the queue (phase, method index, position in the phase)."""

    priority: tuple[int, int, int]
    method: str
    lr: float
    seed: int


class SweepPlan:
    """The tuning protocol of :func:`sweep` as a queue of runs that grows as results come in.

    Phases, in priority order: every method's grid on the first seed, then the grid extensions, then the other
    seeds at the chosen learning rate. A method's extensions and seeds are queued only once all its first-seed
    runs are finished (the choice needs them); other methods' runs go on meanwhile.
    """

    GRID, EXTENSION, SEEDS = 0, 1, 2

    def __init__(self, grids: dict[str, Sequence[float]], seeds: Sequence[int], score: Callable[[dict], float],
                 extend: int) -> None:
        self.methods, self.seeds, self.score = list(grids), list(seeds), score
        self.extensions_left = {method: extend for method in grids}
        self.tried: dict[str, dict[float, dict]] = {method: {} for method in grids}
        self.unfinished = {method: 0 for method in grids}  # first-seed runs queued or running
        self.chosen: dict[str, float] = {}
        self.queue: list[SweepJob] = []
        for method, grid in grids.items():
            for position, lr in enumerate(grid):
                self._push(self.GRID, method, position, lr, self.seeds[0])

    def _push(self, phase: int, method: str, position: int, lr: float, seed: int) -> None:
        heapq.heappush(self.queue, SweepJob((phase, self.methods.index(method), position), method, lr, seed))
        if phase != self.SEEDS:
            self.unfinished[method] += 1

    def next_job(self) -> SweepJob | None:
        """The most urgent queued run, or None when nothing is queued (runs may still be in flight)."""
        return heapq.heappop(self.queue) if self.queue else None

    def finished(self, job: SweepJob, result: dict) -> None:
        """Record a finished run; once a method's first-seed runs are all in, queue what follows them."""
        if job.priority[0] == self.SEEDS:
            return
        self.tried[job.method][job.lr] = result
        self.unfinished[job.method] -= 1
        if self.unfinished[job.method] == 0:
            self._after_first_seed(job.method)

    def _after_first_seed(self, method: str) -> None:
        new = self._extension(method)
        if new is not None:
            self._push(self.EXTENSION, method, 0, new, self.seeds[0])  # one at a time per method
            return
        tried = self.tried[method]
        self.chosen[method] = min(sorted(tried), key=lambda lr: self.score(tried[lr]))
        for position, seed in enumerate(self.seeds[1:]):
            self._push(self.SEEDS, method, position, self.chosen[method], seed)

    def _extension(self, method: str) -> float | None:
        """The next grid point past the edge holding the best score, or None (best inside, all diverged, or no
        extension left)."""
        tried = self.tried[method]
        lrs = sorted(tried)
        best = min(lrs, key=lambda lr: self.score(tried[lr]))
        if (self.extensions_left[method] <= 0 or len(lrs) < 2 or lrs[0] < best < lrs[-1]
                or not self.score(tried[best]) < float("inf")):
            return None
        self.extensions_left[method] -= 1
        return next_lr(lrs, "low" if best == lrs[0] else "high")


def sweep(
    grids: dict[str, Sequence[float]],
    seeds: Sequence[int],
    run: Callable[[str, float, int], dict],
    score: Callable[[dict], float],
    extend: int = 1,
    workers: int = 1,
) -> dict[str, float]:
    """The tuning protocol shared by the quality benchmarks; returns the chosen learning rate per method.

    1. Every method's grid on ``seeds[0]`` (all methods before any extra seed, so a cut-short session still
       has complete grids). ``score`` is lower-is-better (diverged runs: ``inf``).
    2. Where the best learning rate is at an edge of the grid, up to ``extend`` more points past that edge
       (same geometric step), one at a time, until the best is inside.
    3. The chosen learning rate with every other seed.

    ``workers`` > 1 runs that many at once (``run`` is called from threads, so it should start a subprocess):
    always the earliest queued step of the protocol first, a method's extensions and seeds only after all its
    ``seeds[0]`` runs, but different methods overlap. With 1 worker the order is exactly steps 1, 2, 3 above,
    method by method, in this thread.
    """
    plan = SweepPlan(grids, seeds, score, extend)
    if workers <= 1:
        while (job := plan.next_job()) is not None:
            plan.finished(job, run(job.method, job.lr, job.seed))
    else:
        _run_parallel(plan, run, workers)
    return {method: plan.chosen[method] for method in grids if method in plan.chosen}


def _run_parallel(plan: SweepPlan, run: Callable[[str, float, int], dict], workers: int) -> None:
    """Keep ``workers`` runs of ``plan`` in flight until its queue is empty and every run is finished."""
    with ThreadPoolExecutor(max_workers=workers) as pool:
        running = {}
        while True:
            while len(running) < workers and (job := plan.next_job()) is not None:
                running[pool.submit(run, job.method, job.lr, job.seed)] = job
            if not running:
                return
            done, _ = wait(running, return_when=FIRST_COMPLETED)
            for future in done:
                plan.finished(running.pop(future), future.result())


def choose(results: Iterable[dict], score: Callable[[dict], float], seed: int) -> dict[str, float]:
    """Chosen learning rate per method from finished runs (the same rule as :func:`sweep`, for --report-only)."""
    best: dict[str, tuple[float, float]] = {}
    for result in results:
        if result["seed"] != seed:
            continue
        key = (score(result), result["lr"])
        if result["method"] not in best or key < best[result["method"]]:
            best[result["method"]] = key
    return {method: lr for method, (_, lr) in best.items()}


def make_runner(
    script: Path,
    runs_dir: Path,
    base_spec: dict,
    run_one: Callable[[dict], dict],
    describe: Callable[[dict], str],
    in_process: bool = False,
    wait_load: float = 0.0,
) -> Callable[[str, float, int], dict]:
    """``run(method, lr, seed)`` for :func:`sweep`: the finished run's JSON when ``runs_dir`` has it, else a new
    run (a subprocess of ``script --worker``, or ``run_one`` in this process), saved there as JSON.

    A failed run is saved with its error and scores as diverged; delete its JSON to retry it."""

    def run(method: str, lr: float, seed: int) -> dict:
        path = runs_dir / f"{method}_lr{lr_tag(lr)}_seed{seed}.json"
        done = read_json(path)
        if done is not None:
            return done
        spec = {**base_spec, "method": method, "lr": lr, "seed": seed}
        if wait_load > 0:
            wait_for_low_load(0.5, wait_load)
        load, started_at = load_average(), time.time()
        if in_process:
            result = run_one(spec)
        else:
            scratch = path.with_name(path.stem + ".worker.json")
            result = run_worker(script, spec, scratch)
            scratch.unlink(missing_ok=True)
        if "error" in result:
            result = {"method": method, "lr": lr, "seed": seed, "diverged": True, "error": result["error"],
                      "curve": []}
        # Wall-clock bounds of the run (Unix time), so a report can give the span of a parallel sweep.
        result.update(load_average_at_start=load, started_at=started_at, finished_at=time.time())
        write_json(path, result)
        print(f"{method:22s} lr={lr:<8g} seed={seed} {describe(result)}", flush=True)
        return result

    return run


def load_runs(runs_dir: Path, methods: Sequence[str]) -> list[dict]:
    """Every finished run in ``runs_dir`` of one of ``methods``; an unreadable run file is named on stderr and left
    out (runs are written atomically, so only an outside edit makes one)."""
    runs = []
    for path in sorted(p for p in runs_dir.glob("*_seed*.json") if not p.name.endswith(".worker.json")):
        run = read_json(path)
        if run is None:
            print(f"warning: {path} is not valid JSON and is left out of the report; delete it and run the sweep "
                  "again to redo that run", file=sys.stderr)
        elif run.get("method") in methods:
            runs.append(run)
    return runs


def environment_for_report(env: dict, runs_dir: Path, report_only: bool) -> dict:
    """The sweep's environment (saved next to its runs) for a --report-only rebuild; else save and return ``env``."""
    path = runs_dir / "environment.json"
    if report_only:
        return {**(read_json(path) or {}), "report rebuilt by": env["command"]}
    write_json(path, env)
    return env


def add_sweep_arguments(parser, name: str, grids: dict, seeds_help: str = "first: LR search; rest: repeats",
                        workers: int = 1, threads: int = 2, extend: int = 1) -> None:
    """The options every learning-rate sweep script shares (methods, seeds, grid, execution, output);
    ``workers``, ``threads`` and ``extend`` are the script's defaults for ``--workers``, ``--threads``, ``--extend``."""
    import argparse

    parser.add_argument("--methods", nargs="+", default=list(grids), choices=list(grids))
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2], help=seeds_help)
    parser.add_argument("--extend", type=int, default=extend, help="grid points added past an edge holding the best lr")
    parser.add_argument("--lrs", type=float, nargs="+", help="one grid for every method (overrides the defaults)")
    parser.add_argument("--threads", type=int, default=threads, help="torch.set_num_threads in each run")
    parser.add_argument("--workers", type=int, default=workers,
                        help="runs at once, each its own process (a method's other seeds wait for its lr choice; "
                             "--in-process runs one at a time)")
    parser.add_argument("--wait-load", type=float, default=0.0,
                        help="before each run, wait up to this many seconds for the 1-min load average < 0.5 "
                             "(one worker only: parallel runs keep the load up)")
    parser.add_argument("--report-only", action="store_true", help="rebuild the outputs from the finished runs")
    parser.add_argument("--in-process", action="store_true", help="run in this process (no per-run peak memory)")
    parser.add_argument("--out", type=Path, default=RESULTS, help="folder for CSV, markdown and PNG")
    parser.add_argument("--runs", type=Path, help=f"folder of per-run JSON (default: OUT/{name}_runs)")
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    parser.add_argument("--result", type=Path, help=argparse.SUPPRESS)


def sweep_main(script: str, argv, args, grids: dict, run_one: Callable[[dict], dict], runner, score,
               write_report, summary_line: Callable[[dict], str]) -> list[dict]:
    """The body of a sweep script's ``main``: a ``--worker`` run, or the sweep (unless ``--report-only``) and its
    report, printing ``summary_line(row)`` per method. Returns the report's summary rows ([] for a worker)."""
    if args.worker:
        write_json(args.result, run_one(json.loads(args.worker)))
        return []
    env = environment(command_line(script, argv), args.threads)
    env = environment_for_report(env, args.runs, args.report_only)
    started = time.perf_counter()
    if not args.report_only:
        workers = 1 if args.in_process else getattr(args, "workers", 1)  # in-process runs share one interpreter
        sweep({m: (args.lrs or grids[m]) for m in args.methods}, args.seeds, runner(args), score, extend=args.extend,
              workers=workers)
    seconds = None if args.report_only else time.perf_counter() - started
    runs = load_runs(args.runs, args.methods)
    if args.report_only and not runs:
        raise SystemExit(f"--report-only: no finished runs of {', '.join(args.methods)} in {args.runs}. Run the sweep "
                         "first (the same command without --report-only), or point --runs at its runs folder.")
    summary = write_report(args, runs, env, seconds)
    for row in summary:
        print(summary_line(row))
    return summary


def galore_available() -> bool:
    """Whether galore-torch (the ``bench`` extra) is installed; GaLore rows are left out without it."""
    import importlib.util

    return importlib.util.find_spec("galore_torch") is not None
