"""A student against its matched controls in one pipeline round, on one seed: the control runs'
configs, which eval point stands for each arm, and the student-minus-control differences with
95% intervals and a verdict that claims no more than the intervals show.

`erpd pipeline` (summary.json) and the server's `GET /pipelines/{id}` both build their tables
here, so the two read the same numbers the same way. The module imports no torch: the API loads
it.

The interval. One seed gives one run per arm, so the only sampling error left to quantify is
the evaluation's: each accuracy comes with its standard error over the n held-out problems
(acc/eval_se, acc/eval_sampled_se). The difference's interval is

    diff +- 1.96 * sqrt(se_student^2 + se_control^2)

Both arms are scored on the same problems (and, for sampled accuracy, with the same sampling
seed), so their errors are positively correlated and the paired standard error is smaller than
this: the interval is conservative. It says nothing about seed-to-seed variation (another batch,
another minibatch order); `erpd reproduce` measures that over seeds.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any, Literal

from erpd import metrics as M
from erpd.config import ControlName, Stage1Config, Stage2Config
from erpd.controls import early_stop_control, stage2_control

Z95 = 1.959963984540054
"""Two-sided 95% quantile of the standard normal."""
DEFAULT_KL_BUDGET = 0.1
"""The student's budget for early_stop when it has none (stage2.kl_budget = None)."""
OVERSHOOT = 2.0
"""early_stop stops at this multiple of the student's budget: both stop on the first step past
a budget, so with the same budget the one that overshot less could never be read at the other's
KL (a student at lr 1e-4 overshot 0.05 to 0.084 in one step)."""
KL_RUNGS = 7
"""early_stop evaluates where its KL first crosses budget * 2^j, j = -5 .. 1: a student that
stops by epochs below its budget is still matched within a factor of 2 down to budget / 32."""
POINT_METRICS = (
    M.ACC_EVAL,
    M.ACC_EVAL_SE,
    M.ACC_EVAL_SAMPLED,
    M.ACC_EVAL_SAMPLED_SE,
    M.KL_EXACT_BATCH,
)
"""What the table reads at an arm's eval point."""

Verdict = Literal["student better", "control better", "no difference shown"]


# --- the control runs ---------------------------------------------------------------------------
def early_stop_budget(student: Stage2Config) -> float:
    return student.kl_budget if student.kl_budget is not None else DEFAULT_KL_BUDGET


def kl_marks(budget: float) -> list[float]:
    """The geometric ladder early_stop is evaluated on: factors of 2 up to OVERSHOOT * `budget`
    (the student's), where it stops."""
    top = OVERSHOOT * budget
    return [top / 2**j for j in range(KL_RUNGS - 1, -1, -1)]


def control_config(
    name: ControlName, teachers: Sequence[Stage1Config], student: Stage2Config
) -> Stage1Config | Stage2Config:
    """The stage config of control `name` in a round whose student is `student`: a stage-2
    control at the student's own config (same epochs, budget, optimiser, seed), or early_stop:
    the first teacher's objective at the student's learning rate and minibatch for at most that
    teacher's epochs, stopped at OVERSHOOT times the student's KL budget and evaluated at each
    rung of `kl_marks`, so its accuracy can be read at the KL the student actually spent (known
    only once the student ends)."""
    if name != "early_stop":
        return stage2_control(student, name)
    marks = kl_marks(early_stop_budget(student))
    first = teachers[0]
    stage1 = early_stop_control(first, student, marks[-1], max_epochs=first.epochs)
    return stage1.model_copy(update={"eval_at_kl": marks})


# --- eval points --------------------------------------------------------------------------------
@dataclass(frozen=True)
class EvalPoint:
    """One eval point of a run: its step and what POINT_METRICS it logged (None: not logged)."""

    step: int
    values: dict[str, float | None]

    def get(self, name: str) -> float | None:
        value = self.values.get(name)
        return value if value is not None and math.isfinite(value) else None


def eval_points(points: Iterable[tuple[int, str, float | None]]) -> list[EvalPoint]:
    """(step, metric, value) triples -> the run's eval points (steps with acc/eval), in order."""
    by_step: dict[int, dict[str, float | None]] = {}
    for step, name, value in points:
        if name in POINT_METRICS:
            by_step.setdefault(step, {})[name] = value
    return [EvalPoint(s, v) for s, v in sorted(by_step.items()) if M.ACC_EVAL in v]


@dataclass
class Arm:
    """One row of a round's table: the student or a control, read at one eval point."""

    role: Literal["student", "control"]
    name: str  # "student" or the control's name
    run: str  # a run id (server) or a run directory (erpd pipeline)
    status: str
    steps: int | None
    eval_step: int | None = None
    acc_eval: float | None = None
    acc_eval_se: float | None = None
    acc_eval_sampled: float | None = None
    acc_eval_sampled_se: float | None = None
    kl_exact_batch: float | None = None
    point: str = "not finished"  # which eval point stands for the arm, in words

    def read(self, point: EvalPoint, how: str) -> Arm:
        self.eval_step = point.step
        self.acc_eval = point.get(M.ACC_EVAL)
        self.acc_eval_se = point.get(M.ACC_EVAL_SE)
        self.acc_eval_sampled = point.get(M.ACC_EVAL_SAMPLED)
        self.acc_eval_sampled_se = point.get(M.ACC_EVAL_SAMPLED_SE)
        self.kl_exact_batch = point.get(M.KL_EXACT_BATCH)
        self.point = how
        return self


