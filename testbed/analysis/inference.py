"""Small inference helpers shared by the reports: t intervals, paired tests, Holm's step-down correction,
the smallest effect a paired test detects, and a least-squares trend with its interval.

Definitions (docs/ and experiments/README.md cite these):
- 95% CI of a mean over n values: mean ± t_{0.975, n-1} · sd / sqrt(n) (sd with n - 1).
- Paired test of B - A over seeds: the one-sample t-test of the per-seed differences against 0.
- Holm (1979): sort the m p-values of a family ascending, p_(1) ≤ ... ≤ p_(m); the adjusted value of p_(i) is
  max_{j ≤ i} min(1, (m - j + 1) · p_(j)). A finding survives at level 0.05 when its adjusted p < 0.05. It
  controls the family-wise error rate under any dependence between the tests.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np
from scipy import stats


def finite(values: Sequence) -> list[float]:
    out = []
    for value in values:
        if isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value):
            out.append(float(value))
    return out


def ci95(values: Sequence) -> tuple[float, float, int]:
    """(mean, half-width of the 95% t interval, n) over the finite values; half-width nan for n < 2,
    mean nan for n = 0."""
    xs = finite(values)
    n = len(xs)
    if n == 0:
        return math.nan, math.nan, 0
    mean = float(np.mean(xs))
    if n < 2:
        return mean, math.nan, n
    sd = float(np.std(xs, ddof=1))
    return mean, float(stats.t.ppf(0.975, n - 1) * sd / math.sqrt(n)), n


def one_sample_p(differences: Sequence) -> float:
    """Two-sided p of the t-test of the mean difference against 0 (nan for n < 2; 0 or 1 when every
    difference is the same: certain if that is not 0, no evidence if it is)."""
    xs = finite(differences)
    if len(xs) < 2:
        return math.nan
    if float(np.std(xs, ddof=1)) <= 1e-12 * max(1.0, abs(float(np.mean(xs)))):  # no spread (up to rounding)
        return 0.0 if abs(float(np.mean(xs))) > 1e-12 else 1.0
    return float(stats.ttest_1samp(xs, 0.0).pvalue)


def holm(p_values: Sequence[float]) -> list[float]:
    """Holm-adjusted p-values in the input order (nan stays nan and does not count towards m)."""
    indexed = [(p, i) for i, p in enumerate(p_values) if isinstance(p, int | float) and math.isfinite(p)]
    m = len(indexed)
    adjusted = [math.nan] * len(p_values)
    running = 0.0
    for rank, (p, i) in enumerate(sorted(indexed)):
        running = max(running, min(1.0, (m - rank) * p))
        adjusted[i] = running
    return adjusted


def trend(x: Sequence[float], y: Sequence[float]) -> dict:
    """Least-squares line y = a + b x: slope b with its 95% t interval (n - 2 degrees of freedom), the
    intercept, and x0 = -a / b where the line crosses 0 (nan when the slope is 0)."""
    xs, ys = np.asarray(x, dtype=float), np.asarray(y, dtype=float)
    n = len(xs)
    if n < 3 or float(np.ptp(xs)) == 0:
        return {"n": n, "slope": math.nan, "slope_half": math.nan, "intercept": math.nan, "x0": math.nan}
    fit = stats.linregress(xs, ys)
    half = float(stats.t.ppf(0.975, n - 2) * fit.stderr)
    x0 = -fit.intercept / fit.slope if fit.slope != 0 else math.nan
    return {
        "n": n,
        "slope": float(fit.slope),
        "slope_half": half,
        "intercept": float(fit.intercept),
        "x0": float(x0),
    }
