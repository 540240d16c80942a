"""Paired differences across seeds and their confidence intervals: what every verdict reads.

The arms of one seed share that seed's fixed batch (the same prompts, responses and minibatch
order), so arm A and arm B are compared seed by seed: d_s = A_s - B_s. The verdicts read the
mean of the d_s, its standard error SD(d)/sqrt(n), and a two-sided interval at LEVEL from
Student's t with n - 1 degrees of freedom:

    mean(d) ± t_{1 - (1 - LEVEL)/2, n-1} · SD(d) / sqrt(n)

With n = 1 there is no spread to estimate and no interval: a comparison on one seed is
inconclusive by construction. The t quantile is large at the seed counts the presets use (12.7 at
n = 2, 3.18 at n = 4), and that is the honest price of few seeds.

No bootstrap: with 2-4 seeds a paired bootstrap resamples among at most n^n distinct means and
its percentile interval is far too narrow (at n = 2 it never extends beyond the two observed
differences), so the t interval is used everywhere.

Where only per-epoch summaries exist (a stage-1 curve keeps mean and SD per epoch, not each
seed's value), `unpaired` gives the interval of a difference of two means from their standard
deviations with the same n - 1 degrees of freedom. It ignores the positive correlation of one
seed's runs across epochs, which makes it wider than the paired interval would be: conservative.
"""

from __future__ import annotations

import math
import statistics
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from scipy import stats as _scipy_stats

LEVEL = 0.95  # every interval in the report is a two-sided 95% interval


def t_quantile(n: int, level: float = LEVEL) -> float:
    """The two-sided t multiplier for a mean of n values (n - 1 degrees of freedom)."""
    if n < 2:
        raise ValueError(f"a t interval needs at least 2 values, got {n}")
    if not 0 < level < 1:
        raise ValueError(f"level must be in (0, 1), got {level}")
    return float(_scipy_stats.t.ppf(1 - (1 - level) / 2, n - 1))


@dataclass(frozen=True)
class Interval:
    """A difference estimated over n seeds, with its standard error and confidence interval.

    lo and hi are NaN when there is no interval (n < 2); `known` says whether there is one.
    """

    mean: float
    se: float
    lo: float
    hi: float
    n: int
    level: float = LEVEL
    paired: bool = True

    @property
    def known(self) -> bool:
        return self.n >= 2 and math.isfinite(self.lo) and math.isfinite(self.hi)

    def text(self, digits: int = 3) -> str:
        """'+0.034 [-0.012, +0.080] n=4', or '+0.034 (no interval, n=1)'."""
        if math.isnan(self.mean):
            return "no data (n=0)"
        head = f"{self.mean:+.{digits}f}"
        if not self.known:
            return f"{head} (no interval, n={self.n})"
        return f"{head} [{self.lo:+.{digits}f}, {self.hi:+.{digits}f}] n={self.n}"

    def as_dict(self) -> dict[str, Any]:
        return {
            "diff": self.mean,
            "se": self.se,
            "lo": self.lo,
            "hi": self.hi,
            "n": self.n,
            "level": self.level,
            "paired": self.paired,
        }


def _finite(value: Any) -> float:
    """A per-seed value as a float; a missing one (None in JSON) is NaN."""
    if value is None:
        return math.nan
    return float(value)


def interval(diffs: Sequence[float], level: float = LEVEL) -> Interval:
    """Mean, standard error and t interval of paired differences (NaNs dropped)."""
    xs = [d for d in (_finite(v) for v in diffs) if not math.isnan(d)]
    n = len(xs)
    if n == 0:
        return Interval(math.nan, math.nan, math.nan, math.nan, 0, level)
    mean = statistics.fmean(xs)
    if n == 1:
        return Interval(mean, math.nan, math.nan, math.nan, 1, level)
    se = statistics.stdev(xs) / math.sqrt(n)
    half = t_quantile(n, level) * se
    return Interval(mean, se, mean - half, mean + half, n, level)


def paired(a: Sequence[Any], b: Sequence[Any], level: float = LEVEL) -> Interval:
    """The interval of a - b over seeds; a seed missing either value is left out of both."""
    if len(a) != len(b):
        raise ValueError(
            f"paired comparison needs one value per seed in both arms: {len(a)} != {len(b)}"
        )
    return interval([_finite(x) - _finite(y) for x, y in zip(a, b, strict=True)], level)


def unpaired(a: dict[str, Any], b: dict[str, Any], level: float = LEVEL) -> Interval:
    """The interval of mean(a) - mean(b) from two {"mean", "std", "n"} summaries.

    Degrees of freedom: min(n_a, n_b) - 1 (smaller than Welch's, so wider). Used only where the
    per-seed values are not kept (curve points).
    """
    mean = _finite(a.get("mean")) - _finite(b.get("mean"))
    n = min(int(a.get("n") or 0), int(b.get("n") or 0))
    if math.isnan(mean) or n == 0:
        return Interval(math.nan, math.nan, math.nan, math.nan, 0, level, paired=False)
    if n == 1:
        return Interval(mean, math.nan, math.nan, math.nan, 1, level, paired=False)
    se = math.sqrt(_finite(a["std"]) ** 2 / a["n"] + _finite(b["std"]) ** 2 / b["n"])
    half = t_quantile(n, level) * se
    return Interval(mean, se, mean - half, mean + half, n, level, paired=False)


def mean_se(values: Sequence[Any]) -> tuple[float, float, int]:
    """Mean, standard error of the mean (NaN for one value) and n, NaNs dropped."""
    xs = [x for x in (_finite(v) for v in values) if not math.isnan(x)]
    if not xs:
        return math.nan, math.nan, 0
    if len(xs) == 1:
        return xs[0], math.nan, 1
    return statistics.fmean(xs), statistics.stdev(xs) / math.sqrt(len(xs)), len(xs)
