"""What the benchmark scripts share: the environment header, CSV and markdown writers, interleaved timing on a
shared CPU, one-run-per-subprocess execution (so peak memory is per run and a crash loses one run only), the
learning-rate sweep protocol (optionally several runs at once), and bootstrap confidence intervals of accuracy.

Scripts import it as ``import common`` after putting their own folder first on ``sys.path`` (they are run as
``python benchmarks/<script>.py``, and tests load them from their file path).
"""

from __future__ import annotations

import csv
import datetime
import heapq
import json
import os
import platform
import resource
import shlex
import statistics
import subprocess
import sys
import time
from collections import defaultdict
from collections.abc import Callable, Iterable, Sequence
from concurrent.futures import FIRST_COMPLETED, ThreadPoolExecutor, wait
from pathlib import Path
from typing import Any, NamedTuple

REPO = Path(__file__).resolve().parents[1]
RESULTS = Path(__file__).resolve().parent / "results"
DISTRIBUTIONS = ("torch", "transformers", "lightning", "galore-torch", "numpy")


# ----------------------------------------------------------------------------------------------- environment
def cpu_name() -> str:
    """CPU model and core count, e.g. ``AMD EPYC (2 cores)``."""
    try:
        with open("/proc/cpuinfo") as handle:
            for line in handle:
                if line.startswith("model name"):
                    return f"{line.split(':', 1)[1].strip()} ({os.cpu_count()} cores)"
    except OSError:
        pass
    return f"{platform.processor() or platform.machine()} ({os.cpu_count()} cores)"


def memory_gib() -> float | None:
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30
    except (ValueError, OSError, AttributeError):
        return None


def version(distribution: str) -> str:
    from importlib.metadata import PackageNotFoundError
    from importlib.metadata import version as _version

    try:
        return _version(distribution)
    except PackageNotFoundError:
        return "not installed"


def git_commit() -> str:
    """Short commit of the repository, with ``+uncommitted`` when the working tree differs from it."""
    try:
        commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=REPO, capture_output=True, text=True,
                                timeout=10).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=REPO,
                               capture_output=True, text=True, timeout=10).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return "unknown"
    return (commit or "unknown") + (" +uncommitted changes" if dirty else "")


def load_average() -> tuple[float, float, float] | None:
    try:
        return tuple(round(x, 2) for x in os.getloadavg())
    except (OSError, AttributeError):
        return None


def command_line(script: str | Path, argv: Sequence[str] | None) -> str:
    """The command as a user would type it from the repository root."""
    argv = sys.argv[1:] if argv is None else list(argv)
    return shlex.join(["python", f"benchmarks/{Path(script).name}", *argv])


def gpu_name() -> str | None:
    try:
        import torch

        return torch.cuda.get_device_name(0) if torch.cuda.is_available() else None
    except Exception:  # noqa: BLE001 - no driver, broken install: just no GPU
        return None


def environment(command: str, threads: int | None = None) -> dict[str, Any]:
    """Machine, date, versions, git commit, command: the header of every results file."""
    memory = memory_gib()
    env = {
        "command": command,
        "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "machine": f"{cpu_name()}, {platform.machine()}" + (f", {memory:.0f} GiB RAM" if memory else ""),
        "gpu": gpu_name() or "none",
        "os": platform.platform(terse=True),
        "python": platform.python_version(),
        **{name: version(name) for name in DISTRIBUTIONS},
        "git commit": git_commit(),
        "load average at start": load_average(),
    }
    if threads is not None:
        env["torch threads"] = threads
    return env


def environment_lines(env: dict[str, Any]) -> list[str]:
    """The environment as markdown lines (command first, in a code span)."""
    lines = [f"- command: `{env.get('command', 'unknown')}`"]
    lines += [f"- {key}: {value}" for key, value in env.items() if key != "command"]
    return lines


# ------------------------------------------------------------------------------------------------- writers
def write_csv(path: Path, rows: list[dict], fields: Sequence[str] | None = None) -> None:
    """Rows as CSV; the columns are ``fields`` or the union of the rows' keys in first-seen order."""
    if fields is None:
        fields = list(dict.fromkeys(key for row in rows for key in row))
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=list(fields), extrasaction="ignore")
        writer.writeheader()
        writer.writerows(rows)


