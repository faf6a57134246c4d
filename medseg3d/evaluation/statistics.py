"""Confidence intervals and paired tests for per-case scores: what a ranking needs.

Cases are the unit: the 95 % interval of a mean is Student's t over cases, and two methods are
compared on the same cases with the Wilcoxon signed-rank test of their per-case differences (no
normality assumed), as in the Medical Segmentation Decathlon's ranking analyses.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np
from pydantic import BaseModel, ConfigDict
from scipy import stats

__all__ = ["MeanCI", "PairedDifference", "mean_ci95", "paired_difference"]


class MeanCI(BaseModel):
    """A mean with the half-width of its 95 % t-interval (NaN for fewer than two values)."""

    model_config = ConfigDict(extra="forbid", frozen=True, ser_json_inf_nan="strings")

    mean: float
    ci95: float
    n: int


class PairedDifference(BaseModel):
    """``a - b`` on the same cases: mean, 95 % interval, wins, losses and Wilcoxon p."""

    model_config = ConfigDict(extra="forbid", frozen=True, ser_json_inf_nan="strings")

    mean: float
    ci95: float
    n: int
    wins: int
    losses: int
    p_wilcoxon: float


def mean_ci95(values: Sequence[float]) -> MeanCI:
    """Mean and 95 % t-interval half-width of the finite ``values``."""
    finite = np.asarray([v for v in values if math.isfinite(v)], dtype=np.float64)
    n = len(finite)
    if n == 0:
        return MeanCI(mean=math.nan, ci95=math.nan, n=0)
    if n == 1:
        return MeanCI(mean=float(finite[0]), ci95=math.nan, n=1)
    half = stats.t.ppf(0.975, n - 1) * finite.std(ddof=1) / math.sqrt(n)
    return MeanCI(mean=float(finite.mean()), ci95=float(half), n=n)


def paired_difference(a: Sequence[float], b: Sequence[float]) -> PairedDifference:
    """Compare ``a`` and ``b`` case by case (pairs with a non-finite value are dropped)."""
    if len(a) != len(b):
        raise ValueError(f"paired values need equal lengths, got {len(a)} and {len(b)}")
    diff = np.asarray([x - y for x, y in zip(a, b, strict=True)
                       if math.isfinite(x) and math.isfinite(y)], dtype=np.float64)
    summary = mean_ci95(diff.tolist())
    p = float(stats.wilcoxon(diff).pvalue) if np.count_nonzero(diff) else 1.0
    return PairedDifference(mean=summary.mean, ci95=summary.ci95, n=summary.n,
                            wins=int(np.sum(diff > 0)), losses=int(np.sum(diff < 0)), p_wilcoxon=p)
