"""The dashboard's annotations: collapse rule, budget extrapolation, Pareto front, merging polls."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

from dashboard import charts
from dashboard.analysis import (
    action_outcome,
    budget_exhaustion,
    collapse_point,
    eta_seconds,
    last_healthy_checkpoint,
    pareto_front,
)
from dashboard.series import RunSeries
from erpd import metrics as M


def test_collapse_is_where_the_smoothed_entropy_halves_while_falling() -> None:
    steps = list(range(20))
    entropy = [2.0] * 8 + [2.0 - 0.25 * i for i in range(1, 8)] + [0.2] * 5
    # trailing mean of 5 first drops below 1.0 at step 13 (values 1.25 .. 0.25 -> 0.75 mean)
    step = collapse_point(steps, entropy)
    assert step is not None and 10 <= step <= 14
    window = entropy[step - 4 : step + 1]
    assert sum(window) / 5 < 1.0


def test_no_collapse_for_flat_short_or_gently_falling_series() -> None:
    assert collapse_point(list(range(20)), [1.0] * 20) is None
    assert collapse_point([0, 1, 2], [2.0, 0.1, 0.1]) is None  # too short to judge
    assert collapse_point(list(range(40)), [2.0 - 0.02 * s for s in range(40)]) is None  # -39%


def test_a_sudden_drop_is_flagged_once_the_window_mean_halves() -> None:
    # window means at steps 5, 6, 7: 1.62, 1.24, 0.86: the third is below half of 2.0
    assert collapse_point(list(range(12)), [2.0] * 5 + [0.1] * 7) == 7


def test_nan_points_are_skipped() -> None:
    steps = list(range(12))
    values: list[float | None] = [
        2.0,
        None,
        2.0,
        float("nan"),
        2.0,
        2.0,
        2.0,
        1.0,
        0.5,
        0.1,
        0.1,
        0.1,
    ]
    assert collapse_point(steps, values) is not None


def test_budget_reached_or_extrapolated() -> None:
    steps = list(range(10))
    rising = [0.01 * s for s in steps]  # slope 0.01 per step, 0.09 at step 9
    assert budget_exhaustion(steps, rising, 0.2) == (20, False)
    assert budget_exhaustion(steps, rising, 0.05) == (5, True)
    assert budget_exhaustion(steps, [0.05] * 10, 0.2) == (None, False)  # flat: never
    assert budget_exhaustion(steps, rising, None) == (None, False)
    # a run that ended short of its budget projects nothing; one that reached it says where
    assert budget_exhaustion(steps, rising, 0.2, running=False) == (None, False)
    assert budget_exhaustion(steps, rising, 0.05, running=False) == (5, True)


def test_pareto_front_keeps_the_undominated_runs_by_increasing_kl() -> None:
    points = [(0.5, 0.7), (0.1, 0.6), (0.2, 0.5), (0.05, 0.4), (0.6, 0.7)]
    assert pareto_front(points) == [3, 1, 0]  # (0.2, .5) loses to (0.1, .6); (0.6, .7) to (0.5, .7)


def test_last_healthy_checkpoint_is_the_latest_before_the_collapse() -> None:
    ckpts = [{"step": 10}, {"step": 40}, {"step": 25}]
    assert last_healthy_checkpoint(ckpts, 30) == {"step": 25}
    assert last_healthy_checkpoint(ckpts, 5) is None
    assert last_healthy_checkpoint(ckpts, None) == {"step": 40}


def test_eta_from_progress() -> None:
    now = datetime(2026, 1, 1, tzinfo=UTC)
    started = (now - timedelta(seconds=100)).isoformat()
    assert eta_seconds(started, 25, 100, now) == 300.0
    assert eta_seconds(started, 0, 100, now) is None
    assert eta_seconds(None, 5, 100, now) is None


def test_merging_polls_replaces_resent_steps_and_appends_new_ones() -> None:
    held = RunSeries()
    held.merge(
        {
            "series": [{"name": "loss", "steps": [0, 1, 2], "values": [3.0, 2.0, 1.0]}],
            "last_step": 2,
        }
    )
    assert held.since() == 1  # the last step is asked for again
    added = held.merge(
        {
            "series": [
                {"name": "loss", "steps": [2, 3], "values": [1.0, 0.5]},
                {"name": "acc/eval", "steps": [2], "values": [0.4]},  # eval landed after
            ],
            "last_step": 3,
        }
    )
    assert held.series["loss"] == ([0, 1, 2, 3], [3.0, 2.0, 1.0, 0.5])
    assert held.series["acc/eval"] == ([2], [0.4])
    assert added == 2 and held.last_step == 3


def test_the_interval_table_shows_last_values_with_95_percent_half_widths() -> None:
    import math

    from dashboard import analysis
    from erpd import metrics as M

    series = {
        M.ACC_EVAL: ([9, 19], [0.4, 0.5]),
        M.ACC_EVAL_SE: ([9, 19], [0.02, 0.01]),
        M.ACC_EVAL_SAMPLED: ([9, 19], [0.3, float("nan")]),  # the last finite one counts
    }
    last = analysis.last_values(series, [M.ACC_EVAL, M.ACC_EVAL_SE, M.ACC_EVAL_SAMPLED, "x"])
    assert last == {M.ACC_EVAL: 0.5, M.ACC_EVAL_SE: 0.01, M.ACC_EVAL_SAMPLED: 0.3, "x": None}
    table = analysis.interval_table({"run": {**last, "KL spent": 0.02}})
    row = table.loc["run"]
    assert row["greedy"] == 0.5 and row["greedy ±"] == 1.96 * 0.01 and row["avg@k"] == 0.3
    assert math.isnan(row["avg@k ±"]) and row["KL spent"] == 0.02  # unknown SE: empty


def test_the_kl_chart_never_stretches_its_axis_to_a_projection() -> None:
    series = {M.KL_EXACT: (list(range(10)), [0.01 * s for s in range(10)])}
    beyond = charts.kl_budget(series, [M.KL_EXACT], {}, budget=0.5, exhaustion=(50, False))
    reached = charts.kl_budget(series, [M.KL_EXACT], {}, budget=0.05, exhaustion=(5, True))
    assert [s.x0 for s in beyond.layout.shapes if s.x0 == s.x1] == []  # no vertical line
    assert [s.x0 for s in reached.layout.shapes if s.x0 == s.x1] == [5]


def test_a_cancel_of_a_running_run_says_it_was_requested_not_that_it_runs() -> None:
    running = {"status": "running", "cancel_requested": True}
    assert "now running" not in action_outcome("cancel", "t", running)
    assert action_outcome("cancel", "t", running).startswith("Cancel requested")
    assert action_outcome("cancel", "t", {"status": "cancelled"}) == "Run t is now cancelled."
    assert action_outcome("retry", "t", {"status": "queued"}) == "Run t is now queued."
