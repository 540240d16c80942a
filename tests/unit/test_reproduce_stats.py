"""Paired differences over seeds and their t intervals (erpd/reproduce/stats.py)."""

from __future__ import annotations

import math

import pytest

from erpd.reproduce.stats import interval, mean_se, paired, t_quantile, unpaired


def test_t_quantiles_at_the_seed_counts_of_the_presets() -> None:
    # two-sided 95%: the textbook values at 1 and 3 degrees of freedom
    assert t_quantile(2) == pytest.approx(12.706, abs=1e-3)
    assert t_quantile(4) == pytest.approx(3.182, abs=1e-3)
    assert t_quantile(4, level=0.90) == pytest.approx(2.353, abs=1e-3)
    # many seeds: close to the normal quantile
    assert t_quantile(10_000) == pytest.approx(1.960, abs=1e-3)
    with pytest.raises(ValueError, match="at least 2"):
        t_quantile(1)


def test_a_hand_built_paired_interval() -> None:
    a = [0.60, 0.55, 0.62, 0.58]
    b = [0.50, 0.50, 0.52, 0.54]
    ci = paired(a, b)
    # differences 0.10, 0.05, 0.10, 0.04: mean 0.0725, sample SD 0.0320156, SE 0.0160078
    assert ci.n == 4 and ci.paired
    assert ci.mean == pytest.approx(0.0725)
    assert ci.se == pytest.approx(0.0160078, rel=1e-4)
    half = 3.182446 * 0.0160078
    assert ci.lo == pytest.approx(0.0725 - half, rel=1e-4)
    assert ci.hi == pytest.approx(0.0725 + half, rel=1e-4)
    assert ci.known and ci.text() == "+0.072 [+0.022, +0.123] n=4"


def test_pairing_removes_the_seed_to_seed_spread() -> None:
    # batch seeds differ a lot in difficulty; arm a is 2 points above b on every one of them
    b = [0.30, 0.50, 0.70]
    a = [x + 0.02 for x in b]
    ci = paired(a, b)
    assert ci.lo == pytest.approx(0.02) and ci.hi == pytest.approx(0.02)
    # the same numbers without pairing cannot tell the arms apart
    loose = unpaired(
        {"mean": 0.52, "std": 0.2, "n": 3},
        {"mean": 0.50, "std": 0.2, "n": 3},
    )
    assert loose.lo < 0 < loose.hi and not loose.paired


def test_one_seed_gives_no_interval_and_missing_values_are_dropped() -> None:
    one = interval([0.2])
    assert one.n == 1 and not one.known and math.isnan(one.lo)
    assert one.text() == "+0.200 (no interval, n=1)"
    # a seed whose value is missing (null in results.json) leaves the pair out
    ci = paired([0.5, None, 0.7], [0.4, 0.3, 0.5])
    assert ci.n == 2 and ci.mean == pytest.approx(0.15)
    assert interval([]).n == 0 and interval([]).text() == "no data (n=0)"
    with pytest.raises(ValueError, match="one value per seed"):
        paired([0.1, 0.2], [0.1])


def test_unpaired_interval_from_summaries() -> None:
    ci = unpaired({"mean": 0.6, "std": 0.04, "n": 4}, {"mean": 0.5, "std": 0.03, "n": 4})
    se = math.sqrt(0.04**2 / 4 + 0.03**2 / 4)
    assert ci.se == pytest.approx(se)
    assert ci.lo == pytest.approx(0.1 - t_quantile(4) * se)
    assert not unpaired({"mean": 0.6, "std": 0.0, "n": 1}, {"mean": 0.5, "std": 0, "n": 4}).known


def test_mean_and_standard_error() -> None:
    mean, se, n = mean_se([0.4, 0.5, None, 0.6])
    assert (mean, n) == (pytest.approx(0.5), 3)
    assert se == pytest.approx(0.1 / math.sqrt(3))
    assert math.isnan(mean_se([0.4])[1]) and mean_se([])[2] == 0
