"""Paired significance tests against scipy's exact permutation test, scipy's t-test and
hand-computed Holm adjustments."""

from __future__ import annotations

import numpy as np
import pytest

from vtfusion.search import stats


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_exact_randomization_equals_scipy_permutation_test(seed):
    from scipy.stats import permutation_test

    rng = np.random.default_rng(seed)
    a = rng.integers(0, 4, size=12) / 4.0  # ties and zero differences included
    b = rng.integers(0, 4, size=12) / 4.0
    ref = permutation_test((a, b), lambda x, y, axis: np.mean(x - y, axis=axis), permutation_type="samples",
                           n_resamples=np.inf, alternative="two-sided").pvalue
    assert stats.randomization_p(a, b) == pytest.approx(ref, abs=1e-12)


def test_sampled_randomization_is_close_to_exact_and_seeded():
    rng = np.random.default_rng(5)
    a, b = rng.normal(size=40), rng.normal(size=40) + 0.3
    from scipy.stats import permutation_test

    ref = permutation_test((a, b), lambda x, y, axis: np.mean(x - y, axis=axis), permutation_type="samples",
                           n_resamples=200_000, alternative="two-sided", random_state=1).pvalue
    p = stats.randomization_p(a, b, n_perm=20_000)
    assert abs(p - ref) < 0.01
    assert p == stats.randomization_p(a, b, n_perm=20_000)  # seeded: the same report twice
    assert stats.randomization_p(a, a.copy()) == 1.0


def test_paired_t_and_win_tie_loss():
    from scipy.stats import ttest_rel

    a = np.array([1.0, 0.5, 0.25, 1.0, 0.2, 0.0])
    b = np.array([0.5, 0.5, 1.0, 0.2, 0.1, 0.0])
    assert stats.paired_t_p(a, b) == pytest.approx(ttest_rel(a, b).pvalue)
    assert stats.win_tie_loss(a, b) == (3, 2, 1)
    assert stats.paired_t_p(a, a) == 1.0
    assert stats.paired_t_p(a + 0.5, a) == 0.0  # the same nonzero gain on every query


def test_holm_by_hand():
    # sorted 0.01, 0.02, 0.04, 0.30 with m = 4: 0.04, 0.06, 0.08, 0.30 (monotone), in the given order
    assert stats.holm([0.04, 0.01, 0.30, 0.02]) == pytest.approx([0.08, 0.04, 0.30, 0.06])
    assert stats.holm([0.5, 0.4]) == pytest.approx([0.8, 0.8])  # 0.4 * 2 = 0.8, then max(0.8, 0.5)
    assert stats.holm([0.9, 0.9, 0.9]) == [1.0, 1.0, 1.0]
    assert stats.holm([]) == []
