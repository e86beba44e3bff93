"""Timing on a shared CPU: methods interleaved within each repeat (``time_interleaved``), repeats during which
other processes took more than 5% of the CPU time left out (``clean_subset``), waiting for idle CPUs or a low load
average before measuring, and the median of per-repeat ratios to a baseline (``paired_ratio``), which cancels a
burst of load that hits every method of a repeat alike.
"""

from __future__ import annotations

import os
import statistics
import time
from collections import defaultdict
from collections.abc import Callable, Sequence
from typing import Any

from environment import load_average


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
    rotate: bool = True,
    prepare: Callable[[], Any] | None = None,
) -> tuple[dict[str, list[float]], list[bool]]:
    """Per-method times, methods interleaved within each repeat (order rotated every repeat unless ``rotate`` is
    False), and whether each repeat was clean: other processes used less than 5% of the CPU time it spanned.

    Warm-up: ``warmup`` seconds and at least ``warmup_repeats`` untimed rounds over all methods. Each timed
    repeat first waits up to ``wait_idle`` s for idle CPUs (0: never waits). ``prepare``, when given, runs
    untimed before every step (warm-up included), e.g. to restore inputs that a step rewrites in place.
    """
    prepare = prepare or (lambda: None)
    end, rounds = time.perf_counter() + warmup, 0
    while rounds < warmup_repeats or time.perf_counter() < end:
        for step in steppers.values():
            prepare()
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
        shift = repeat % len(names) if rotate else 0
        for name in names[shift:] + names[:shift]:
            prepare()
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