def read_csv(path: Path) -> list[dict]:
    with open(path, newline="") as handle:
        return list(csv.DictReader(handle))


def fmt(value: Any, digits: int = 4) -> str:
    """A table cell: floats with ``digits`` significant digits, None as empty."""
    if value is None:
        return ""
    if isinstance(value, float):
        if value != value or value in (float("inf"), float("-inf")):
            return str(value)
        return f"{value:.{digits}g}"
    return str(value)


def markdown_table(rows: Iterable[dict], columns: Sequence[tuple[str, str]], digits: int = 4) -> list[str]:
    """A markdown table of ``rows``; ``columns`` are ``(key, header)`` pairs."""
    lines = ["| " + " | ".join(header for _, header in columns) + " |", "|" + "---|" * len(columns)]
    for row in rows:
        lines.append("| " + " | ".join(fmt(row.get(key), digits) for key, _ in columns) + " |")
    return lines


# -------------------------------------------------------------------------------------- timing, shared CPU
def paired_ratio(samples: Sequence[float], baseline_samples: Sequence[float]) -> float:
    """Median over repeats of method time / baseline time within the same repeat.

    The methods of one repeat run back to back, so a burst of load from other processes hits them
    together and cancels in the ratio; a ratio of medians would mix different bursts.
    """
    return statistics.median(a / b for a, b in zip(samples, baseline_samples))


def cpu_busy_fraction(interval: float = 0.25) -> float:
    """Share of the machine's CPU time spent busy (by any process) over ``interval`` seconds; Linux only."""

    def snapshot():
        with open("/proc/stat") as handle:
            fields = [int(x) for x in handle.readline().split()[1:]]
        return fields[3] + fields[4], sum(fields)  # idle + iowait, total

    idle0, total0 = snapshot()
    time.sleep(interval)
    idle1, total1 = snapshot()
    return 1.0 - (idle1 - idle0) / max(total1 - total0, 1)


def wait_for_idle_cpus(max_wait: float, threshold: float = 0.1) -> bool:
    """Wait up to ``max_wait`` s until other processes leave the CPUs >= 90% idle: on a shared 2-core machine a
    busy neighbour stalls every multi-threaded op of ours. False if it never got quiet (or no /proc/stat)."""
    deadline = time.perf_counter() + max_wait
    try:
        while time.perf_counter() < deadline:
            if cpu_busy_fraction() < threshold:
                return True
    except OSError:
        pass
    return False


def wait_for_low_load(threshold: float = 0.5, max_wait: float = 0.0, poll: float = 10.0) -> tuple[float, Any]:
    """Wait up to ``max_wait`` s for the 1-minute load average to drop below ``threshold``.

    Returns (seconds waited, load average when done); never raises (no load average: returns at once)."""
    start = time.perf_counter()
    load = load_average()
    while load is not None and load[0] >= threshold and time.perf_counter() - start < max_wait:
        time.sleep(poll)
        load = load_average()
    return time.perf_counter() - start, load


def busy_ticks() -> tuple[int, int]:
    """(CPU ticks spent busy by all processes, ticks spent by this one), from /proc (Linux)."""
    with open("/proc/stat") as handle:
        fields = [int(x) for x in handle.readline().split()[1:]]
    with open("/proc/self/stat") as handle:
        ours = handle.read().rsplit(")", 1)[1].split()
    return sum(fields) - fields[3] - fields[4], int(ours[11]) + int(ours[12])  # all but idle/iowait; utime + stime


