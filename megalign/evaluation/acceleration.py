"""How much sooner an aligned conversion gets somewhere: acceleration curves and their spread.

The paper's notion of "x times faster": for each evaluation step ``k`` of the plain (λ = 0) run,
the steps the aligned run needs to reach the plain run's value at ``k``, divided by ``k``. A
ratio of 0.5 means the aligned run got there in half the steps. Between two evaluations the
aligned curve is read linearly (the first crossing), so the ratio is not quantised to the
evaluation interval. A value the aligned run never reaches gives None. Where the plain run is no
better than at its start (step 0, where both runs are the same model), the ratio is undefined
(any run is "there" at step 0) and the point is left out. In compute, each ratio is multiplied by
the aligned step's cost over the plain step's (time or FLOPs).

That reading credits the aligned run whenever the plain run gets worse late (forgetting,
overfitting): its value at the last k is then one it had reached long before k. The strict reading
(``strict_ratio``) asks for the plain run's final value and divides the steps the aligned run needs
to reach it by the steps the plain run itself first reached it in.
"""

from __future__ import annotations

import math
import statistics
from typing import Optional

from megalign.evaluation.statistics import mean_interval


def steps_to_reach(curve: list, target: float, direction: int) -> Optional[float]:
    """The first step at which ``curve`` ([[step, value], ...], ascending steps) is at or past
    ``target`` (``direction`` +1: higher is better, -1: lower is better), interpolating linearly
    between evaluations; None if it never gets there."""
    previous = None
    for step, value in curve:
        if value is None or not math.isfinite(value):
            previous = None
            continue
        if direction * (value - target) >= 0:
            if previous is None or previous[1] == value:
                return float(step)
            before_step, before_value = previous
            fraction = (target - before_value) / (value - before_value)
            return before_step + max(0.0, min(1.0, fraction)) * (step - before_step)
        previous = (step, value)
    return None


def acceleration_curve(baseline: list, aligned: list, direction: int) -> list:
    """[[k, ratio], ...] for every evaluation step k > 0 of ``baseline`` where it is better than
    at its start: the steps ``aligned`` needs to reach the baseline's value at k, over k (None:
    not reached)."""
    start = next((value for step, value in baseline if step == 0), None)
    curve = []
    for k, value in baseline:
        if k <= 0 or value is None or not math.isfinite(value):
            continue
        if start is not None and direction * (value - start) <= 0:
            continue  # no better than the start: undefined
        steps = steps_to_reach(aligned, value, direction)
        curve.append([k, None if steps is None else steps / k])
    return curve


def final_ratio(curve: list, baseline: list) -> tuple[Optional[float], str]:
    """(ratio, status) at the baseline's last evaluation: status ``reached`` with the ratio,
    ``not reached`` (the aligned run never got there) or ``undefined`` (the baseline ended no
    better than it started), both with None."""
    last = max((step for step, value in baseline if value is not None), default=None)
    if not curve or curve[-1][0] != last:
        return None, "undefined"
    return curve[-1][1], "reached" if curve[-1][1] is not None else "not reached"


def strict_ratio(baseline: list, aligned: list, direction: int) -> tuple[Optional[float], str]:
    """(ratio, status) of the strict reading: the steps ``aligned`` needs to reach the baseline's
    final value over the steps the baseline first reached it in (both interpolated). Status as
    ``final_ratio``'s: ``reached``, ``not reached`` or ``undefined`` (the baseline ended no better
    than it started)."""
    points = [(step, value) for step, value in baseline
              if value is not None and math.isfinite(value)]
    start = next((value for step, value in points if step == 0), None)
    if not points or start is None or direction * (points[-1][1] - start) <= 0:
        return None, "undefined"
    final = points[-1][1]
    own = steps_to_reach(baseline, final, direction)
    steps = steps_to_reach(aligned, final, direction)
    if steps is None:
        return None, "not reached"
    return steps / own, "reached"


def spread_over_seeds(ratios: list) -> dict:
    """Median, mean and 95% t interval of per-seed ratios; ``all_defined`` is False when some
    seed has none (never reached, or undefined), and the median and interval are then over the
    seeds that have one, so they must be read with it."""
    defined = [r for r in ratios if r is not None]
    mean, low, high = mean_interval(defined)
    return {"ratios": ratios, "all_defined": len(defined) == len(ratios),
            "median": statistics.median(defined) if defined else None,
            "mean": mean if defined else None,
            "ci95": [low, high] if len(defined) > 1 else None,
            "max": max(defined) if defined else None}
