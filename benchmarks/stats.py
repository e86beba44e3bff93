"""Summary statistics of the quality benchmarks: mean and sample standard deviation of per-seed values, and
percentile-bootstrap confidence intervals of test accuracy over test examples and seeds (``accuracy_interval``), and
of the paired difference between two methods (``difference_interval``), with a fixed number of resamples and a
fixed RNG seed so that a rebuilt report gives the same intervals.
"""

from __future__ import annotations

import statistics
from collections.abc import Sequence


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