def time_interleaved(
    steppers: dict[str, Callable[[], Any]],
    repeats: int,
    warmup: float,
    wait_idle: float,
    warmup_repeats: int = 0,
) -> tuple[dict[str, list[float]], list[bool]]:
    """Per-method times, methods interleaved within each repeat (order rotated every repeat), and whether each
    repeat was clean: other processes used less than 5% of the CPU time it spanned.

    Warm-up: ``warmup`` seconds and at least ``warmup_repeats`` untimed rounds over all methods. Each timed
    repeat first waits up to ``wait_idle`` s for idle CPUs (0: never waits).
    """
    end, rounds = time.perf_counter() + warmup, 0
    while rounds < warmup_repeats or time.perf_counter() < end:
        for step in steppers.values():
            step()
        rounds += 1
    times: dict[str, list[float]] = defaultdict(list)
    clean: list[bool] = []
    names = list(steppers)
    ticks_per_second = os.sysconf("SC_CLK_TCK") * (os.cpu_count() or 1)
    for repeat in range(repeats):
        if wait_idle > 0:
            wait_for_idle_cpus(wait_idle)
        try:
            (busy0, ours0), start_all = busy_ticks(), time.perf_counter()
        except OSError:
            busy0 = None
        for name in names[repeat % len(names):] + names[: repeat % len(names)]:
            start = time.perf_counter()
            steppers[name]()
            times[name].append(time.perf_counter() - start)
        if busy0 is None:
            clean.append(True)
        else:
            busy1, ours1 = busy_ticks()
            window = (time.perf_counter() - start_all) * ticks_per_second
            clean.append((busy1 - busy0) - (ours1 - ours0) <= max(2, 0.05 * window))
    return dict(times), clean


def clean_subset(times: dict[str, list[float]], clean: list[bool], minimum: int = 10) -> dict[str, list[float]]:
    """Only the clean repeats, unless fewer than ``minimum`` of them are: then all."""
    keep = clean if sum(clean) >= minimum else [True] * len(clean)
    return {name: [t for t, k in zip(values, keep) if k] for name, values in times.items()}


# ----------------------------------------------------------------------------- one run per subprocess
def peak_rss_mib() -> float:
    """Peak resident memory of this process so far (``ru_maxrss``; KiB on Linux, bytes on macOS), in MiB."""
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak / 2**20 if sys.platform == "darwin" else peak / 1024


def cpu_seconds() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


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


def mean(values: Sequence[float]) -> float:
    return sum(values) / len(values) if values else float("nan")


def std(values: Sequence[float], factor: float = 1.0) -> float | None:
    """Sample standard deviation times ``factor``; None (an empty table cell) for fewer than two values."""
    return factor * statistics.stdev(values) if len(values) > 1 else None


# ------------------------------------------------------------------------- bootstrap confidence intervals
#: Resamples and RNG seed of every bootstrap here: fixed, so a rebuilt report gives the same intervals.
BOOTSTRAP_RESAMPLES = 10_000
BOOTSTRAP_SEED = 1234


def bootstrap_accuracies(
    methods: Sequence[Sequence[Sequence[float]]],
    resamples: int = BOOTSTRAP_RESAMPLES,
    seed: int = BOOTSTRAP_SEED,
    chunk: int = 1000,
):
    """Bootstrap replicates of the accuracy of each method over test examples and seeds: an array
    ``(resamples, len(methods))``.

    ``methods[k][s][i]`` is 1 when seed ``s`` of method ``k`` got test example ``i`` right, else 0 (every seed
    of every method on the same ``n`` examples, in the same order). One replicate draws ``n`` example indices
    with replacement, *shared* by every seed and method (the test set is one sample of examples that all runs
    saw: resampling it separately per seed or per method would treat its luck as independent and understate
    it), and for each method its seeds with replacement (training runs are independent draws). The replicate
    is the mean correctness over the drawn seeds and examples. Sharing the examples pairs the methods, so the
    column differences are the paired bootstrap of the accuracy difference.
    """
    import numpy as np

    matrices = [np.asarray(correct, dtype=np.float64) for correct in methods]
    n = {m.shape[1] for m in matrices if m.ndim == 2}
    if len(n) != 1 or any(m.ndim != 2 or m.shape[0] == 0 for m in matrices):
        raise ValueError("bootstrap_accuracies needs, per method, one row per seed over the same test examples; "
                         f"got shapes {[m.shape for m in matrices]}")
    n_examples = n.pop()
    rng = np.random.default_rng(seed)
    replicates = np.empty((resamples, len(matrices)))
    for start in range(0, resamples, chunk):
        size = min(chunk, resamples - start)
        examples = rng.integers(0, n_examples, size=(size, n_examples))
        for k, correct in enumerate(matrices):
            per_seed = correct[:, examples].mean(axis=2).T  # (size, seeds): each seed on the resampled examples
            drawn = rng.integers(0, correct.shape[0], size=(size, correct.shape[0]))
            replicates[start:start + size, k] = np.take_along_axis(per_seed, drawn, axis=1).mean(axis=1)
    return replicates