def read_arm(arm: Arm, points: Sequence[EvalPoint], *, at_kl: float | None = None) -> Arm:
    """Fill `arm` from its finished run's eval points: the final one, or (`at_kl`, early_stop)
    the first whose kl/exact_batch reached the student's final KL. A run that has not finished
    (or whose student has no KL yet) keeps null values and says why in `point`."""
    if not points:
        unfinished = ("queued", "running", "failed", "cancelled", "stopped")
        arm.point = arm.status if arm.status in unfinished else "no eval point"
        return arm
    if at_kl is None:
        return arm.read(points[-1], f"final eval point (step {points[-1].step})")
    for p in points:
        kl = p.get(M.KL_EXACT_BATCH)
        if kl is not None and kl >= at_kl:
            how = f"first eval point at or past the student's KL {at_kl:.4g}: step {p.step}"
            return arm.read(p, f"{how}, KL {kl:.4g}")
    arm.point = f"did not reach the student's KL {at_kl:.4g}"
    return arm


# --- differences --------------------------------------------------------------------------------
@dataclass
class Difference:
    """Student minus control on one accuracy, with its 95% evaluation-sampling interval."""

    student: float | None
    control: float | None
    diff: float | None = None
    ci95: tuple[float, float] | None = None
    verdict: Verdict | None = None


def difference(
    student: float | None,
    student_se: float | None,
    control: float | None,
    control_se: float | None,
) -> Difference:
    """The difference, and its interval and verdict when both standard errors are known."""
    out = Difference(student, control)
    if student is None or control is None:
        return out
    out.diff = student - control
    if student_se is None or control_se is None:
        return out
    half = Z95 * math.hypot(student_se, control_se)
    out.ci95 = (out.diff - half, out.diff + half)
    out.verdict = verdict_of(*out.ci95)
    return out


def verdict_of(low: float, high: float) -> Verdict:
    """A difference is claimed only when the interval excludes 0."""
    if low > 0:
        return "student better"
    if high < 0:
        return "control better"
    return "no difference shown"


def overall(verdicts: Sequence[Verdict | None]) -> Verdict | None:
    """The control's verdict over greedy and sampled accuracy: a direction only when every
    accuracy with an interval shows it (an intersection-union test, so two looks at 95% never
    claim more than one would); otherwise 'no difference shown'. None with no interval at all."""
    known = [v for v in verdicts if v is not None]
    if not known:
        return None
    return known[0] if all(v == known[0] for v in known) else "no difference shown"


@dataclass
class Comparison:
    """The student against one control."""

    control: str
    greedy: Difference
    sampled: Difference
    verdict: Verdict | None
    note: str


def compare(student: Arm, control: Arm) -> Comparison:
    greedy = difference(
        student.acc_eval, student.acc_eval_se, control.acc_eval, control.acc_eval_se
    )
    sampled = difference(
        student.acc_eval_sampled,
        student.acc_eval_sampled_se,
        control.acc_eval_sampled,
        control.acc_eval_sampled_se,
    )
    if student.acc_eval is None or control.acc_eval is None:
        note = f"student: {student.point}; control: {control.point}"
    else:
        note = f"control read at its {control.point}"
    return Comparison(
        control.name, greedy, sampled, overall([greedy.verdict, sampled.verdict]), note
    )


@dataclass
class RoundTable:
    """A round's student and controls (`arms`, the student first) and the comparisons."""

    round: int
    arms: list[Arm]
    comparisons: list[Comparison] = field(default_factory=list)

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


def round_table(
    k: int,
    student: Arm,
    student_points: Sequence[EvalPoint],
    controls: Sequence[tuple[Arm, Sequence[EvalPoint]]],
) -> RoundTable:
    """Read every arm at its eval point (early_stop at the student's final KL) and compare."""
    read_arm(student, student_points)
    arms = [student]
    for arm, points in controls:
        matched = arm.name == "early_stop"
        if matched and points and student.kl_exact_batch is None:
            arm.point = f"waits for the student's KL (student: {student.point})"
        else:
            read_arm(arm, points, at_kl=student.kl_exact_batch if matched else None)
        arms.append(arm)
    return RoundTable(k, arms, [compare(student, arm) for arm in arms[1:]])


def format_table(table: Mapping[str, Any]) -> list[str]:
    """A round's table as text lines, from its JSON form (`RoundTable.as_dict()`, or a round of
    GET /pipelines/{id}): erpd pipeline and erpd-hub pipeline print the same thing."""

    def num(value: float | None, digits: int = 3) -> str:
        return "-" if value is None else f"{value:.{digits}f}"

    def pm(value: float | None, se: float | None) -> str:
        return num(value) if se is None else f"{num(value)}±{se:.3f}"

    head = f"round {table['round']}"
    lines = [f"{head:<26} {'greedy':>12}  {'sampled':>12}  {'KL':>8}  {'steps':>6}  status"]
    for a in table["arms"]:
        steps = "-" if a["steps"] is None else a["steps"]
        lines.append(
            f"  {a['name']:<24} {pm(a['acc_eval'], a['acc_eval_se']):>12}  "
            f"{pm(a['acc_eval_sampled'], a['acc_eval_sampled_se']):>12}  "
            f"{num(a['kl_exact_batch'], 4):>8}  {steps:>6}  {a['status']}"
        )
    for c in table["comparisons"]:
        lines.append(f"  student - {c['control']}: {c['verdict'] or 'not available'}")
        for label in ("greedy", "sampled"):
            d = c[label]
            ci = "-" if d["ci95"] is None else f"[{d['ci95'][0]:+.3f}, {d['ci95'][1]:+.3f}]"
            diff = "-" if d["diff"] is None else f"{d['diff']:+.3f}"
            lines.append(f"    {label:<8} {diff:>7}  95% {ci}  {d['verdict'] or ''}".rstrip())
        lines.append(f"    ({c['note']})")
    return lines
