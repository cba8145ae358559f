"""95 % confidence intervals for stage 4's headline numbers, and the rule that says whether two runs differ.

At 6 samples per user a top-1 moves by +-0.1 between draws of the same generator: a number without its
interval invites reading noise as progress. Proportions (a top-1 over n images) get the Wilson score
interval, which stays inside [0, 1] and is honest at small n and near 0 or 1 (unlike p +- 1.96 se).
Ratios and differences of proportions (identity relative to its ceiling, the augmentation gain) get a
percentile bootstrap over the images, with a fixed seed so a rerun prints the same interval.

These intervals cover the sampling noise of the images scored (which samples were drawn, which real val
images exist); they do not cover the classifier's own training seed. Numbers averaged over classifier seeds (the
augmentation gain, TSTR, the judge's mean) get seeds_and_images_interval, which resamples both. A bootstrap cannot
vary what never varies: when every image is right (or every pair of verdicts agrees) its interval is a point, and
the Wilson intervals of the parts are the honest width.
"""
import math
from typing import Callable, Sequence

import numpy as np

LEVEL = 0.95
Z = 1.959963984540054          # two-sided 95 % quantile of the standard normal
RESAMPLES = 2000               # bootstrap draws: the interval's ends move by < 0.01 between seeds at n ~ 100

Interval = tuple[float, float]


def wilson_interval(successes: int, n: int, z: float = Z) -> Interval | None:
    """Wilson score interval of a proportion successes / n (n images, each right or wrong); None when n == 0.

    Raises ValueError when successes is outside [0, n].
    """
    if n == 0:
        return None
    if not 0 <= successes <= n:
        raise ValueError(f"successes must be within [0, {n}], got {successes}")
    p = successes / n
    denom = 1 + z * z / n
    centre = (p + z * z / (2 * n)) / denom
    half = z / denom * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n))
    return max(0.0, centre - half), min(1.0, centre + half)


def proportion_interval(correct: np.ndarray) -> Interval | None:
    """Wilson interval of the share of True in a bool vector (one entry per image)."""
    correct = np.asarray(correct, dtype=bool)
    return wilson_interval(int(correct.sum()), len(correct))


def bootstrap_interval(groups: Sequence[np.ndarray], statistic: Callable[..., np.ndarray],
                       seed: int = 0, resamples: int = RESAMPLES) -> Interval | None:
    """Percentile bootstrap interval of statistic(*groups), each group resampled independently.

    groups: arrays of shape (n_i, ...) (rows are the units resampled; rows of a paired design go together).
    statistic: takes the resampled groups, each of shape (resamples, n_i, ...), returns (resamples,) values;
    NaN values (an undefined ratio in a draw) are ignored. None when a group is empty or every draw is NaN.
    """
    if any(len(g) == 0 for g in groups):
        return None
    rng = np.random.default_rng(seed)
    drawn = [np.asarray(g)[rng.integers(0, len(g), (resamples, len(g)))] for g in groups]
    return _percentile_interval(statistic(*drawn))


def _percentile_interval(values: np.ndarray) -> Interval | None:
    """The central LEVEL share of bootstrap draws (resamples,), NaN draws ignored; None when all are NaN."""
    values = np.asarray(values, dtype=float)
    if np.isnan(values).all():
        return None
    tail = (1 - LEVEL) / 2 * 100
    lo, hi = np.nanpercentile(values, [tail, 100 - tail])
    return float(lo), float(hi)


def seeds_and_images_interval(matrices: Sequence[np.ndarray], statistic: Callable[..., np.ndarray],
                              seed: int = 0, resamples: int = RESAMPLES) -> Interval | None:
    """Percentile bootstrap over classifier seeds and test images at once, for statistics of mean accuracies.

    matrices: arrays (K, N) of per-image outcomes (1 right, 0 wrong) of K classifiers (one per training seed) on
    the same N images, one array per recipe; row k of every array comes from seed k (a paired design). Each draw
    resamples the K seeds and the N images (both with replacement), the same rows and columns in every array, and
    hands statistic one (resamples,) array of mean outcomes per matrix (e.g. lambda c, b: c - b for a paired gain).
    Both noises a user meets are covered: which seed trained the classifier and which images it was tested on.
    With K = 5 seeds a percentile interval is somewhat narrower than a 95 % one should be (the spread of 5 draws
    underestimates the spread of the seeds); read it with the wins out of K. None when K or N is 0.
    """
    matrices = [np.asarray(m, dtype=float) for m in matrices]
    k, n = matrices[0].shape
    if k == 0 or n == 0:
        return None
    rng = np.random.default_rng(seed)
    rows, cols = rng.integers(0, k, (resamples, k)), rng.integers(0, n, (resamples, n))
    # Per draw and seed, the mean over the drawn images, (K, R); then the drawn seeds' rows averaged, (R,).
    means = [np.take_along_axis(m[:, cols].mean(-1).T, rows, axis=1).mean(1) for m in matrices]
    return _percentile_interval(statistic(*means))


def ratio_interval(numerator: np.ndarray, denominator: np.ndarray, seed: int = 0) -> Interval | None:
    """Interval of mean(numerator) / mean(denominator) for two independent bool vectors (e.g. generated
    top-1 over real-val top-1); draws whose denominator is 0 are left out."""
    def ratio(num: np.ndarray, den: np.ndarray) -> np.ndarray:
        d = den.mean(1)
        return np.where(d > 0, num.mean(1) / np.where(d > 0, d, 1), np.nan)
    return bootstrap_interval([np.asarray(numerator, float), np.asarray(denominator, float)], ratio, seed)


def paired_difference_interval(after: np.ndarray, before: np.ndarray, seed: int = 0) -> Interval | None:
    """Interval of mean(after) - mean(before) for two bool vectors over the same images (paired: an image
    is drawn with both of its outcomes, so what the two share cancels)."""
    diff = np.asarray(after, float) - np.asarray(before, float)
    return bootstrap_interval([diff], lambda d: d.mean(1), seed)


def overlap(a: Interval | None, b: Interval | None) -> bool | None:
    """True when two intervals share a point; None when either is unknown."""
    if a is None or b is None:
        return None
    return a[0] <= b[1] and b[0] <= a[1]


def as_list(interval: Interval | None) -> list[float] | None:
    """JSON form of an interval: [low, high] or None."""
    return None if interval is None else [float(interval[0]), float(interval[1])]
