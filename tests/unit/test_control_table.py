"""The student-vs-control table (erpd/control_table.py) on hand-built eval points: the interval,
the verdicts (never more than the interval shows) and early_stop read at the student's KL."""

from __future__ import annotations

import itertools
import math

import pytest

from erpd import metrics as M
from erpd.config import Stage1Config, Stage2Config
from erpd.control_table import (
    Z95,
    Arm,
    EvalPoint,
    control_config,
    difference,
    eval_points,
    format_table,
    kl_marks,
    overall,
    round_table,
)


def point(step: int, acc: float, se: float, kl: float, sampled: float | None = None) -> EvalPoint:
    values = {M.ACC_EVAL: acc, M.ACC_EVAL_SE: se, M.KL_EXACT_BATCH: kl}
    if sampled is not None:
        values |= {M.ACC_EVAL_SAMPLED: sampled, M.ACC_EVAL_SAMPLED_SE: se}
    return EvalPoint(step, values)


def arm(name: str) -> Arm:
    role = "student" if name == "student" else "control"
    return Arm(role=role, name=name, run=name, status="succeeded", steps=10)


def test_the_interval_is_the_two_standard_errors_combined() -> None:
    d = difference(0.50, 0.03, 0.40, 0.04)
    assert d.diff == pytest.approx(0.10)
    assert d.ci95 is not None
    assert d.ci95[1] - d.diff == pytest.approx(Z95 * 0.05)  # sqrt(0.03^2 + 0.04^2) = 0.05
    assert d.verdict == "student better"  # 0.10 - 0.098 > 0


@pytest.mark.parametrize(
    ("student", "control", "verdict"),
    [
        (0.50, 0.40, "student better"),
        (0.40, 0.50, "control better"),
        (0.50, 0.45, "no difference shown"),  # a real gap, inside the noise
        (0.45, 0.45, "no difference shown"),  # a null effect
    ],
)
def test_a_verdict_claims_a_direction_only_when_the_interval_excludes_zero(
    student: float, control: float, verdict: str
) -> None:
    assert difference(student, 0.03, control, 0.04).verdict == verdict


def test_large_noise_hides_a_large_gap() -> None:
    d = difference(0.60, 0.10, 0.40, 0.10)
    assert d.diff == pytest.approx(0.20) and d.verdict == "no difference shown"


def test_without_a_standard_error_there_is_a_difference_but_no_interval() -> None:
    d = difference(0.5, None, 0.4, 0.01)
    assert d.diff == pytest.approx(0.1) and d.ci95 is None and d.verdict is None
    assert difference(None, 0.1, 0.4, 0.1).diff is None


def test_greedy_and_sampled_must_agree_for_a_direction() -> None:
    assert overall(["student better", "student better"]) == "student better"
    assert overall(["student better", "no difference shown"]) == "no difference shown"
    assert overall(["student better", "control better"]) == "no difference shown"
    assert overall([None, "control better"]) == "control better"
    assert overall([None, None]) is None


def test_early_stop_is_read_at_the_student_s_kl() -> None:
    student = [point(0, 0.30, 0.02, 0.0, 0.3), point(8, 0.50, 0.02, 0.030, 0.5)]
    early = [
        point(0, 0.30, 0.02, 0.0, 0.3),
        point(3, 0.35, 0.02, 0.012, 0.35),
        point(5, 0.40, 0.02, 0.041, 0.4),
        point(9, 0.60, 0.02, 0.100, 0.6),  # its final point, at a larger KL: not the one read
    ]
    region = [point(0, 0.30, 0.02, 0.0, 0.3), point(8, 0.48, 0.02, 0.02, 0.48)]
    table = round_table(
        0, arm("student"), student, [(arm("early_stop"), early), (arm("x"), region)]
    )
    s, e, r = table.arms
    assert (s.eval_step, e.eval_step, r.eval_step) == (8, 5, 8)
    assert e.kl_exact_batch is not None and e.kl_exact_batch >= 0.030
    assert "step 5" in e.point and "0.03" in e.point
    early_cmp, region_cmp = table.comparisons
    assert early_cmp.greedy.diff == pytest.approx(0.10) and early_cmp.verdict == "student better"
    assert region_cmp.verdict == "no difference shown"
    text = "\n".join(format_table(table.as_dict()))
    assert "student - early_stop: student better" in text and "[+" in text


def test_a_control_below_the_student_s_kl_or_unfinished_has_no_numbers() -> None:
    student = [point(8, 0.50, 0.02, 0.05)]
    low = [point(0, 0.3, 0.02, 0.0), point(4, 0.35, 0.02, 0.01)]
    running = arm("placebo")
    running.status = "running"
    table = round_table(0, arm("student"), student, [(arm("early_stop"), low), (running, [])])
    _, early, placebo = table.arms
    assert early.acc_eval is None and early.point.startswith("did not reach the student's KL")
    assert placebo.acc_eval is None and placebo.point == "running"
    assert all(c.verdict is None and c.greedy.diff is None for c in table.comparisons)


def test_eval_points_keep_only_steps_with_an_accuracy_in_order() -> None:
    triples = [
        (4, M.ACC_EVAL, 0.5),
        (4, M.KL_EXACT_BATCH, 0.02),
        (2, M.KL_EXACT_BATCH, 0.01),  # no accuracy at step 2
        (0, M.ACC_EVAL, 0.3),
        (4, M.LOSS, 1.0),
    ]
    points = eval_points(triples)
    assert [p.step for p in points] == [0, 4]
    assert points[1].values == {M.ACC_EVAL: 0.5, M.KL_EXACT_BATCH: 0.02}
    assert EvalPoint(1, {M.ACC_EVAL: math.nan}).get(M.ACC_EVAL) is None


def test_control_configs_keep_the_student_s_budget_and_steps() -> None:
    teacher = Stage1Config(objective="ce", epochs=7, lr=1e-4)
    student = Stage2Config(kl_budget=0.08, epochs=3, lr=2e-5)
    early = control_config("early_stop", [teacher], student)
    assert isinstance(early, Stage1Config)
    # it stops past twice the student's budget, so a student that overshot its own is matched
    assert (early.objective, early.epochs, early.lr, early.kl_budget) == ("ce", 7, 2e-5, 0.16)
    assert early.minibatch_size == student.minibatch_size
    assert early.eval_at_kl == kl_marks(0.08) and early.eval_at_kl[-1] == 0.16
    assert early.eval_at_kl[0] == pytest.approx(0.08 / 32)
    marks = early.eval_at_kl
    assert all(b == pytest.approx(2 * a) for a, b in itertools.pairwise(marks))
    unbudgeted = control_config("early_stop", [teacher], Stage2Config(kl_budget=None))
    assert unbudgeted.kl_budget == 0.2
    rand = control_config("advantage_random", [teacher], student)
    assert isinstance(rand, Stage2Config)
    assert (rand.signal, rand.region, rand.epochs, rand.kl_budget) == (
        "advantage",
        "random",
        3,
        0.08,
    )
