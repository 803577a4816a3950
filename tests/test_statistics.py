"""Standard errors and confidence intervals of held-out metrics, against hand computations."""

import math
import statistics

import pytest

from megalign.evaluation.statistics import estimate, mean_interval, paired_difference, t_quantile_95

pytestmark = pytest.mark.unit


def test_standard_error_of_equal_sized_samples_is_that_of_their_means():
    values = [5.1, 4.7, 5.6, 4.9, 5.3]
    metric = estimate([v * 128 for v in values], [128] * 5)
    assert metric.value == pytest.approx(statistics.fmean(values))
    assert metric.per_sample == pytest.approx(values)
    assert metric.se == pytest.approx(statistics.stdev(values) / math.sqrt(5))


def test_standard_error_of_a_pooled_ratio_by_hand():
    sums, counts = [12.0, 3.0, 9.0], [4, 2, 6]
    metric = estimate(sums, counts)
    ratio = 24 / 12
    residuals = [12 - ratio * 4, 3 - ratio * 2, 9 - ratio * 6]  # 4, -1, -3
    assert metric.value == ratio
    assert metric.se == pytest.approx(math.sqrt(sum(r * r for r in residuals) / (3 * 2)) / 4)
    assert math.isnan(estimate([1.0], [1]).se)  # one sample: no spread to estimate


def test_t_intervals_and_paired_differences():
    assert t_quantile_95(2) == 4.303 and t_quantile_95(35) == 2.042 and t_quantile_95(10**6) == 1.98
    mean, low, high = mean_interval([0.4, 0.5, 0.6])
    assert mean == pytest.approx(0.5)
    assert high - mean == pytest.approx(4.303 * 0.1 / math.sqrt(3))
    assert mean - low == pytest.approx(high - mean)
    # paired: the same samples scored twice; a constant shift has no spread at all
    a, b = [5.0, 6.0, 7.5, 4.0], [4.9, 5.9, 7.4, 3.9]
    mean, low, high = paired_difference(a, b)
    assert (mean, low, high) == pytest.approx((0.1, 0.1, 0.1))
    with pytest.raises(ValueError, match="same samples"):
        paired_difference(a, b[:3])
