"""Confidence intervals and paired tests over cases."""

from __future__ import annotations

import math

import pytest

from medseg3d.evaluation.statistics import mean_ci95, paired_difference


def test_mean_ci95_is_the_t_interval_over_finite_values() -> None:
    result = mean_ci95([1.0, 2.0, 3.0, math.nan, math.inf])
    # t(0.975, 2) = 4.3027; sd = 1; sqrt(3)
    assert result.n == 3 and result.mean == 2.0
    assert result.ci95 == pytest.approx(4.302653 / math.sqrt(3), rel=1e-5)
    assert math.isnan(mean_ci95([0.5]).ci95) and mean_ci95([0.5]).mean == 0.5
    assert mean_ci95([]).n == 0 and math.isnan(mean_ci95([]).mean)


def test_paired_difference_counts_wins_and_tests_the_shift() -> None:
    a = [0.90, 0.91, 0.92, 0.93, 0.94, 0.95, 0.96, 0.97]
    b = [x - 0.02 for x in a]
    result = paired_difference(a, b)
    assert result.mean == pytest.approx(0.02) and (result.wins, result.losses) == (8, 0)
    assert result.p_wilcoxon < 0.01
    same = paired_difference(a, a)
    assert same.p_wilcoxon == 1.0 and same.wins == same.losses == 0
    assert paired_difference([1.0, math.nan], [0.0, 0.0]).n == 1  # pairs with NaN are dropped
    with pytest.raises(ValueError):
        paired_difference([1.0], [1.0, 2.0])
