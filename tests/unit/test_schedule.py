"""When a stage evaluates and how long it runs (erpd/schedule.py), and the KL marks of
`eval_at_kl` (erpd/budget.py), without training anything."""

from __future__ import annotations

import json

import pytest

from erpd.budget import KlMarks
from erpd.config import Stage1Config, Stage2Config
from erpd.schedule import EvalSchedule, planned_steps


def test_planned_steps_is_every_epoch_or_max_steps_if_fewer() -> None:
    # 10 rows in minibatches of 4: 3 steps per epoch
    assert planned_steps(Stage2Config(epochs=2, minibatch_size=4), 10) == 6
    assert planned_steps(Stage2Config(epochs=2, minibatch_size=4, max_steps=4), 10) == 4
    assert planned_steps(Stage2Config(epochs=2, minibatch_size=4, max_steps=99), 10) == 6


def test_max_steps_cuts_the_epochs_and_is_evaluated() -> None:
    cfg = Stage1Config(epochs=5, minibatch_size=4, eval_every_epochs=1, max_steps=7)
    schedule = EvalSchedule.of(cfg, 10)  # 3 steps per epoch
    assert schedule.last == 7 and schedule.last_epoch == 3
    assert [schedule.steps_in_epoch(e) for e in range(4)] == [3, 3, 1, 0]
    assert [s for s in range(12) if schedule.due(s)] == [3, 6, 7]


def test_without_max_steps_the_schedule_is_by_epoch() -> None:
    cfg = Stage1Config(epochs=4, minibatch_size=4, eval_every_epochs=3)
    schedule = EvalSchedule.of(cfg, 10)
    assert schedule.last == 12 and schedule.last_epoch == 4
    assert [s for s in range(13) if schedule.due(s)] == [9, 12]


def test_max_steps_on_an_epoch_boundary_is_evaluated_once() -> None:
    cfg = Stage2Config(epochs=3, minibatch_size=5, max_steps=4, eval_every_epochs=1)
    schedule = EvalSchedule.of(cfg, 10)  # 2 steps per epoch
    assert schedule.last_epoch == 2
    assert [s for s in range(7) if schedule.due(s)] == [2, 4]


def test_kl_marks_record_the_first_crossing_of_each() -> None:
    marks = KlMarks.of([0.1, 0.02, 0.05, 0.05])
    assert marks.marks == (0.02, 0.05, 0.1)  # sorted, duplicates merged
    assert marks.cross(0, 0.0) == []
    assert marks.cross(1, 0.02) == []  # exceeds, not reaches (as the budget)
    assert marks.cross(2, 0.06) == [0.02, 0.05]  # one step may cross several
    assert marks.cross(3, 0.03) == []  # a dip and a rise again count once
    assert marks.cross(4, 0.07) == []
    assert marks.cross(5, 0.2) == [0.1]
    assert marks.crossed == {0.02: 2, 0.05: 2, 0.1: 5}


def test_kl_marks_survive_a_resume_point_as_json() -> None:
    marks = KlMarks.of([0.01, 0.1])
    marks.cross(3, 0.05)
    saved = json.loads(json.dumps(marks.state()))
    again = KlMarks.of([0.01, 0.1], saved)
    assert again.crossed == {0.01: 3}
    assert again.cross(4, 0.05) == []  # not crossed a second time
    assert again.cross(5, 0.5) == [0.1]


@pytest.mark.parametrize("values", [None, []])
def test_no_marks(values: list[float] | None) -> None:
    marks = KlMarks.of(values)
    assert marks.marks == () and marks.cross(1, 100.0) == [] and marks.state() == []