def percentile_interval(replicates: Sequence[float], level: float = 0.95) -> tuple[float, float]:
    """The central ``level`` interval of bootstrap replicates (percentile method)."""
    import numpy as np

    tail = 100 * (1 - level) / 2
    low, high = np.percentile(np.asarray(replicates, dtype=np.float64), [tail, 100 - tail])
    return float(low), float(high)


def accuracy_interval(correct: Sequence[Sequence[float]], level: float = 0.95,
                      resamples: int = BOOTSTRAP_RESAMPLES, seed: int = BOOTSTRAP_SEED) -> tuple[float, float, float]:
    """(accuracy, low, high): mean correctness over seeds and test examples, and its bootstrap ``level`` interval
    (see :func:`bootstrap_accuracies`; ``correct[s][i]`` is seed ``s`` on example ``i``)."""
    replicates = bootstrap_accuracies([correct], resamples, seed)[:, 0]
    return (mean([mean(row) for row in correct]), *percentile_interval(replicates, level))


def difference_interval(correct_a: Sequence[Sequence[float]], correct_b: Sequence[Sequence[float]],
                        level: float = 0.95, resamples: int = BOOTSTRAP_RESAMPLES,
                        seed: int = BOOTSTRAP_SEED) -> tuple[float, float, float]:
    """(accuracy of a - accuracy of b, low, high): the paired bootstrap interval of the difference, both methods
    resampled on the same test examples in every replicate (seeds independently per method)."""
    replicates = bootstrap_accuracies([correct_a, correct_b], resamples, seed)
    estimate = mean([mean(row) for row in correct_a]) - mean([mean(row) for row in correct_b])
    return (estimate, *percentile_interval(replicates[:, 0] - replicates[:, 1], level))


# ------------------------------------------------------------------------------------- learning-rate sweeps
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
    """Every finished run in ``runs_dir`` of one of ``methods``."""
    paths = sorted(p for p in runs_dir.glob("*_seed*.json") if not p.name.endswith(".worker.json"))
    runs = [read_json(path) for path in paths]
    return [run for run in runs if run is not None and run.get("method") in methods]


def environment_for_report(env: dict, runs_dir: Path, report_only: bool) -> dict:
    """The sweep's environment (saved next to its runs) for a --report-only rebuild; else save and return ``env``."""
    path = runs_dir / "environment.json"
    if report_only:
        return {**(read_json(path) or {}), "report rebuilt by": env["command"]}
    write_json(path, env)
    return env


def add_sweep_arguments(parser, name: str, grids: dict, seeds_help: str = "first: LR search; rest: repeats",
                        workers: int = 1, threads: int = 2) -> None:
    """The options every learning-rate sweep script shares (methods, seeds, grid, execution, output);
    ``workers`` and ``threads`` are the script's defaults for ``--workers`` and ``--threads``."""
    import argparse

    parser.add_argument("--methods", nargs="+", default=list(grids), choices=list(grids))
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2], help=seeds_help)
    parser.add_argument("--extend", type=int, default=1, help="grid points added past an edge holding the best lr")
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
    summary = write_report(args, load_runs(args.runs, args.methods), env, seconds)
    for row in summary:
        print(summary_line(row))
    return summary


def write_markdown(out: Path, name: str, lines: list[str], smoke: bool) -> None:
    """``OUT/NAME.md`` from ``lines``, plus the hand-written ``OUT/NAME_findings.md`` (what the numbers show) as
    its last section when it exists (not in smoke runs, whose numbers it does not describe)."""
    findings = out / f"{name}_findings.md"
    if findings.exists() and not smoke:
        lines = [*lines, "## What this shows", "", findings.read_text().strip(), ""]
    (out / f"{name}.md").write_text("\n".join(lines))


def galore_available() -> bool:
    """Whether galore-torch (the ``bench`` extra) is installed; GaLore rows are left out without it."""
    import importlib.util

    return importlib.util.find_spec("galore_torch") is not None
