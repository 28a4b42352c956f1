"""Paired significance tests for comparing two rankings of the same queries.

Per-query values (reciprocal ranks, say) of system A and system B on the same queries:

- ``randomization_p``: Fisher's randomization (permutation) test of the mean difference: under
  the null the sign of each query's difference is exchangeable. Exact (every sign vector) when
  at most ``EXACT_MAX`` queries differ, otherwise ``n_perm`` random sign vectors from a seeded
  generator, with p = (1 + #{|T*| >= |T|}) / (1 + n_perm) (Smucker, Allan and Carterette,
  CIKM 2007, recommend it for IR evaluation);
- ``paired_t_p``: the paired t-test (``scipy.stats.ttest_rel``);
- ``holm``: Holm's step-down correction of a family of p-values;
- ``win_tie_loss``: how many queries A beats, ties and loses to B.

A test on values that never differ returns p = 1.
"""

from __future__ import annotations

import itertools
from collections.abc import Sequence

import numpy as np

EXACT_MAX = 16  # queries with a nonzero difference up to which every sign vector is enumerated
N_PERM = 10_000


def _diffs(a: Sequence[float], b: Sequence[float]) -> np.ndarray:
    a, b = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
    if a.shape != b.shape:
        raise ValueError(f"paired values of different lengths: {a.shape} and {b.shape}")
    return a - b


def randomization_p(a: Sequence[float], b: Sequence[float], n_perm: int = N_PERM, seed: int = 0) -> float:
    """Two-sided p-value of Fisher's paired randomization test on the mean difference."""
    d = _diffs(a, b)
    d = d[d != 0]  # a zero difference is the same under either sign
    if not len(d):
        return 1.0
    observed = abs(d.sum()) * (1 - 1e-12)  # sums, not means (same n); the margin keeps float ties counted
    if len(d) <= EXACT_MAX:
        signs = np.array(list(itertools.product((1.0, -1.0), repeat=len(d))))  # (2^n, n)
        return float(np.mean(np.abs(signs @ d) >= observed))
    rng = np.random.default_rng(seed)
    hits, done = 0, 0
    while done < n_perm:  # blocks bound the memory: (block, n) signs at a time
        m = min(n_perm - done, max(1, 2_000_000 // len(d)))
        signs = rng.integers(0, 2, size=(m, len(d)), dtype=np.int8) * 2 - 1
        hits += int(np.count_nonzero(np.abs(signs @ d) >= observed))
        done += m
    return (1 + hits) / (1 + n_perm)


def paired_t_p(a: Sequence[float], b: Sequence[float]) -> float:
    """Two-sided p-value of the paired t-test (1 when the values never differ; 0 when they
    differ by the same nonzero amount on every query)."""
    from scipy.stats import ttest_rel

    d = _diffs(a, b)
    if not np.any(d):
        return 1.0
    if len(d) < 2:
        return 1.0
    if np.ptp(d) <= 1e-12 * np.abs(d).max():  # no variance (to rounding), nonzero mean: t is infinite
        return 0.0
    return float(ttest_rel(np.asarray(a, np.float64), np.asarray(b, np.float64)).pvalue)


def holm(pvalues: Sequence[float]) -> list[float]:
    """Holm-adjusted p-values, in the order given: the i-th smallest of m is multiplied by
    (m - i + 1), made non-decreasing in that order and capped at 1."""
    p = np.asarray(pvalues, dtype=np.float64)
    m = len(p)
    order = np.argsort(p, kind="stable")
    adjusted = np.empty(m)
    running = 0.0
    for i, j in enumerate(order):
        running = max(running, min(1.0, (m - i) * p[j]))
        adjusted[j] = running
    return adjusted.tolist()


def win_tie_loss(a: Sequence[float], b: Sequence[float]) -> tuple[int, int, int]:
    """Queries where A is above, equal to and below B."""
    d = _diffs(a, b)
    return int((d > 0).sum()), int((d == 0).sum()), int((d < 0).sum())
