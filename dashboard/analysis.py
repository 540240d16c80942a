"""Pure functions behind the charts' annotations (unit-tested; no Streamlit, no HTTP).

- Entropy collapse (our rule, not the paper's; the paper's body was not available): the first
  step at which the entropy, averaged over the trailing `window` points, is below `level` times
  its initial value (the mean of the first `window` points) while the trailing least-squares
  slope is negative. The level catches a collapse, the slope keeps a run that has already
  settled from being flagged late.
- KL budget exhaustion: the first step with KL at or over the budget; if none yet, the step at
  which a straight line through the last `window` points reaches it (None if KL is not rising).
- Pareto front: runs that no other run beats on both accuracy (higher) and KL spent (lower).
- Interval table: a run's last greedy and avg@k accuracy with 95% half-widths (1.96 SE).
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from datetime import datetime
from typing import Any

import pandas as pd

from erpd import metrics as M

Z95 = 1.96  # a 95% normal interval's half-width in standard errors


def _finite(steps: Sequence[int], values: Sequence[float | None]) -> tuple[list[int], list[float]]:
    pairs = [
        (s, v) for s, v in zip(steps, values, strict=True) if v is not None and math.isfinite(v)
    ]
    return [s for s, _ in pairs], [v for _, v in pairs]


def _slope(xs: Sequence[float], ys: Sequence[float]) -> float:
    n = len(xs)
    mx, my = sum(xs) / n, sum(ys) / n
    var = sum((x - mx) ** 2 for x in xs)
    return 0.0 if var == 0 else sum((x - mx) * (y - my) for x, y in zip(xs, ys, strict=True)) / var


def collapse_point(
    steps: Sequence[int],
    values: Sequence[float | None],
    *,
    level: float = 0.5,
    window: int = 5,
) -> int | None:
    """The step where entropy collapsed (see the module docstring), or None."""
    xs, ys = _finite(steps, values)
    if len(ys) < 2 * window:
        return None
    initial = sum(ys[:window]) / window
    if initial <= 0:
        return None
    for i in range(window, len(ys)):
        tail_x, tail_y = xs[i - window + 1 : i + 1], ys[i - window + 1 : i + 1]
        if sum(tail_y) / window < level * initial and _slope(tail_x, tail_y) < 0:
            return xs[i]
    return None


def last_healthy_checkpoint(
    checkpoints: Sequence[dict[str, Any]], collapse_step: int | None
) -> dict[str, Any] | None:
    """The latest checkpoint saved before the collapse (any, if there was none)."""
    before = [c for c in checkpoints if collapse_step is None or c["step"] < collapse_step]
    return max(before, key=lambda c: c["step"], default=None)


def budget_exhaustion(
    steps: Sequence[int],
    values: Sequence[float | None],
    budget: float | None,
    *,
    running: bool = True,
    window: int = 10,
) -> tuple[int | None, bool]:
    """(step, reached): where the KL budget was reached, or, while the run is `running`, where
    it will be at the current rate; (None, False) with no budget, too few points, KL not rising,
    or a run that ended short of its budget (it will never spend the rest)."""
    xs, ys = _finite(steps, values)
    if budget is None or not ys:
        return None, False
    for x, y in zip(xs, ys, strict=True):
        if y >= budget:
            return x, True
    if not running:
        return None, False
    tail_x, tail_y = xs[-window:], ys[-window:]
    if len(tail_x) < 2:
        return None, False
    slope = _slope(tail_x, tail_y)
    if slope <= 0:
        return None, False
    return math.ceil(tail_x[-1] + (budget - tail_y[-1]) / slope), False


def pareto_front(points: Sequence[tuple[float, float]]) -> list[int]:
    """Indices of the (kl, accuracy) points no other point dominates, by increasing KL."""
    front = []
    for i, (kl, acc) in enumerate(points):
        dominated = any(
            k <= kl and a >= acc and (k < kl or a > acc)
            for j, (k, a) in enumerate(points)
            if j != i
        )
        if not dominated:
            front.append(i)
    return sorted(front, key=lambda i: points[i][0])


def eta_seconds(
    started_at: str | None, step: int | None, total: int | None, now: datetime
) -> float | None:
    """Time left in the current phase at the rate so far (None before the first step)."""
    if not started_at or not step or not total or step >= total:
        return None
    elapsed = (now - datetime.fromisoformat(started_at)).total_seconds()
    return max(0.0, elapsed * (total - step) / step)


def last_values(
    series: Mapping[str, tuple[Sequence[int], Sequence[float | None]]], names: Sequence[str]
) -> dict[str, float | None]:
    """Each name's value at its last finite point (None when it has none)."""
    out: dict[str, float | None] = {}
    for name in names:
        _, values = _finite(*series.get(name, ([], [])))
        out[name] = values[-1] if values else None
    return out


def interval_table(finals: Mapping[str, Mapping[str, float | None]]) -> pd.DataFrame:
    """Per run: greedy and avg@k accuracy, each with its 95% half-width (1.96 standard errors),
    and the KL spent; a missing value is shown as empty, never as 0."""

    def half(value: float | None) -> float | None:
        return None if value is None else Z95 * value

    rows = {
        run: {
            "greedy": v.get(M.ACC_EVAL),
            "greedy ±": half(v.get(M.ACC_EVAL_SE)),
            "avg@k": v.get(M.ACC_EVAL_SAMPLED),
            "avg@k ±": half(v.get(M.ACC_EVAL_SAMPLED_SE)),
            "KL spent": v.get("KL spent"),
        }
        for run, v in finals.items()
    }
    return pd.DataFrame.from_dict(rows, orient="index").astype(float)  # None -> NaN: empty


def action_outcome(action: str, name: str, run: Mapping[str, Any]) -> str:
    """What a cancel or retry did, as the API answered it: a running run's cancel is a request
    its worker honours at the next optimizer step, so it is not 'now running'."""
    if action == "cancel" and run["status"] == "running" and run.get("cancel_requested"):
        return f"Cancel requested: run {name} stops at its next optimizer step, after saving."
    return f"Run {name} is now {run['status']}."
