"""benchmarks/stats.py's bootstrap intervals against independent computations: exact distributions on tiny
cases and the normal approximation on large samples."""

import math

import numpy as np
import pytest
from benchmark_scripts import load_benchmark


@pytest.fixture(scope="module")
def stats():
    return load_benchmark("stats")


def pattern(n: int, accuracy: float, offset: int = 0) -> list[int]:
    """A fixed 0/1 sequence of length n whose mean is accuracy (no randomness in the data itself)."""
    return [int((i * 7919 + offset) % 1000 < 1000 * accuracy) for i in range(n)]


def test_two_examples_one_seed_gives_the_exact_resampling_distribution(stats):
    # Two draws from {right, wrong}: accuracy 0, 1/2, 1 with probabilities 1/4, 1/2, 1/4.
    replicates = stats.bootstrap_accuracies([[[1, 0]]], resamples=20_000)[:, 0]
    frequencies = [np.mean(replicates == value) for value in (0.0, 0.5, 1.0)]
    assert frequencies == pytest.approx([0.25, 0.5, 0.25], abs=0.015)


def test_seeds_are_resampled_with_replacement(stats):
    # Each seed right on every example or wrong on every example: resampling examples changes nothing, and the
    # replicate is k/3 where k ~ Binomial(3, 2/3) counts the drawn seeds that were right.
    correct = [[1] * 50, [0] * 50, [1] * 50]
    replicates = stats.bootstrap_accuracies([correct], resamples=20_000)[:, 0]
    exact = [math.comb(3, k) * (2 / 3) ** k * (1 / 3) ** (3 - k) for k in range(4)]
    frequencies = [np.mean(np.isclose(replicates, k / 3)) for k in range(4)]
    assert frequencies == pytest.approx(exact, abs=0.015)


def test_accuracy_interval_matches_the_normal_approximation_on_a_large_sample(stats):
    n, p = 4000, 0.75
    correct = [pattern(n, p)]
    estimate, low, high = stats.accuracy_interval(correct)
    half_width = 1.96 * math.sqrt(p * (1 - p) / n)
    assert estimate == pytest.approx(p, abs=1e-3)
    assert (high - low) / 2 == pytest.approx(half_width, rel=0.08)
    assert (low + high) / 2 == pytest.approx(estimate, abs=0.003)


def test_paired_difference_matches_the_normal_approximation_of_paired_differences(stats):
    n = 4000
    a = pattern(n, 0.78)
    b = [x if i % 10 else 1 - x for i, x in enumerate(a)]  # disagrees with a on every tenth example only
    estimate, low, high = stats.difference_interval([a], [b])
    d = np.asarray(a, dtype=float) - np.asarray(b, dtype=float)
    half_width = 1.96 * d.std(ddof=1) / math.sqrt(n)
    assert estimate == pytest.approx(d.mean())
    assert (high - low) / 2 == pytest.approx(half_width, rel=0.08)
    # pairing matters: treating a and b as independent samples gives an interval about twice as wide
    unpaired = 1.96 * math.sqrt(np.var(a) / n + np.var(b) / n)
    assert (high - low) / 2 < 0.6 * unpaired


def test_fixed_seed_reproduces_and_shapes_are_checked(stats):
    correct = [pattern(300, 0.6), pattern(300, 0.7, offset=13)]
    assert stats.accuracy_interval(correct) == stats.accuracy_interval(correct)
    assert stats.accuracy_interval(correct, seed=1) != stats.accuracy_interval(correct)
    with pytest.raises(ValueError, match="same test examples"):
        stats.bootstrap_accuracies([[pattern(300, 0.6)], [pattern(299, 0.6)]])
