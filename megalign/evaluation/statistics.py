"""Means over held-out samples with their standard errors, and confidence intervals.

Why: a held-out metric is an estimate from a finite sample of text and masks; comparing two runs
needs its standard error beside it, and runs scored on the same samples (``evaluation.seed``) are
compared through their per-sample differences, whose spread is far smaller than the metric's.

A metric pooled over samples of different sizes (tokens of a continuation, supervised positions)
is a ratio ``R = sum(y_i) / sum(n_i)``; its standard error is the ratio estimator's linearised one,
``sqrt(sum((y_i - R n_i)^2) / (k (k - 1))) / mean(n)``, which is ``stdev(y_i / n) / sqrt(k)`` when
every ``n_i`` is the same ``n``.
"""

from __future__ import annotations

import math
import statistics
from dataclasses import dataclass

# two-sided 95% quantiles of Student's t by degrees of freedom (beyond the table: the next smaller
# tabulated value's, which is conservative)
_T95 = {1: 12.706, 2: 4.303, 3: 3.182, 4: 2.776, 5: 2.571, 6: 2.447, 7: 2.365, 8: 2.306,
        9: 2.262, 10: 2.228, 11: 2.201, 12: 2.179, 13: 2.160, 14: 2.145, 15: 2.131, 16: 2.120,
        17: 2.110, 18: 2.101, 19: 2.093, 20: 2.086, 25: 2.060, 30: 2.042, 40: 2.021, 60: 2.000,
        120: 1.980}


@dataclass(frozen=True)
class Estimate:
    """A pooled mean over samples: ``value`` = sum(sums) / sum(counts), with its standard error."""

    sums: tuple
    counts: tuple

    @property
    def value(self) -> float:
        total = sum(self.counts)
        return sum(self.sums) / total if total else math.nan

    @property
    def per_sample(self) -> list[float]:
        """Each sample's own mean (what paired comparisons difference)."""
        return [s / n if n else math.nan for s, n in zip(self.sums, self.counts)]

    @property
    def se(self) -> float:
        k = len(self.counts)
        if k < 2 or not sum(self.counts):
            return math.nan
        ratio, mean_count = self.value, sum(self.counts) / k
        squares = sum((s - ratio * n) ** 2 for s, n in zip(self.sums, self.counts))
        return math.sqrt(squares / (k * (k - 1))) / mean_count


def estimate(sums, counts) -> Estimate:
    return Estimate(tuple(float(s) for s in sums), tuple(float(n) for n in counts))


def t_quantile_95(dof: int) -> float:
    """Two-sided 95% quantile of Student's t with ``dof`` degrees of freedom."""
    if dof < 1:
        return math.nan
    return _T95[max(d for d in _T95 if d <= dof)]


def mean_interval(values) -> tuple[float, float, float]:
    """(mean, low, high): the mean and its 95% t confidence interval (nan bounds below 2 values)."""
    values = [float(v) for v in values]
    mean = statistics.fmean(values) if values else math.nan
    if len(values) < 2:
        return mean, math.nan, math.nan
    half = t_quantile_95(len(values) - 1) * statistics.stdev(values) / math.sqrt(len(values))
    return mean, mean - half, mean + half


def paired_difference(a: list, b: list) -> tuple[float, float, float]:
    """(mean, low, high) of ``a[i] - b[i]`` over samples scored in both (a 95% t interval)."""
    if len(a) != len(b):
        raise ValueError(f"paired values need the same samples: {len(a)} against {len(b)}")
    return mean_interval([x - y for x, y in zip(a, b) if math.isfinite(x) and math.isfinite(y)])
