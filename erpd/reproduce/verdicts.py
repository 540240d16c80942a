"""The claims of docs/method.md ("What a correct implementation shows") as rules fixed in code.

The rules are written down before the numbers they judge and must not be tuned after seeing one.
Each claim is decided on greedy held-out accuracy (docs/method.md's headline metric) and,
separately, on sampled accuracy, because the two disagree whenever entropy moves.

Four outcomes:

    holds           the evidence shows the claim at the stated level
    does not hold   the evidence shows the claim is false (or that no meaningful gain exists)
    inconclusive    the interval is too wide to tell either way (always so with one seed)
    not applicable  the premise that makes the comparison meaningful is false; never "holds"

Statistics (erpd/reproduce/stats.py): a comparison of arm A with arm B is the paired difference
A_s - B_s over seeds s (one fixed batch per seed, shared by every arm of that seed), with its
two-sided 95% t interval [lo, hi] on n - 1 degrees of freedom. Three tests read that interval:

    superiority      (A "beats", "is better than", "helps")
                     holds iff lo > 0; does not hold iff hi < δ (whatever the true gain, it is
                     smaller than the smallest one worth claiming); otherwise inconclusive.
    non-inferiority  (A "is at least as good as", "matches" B), only with a premise
                     holds iff lo > -δ; does not hold iff hi < -δ (A shown worse by more than
                     δ); otherwise inconclusive.
    no better        (premise of claim 3: A "is no better than" B)
                     holds iff hi < δ (any advantage of A is smaller than δ); does not hold iff
                     lo > 0 (A shown better); otherwise inconclusive. This is the mirror of
                     superiority: a point estimate <= 0 would let a teacher that is truly a few
                     points better pass about half the time, so the premise needs the interval.

δ = TOL = 0.03 (3 points of accuracy): the low end of docs/method.md's "tolerances of 3-5 points
for any comparison", the batch-to-batch spread the calibration measured. Taking the low end makes
non-inferiority as strict as the project's own noise analysis allows (a margin of 5 points would
let a student 4 points below its teacher "match" it); a smaller margin would ask more than one
greedy accuracy on the default 500 held-out problems can resolve (its standard error is about 2
points at 40-60% accuracy).

A premise is decided like a claim. The outcome of a claim with a premise: "not applicable" when
the premise does not hold; otherwise "does not hold" when the claim's own comparison does not
hold; otherwise "inconclusive" when the premise or the comparison is; otherwise "holds". So a
claim never holds on a premise that was not shown. Several conditions of one claim combine the
same way: any "does not hold" makes the claim fail, any "inconclusive" leaves it undecided.

Some conditions are point rules on means over seeds: the KL ratio of claim 2a ("several times
lower KL" is read as a ratio of mean kl/exact_batch >= 3), entropy comparisons, and the shape of
the KL curve in claims 1a/1b. These are exact computations on the fixed batch (no sampling), and
their seed-to-seed spread is small next to the effects they test; each is stated in its rule.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any, Final, Literal

from erpd import metrics as M
from erpd.reproduce.stats import LEVEL, Interval, paired, unpaired

TOL = 0.03  # δ, the smallest accuracy difference worth claiming (see the module docstring)
SEVERAL_TIMES = 3.0  # "several times lower KL": at least 3x
ACCURACY = {"greedy": M.ACC_EVAL, "sampled": M.ACC_EVAL_SAMPLED}

HOLDS: Final = "holds"
FAILS: Final = "does not hold"
INCONCLUSIVE: Final = "inconclusive"
NOT_APPLICABLE: Final = "not applicable"
Outcome = Literal["holds", "does not hold", "inconclusive", "not applicable"]
OUTCOMES: tuple[Outcome, ...] = (HOLDS, FAILS, INCONCLUSIVE, NOT_APPLICABLE)

# the matched controls of claim 2b, in the order the report lists them ("control-advantage" is
# the name of the no-teacher control in results written before the controls were restructured)
CONTROLS = (
    "control-advantage-region",
    "control-advantage-random",
    "control-placebo",
    "control-early-stop",
    "control-advantage",
)
KL_CURVES = "kl_curves"  # a key of strong_teacher.tasks[task] beside the arms

GENERAL_RULES = (
    f"Every comparison is paired over seeds (the arms of one seed share its fixed batch): the "
    f"mean of the per-seed differences with its two-sided {LEVEL:.0%} t interval on n - 1 "
    f"degrees of freedom. One seed gives no interval: inconclusive.",
    f'Superiority ("beats", "better", "helps"): holds iff the interval\'s lower bound > 0; '
    f"does not hold iff its upper bound < δ = {TOL:g} (no gain worth claiming); otherwise "
    f"inconclusive.",
    f'Non-inferiority ("at least as good", "matches"): only with a premise; holds iff the '
    f"lower bound > -δ = -{TOL:g}; does not hold iff the upper bound < -δ; otherwise "
    f"inconclusive.",
    f"No better (claim 3's premise): holds iff the upper bound < δ = {TOL:g}; does not hold iff "
    f"the lower bound > 0; otherwise inconclusive.",
    "A claim whose premise does not hold is not applicable; with its premise inconclusive it is "
    "at best inconclusive. Conditions of one claim combine as a conjunction: any 'does not hold' "
    "fails the claim, any 'inconclusive' leaves it undecided.",
    f"δ = {TOL:g} is the low end of docs/method.md's 3-5 point tolerance, fixed before any result.",
)


@dataclass
class Check:
    """One condition behind a verdict: a comparison with its interval, or a point rule."""

    name: str  # e.g. "student - teacher"
    test: str  # superiority | non-inferiority | no better | point | report only
    outcome: Outcome
    text: str  # the numbers, short
    ci: dict[str, Any] | None = None  # stats.Interval.as_dict()
    role: str = "claim"  # claim | premise | context (context never decides)


@dataclass
class Verdict:
    claim: str  # docs/method.md claim number and variant, e.g. "2a final/sapo"
    statement: str
    rule: str  # the rule in prose, printed before any number
    outcome: Outcome  # on greedy accuracy
    outcome_sampled: Outcome  # the same rule on sampled accuracy
    evidence: str  # the numbers that decide it (greedy; sampled in brackets)
    checks: dict[str, list[Check]] = field(default_factory=dict)  # "greedy"/"sampled" -> checks
    holds: bool = field(init=False)  # outcome == "holds" (older readers of results.json)
    holds_sampled: bool = field(init=False)

    def __post_init__(self) -> None:
        self.holds = self.outcome == HOLDS
        self.holds_sampled = self.outcome_sampled == HOLDS


# --- the tests ---------------------------------------------------------------------------------
def superiority(ci: Interval, delta: float = TOL) -> Outcome:
    if not ci.known:
        return INCONCLUSIVE
    if ci.lo > 0:
        return HOLDS
    if ci.hi < delta:
        return FAILS
    return INCONCLUSIVE


def non_inferiority(ci: Interval, delta: float = TOL) -> Outcome:
    if not ci.known:
        return INCONCLUSIVE
    if ci.lo > -delta:
        return HOLDS
    if ci.hi < -delta:
        return FAILS
    return INCONCLUSIVE


def no_better(ci: Interval, delta: float = TOL) -> Outcome:
    if not ci.known:
        return INCONCLUSIVE
    if ci.hi < delta:
        return HOLDS
    if ci.lo > 0:
        return FAILS
    return INCONCLUSIVE


def point(ok: bool) -> Outcome:
    return HOLDS if ok else FAILS


def all_of(outcomes: Sequence[Outcome]) -> Outcome:
    """A conjunction: any failure fails it, else any doubt leaves it inconclusive."""
    if FAILS in outcomes or NOT_APPLICABLE in outcomes:
        return FAILS
    if INCONCLUSIVE in outcomes:
        return INCONCLUSIVE
    return HOLDS


def with_premise(premise: Outcome, claim: Outcome) -> Outcome:
    """A claim that is only meaningful when its premise holds."""
    if premise in (FAILS, NOT_APPLICABLE):
        return NOT_APPLICABLE
    if claim == FAILS:
        return FAILS
    if INCONCLUSIVE in (premise, claim):
        return INCONCLUSIVE
    return HOLDS


TESTS: dict[str, Callable[[Interval], Outcome]] = {
    "superiority": superiority,
    "non-inferiority": non_inferiority,
    "no better": no_better,
}


# --- reading results ---------------------------------------------------------------------------
def _num(value: Any) -> float:
    return math.nan if value is None else float(value)


def _mean(arm: dict[str, Any], metric: str) -> float:
    stat = arm.get(metric)
    return math.nan if not stat else _num(stat.get("mean"))


def _values(arm: dict[str, Any], metric: str) -> list[float]:
    return [_num(s.get(metric)) for s in arm["per_seed"]]


def compare(
    name: str,
    a: dict[str, Any],
    b: dict[str, Any],
    metric: str,
    test: str,
    *,
    role: str = "claim",
) -> Check:
    """Paired test of arm a against arm b on one metric."""
    ci = paired(_values(a, metric), _values(b, metric))
    text = f"{_mean(a, metric):.3f} vs {_mean(b, metric):.3f}: {ci.text()}"
    return Check(name, test, TESTS[test](ci), text, ci.as_dict(), role)


def _unpaired_check(name: str, a: dict[str, Any], b: dict[str, Any], test: str) -> Check:
    ci = unpaired(a, b)
    text = f"{_num(a['mean']):.3f} vs {_num(b['mean']):.3f}: {ci.text()} (unpaired)"
    return Check(name, test, TESTS[test](ci), text, ci.as_dict())


def _point_check(name: str, ok: bool, text: str, role: str = "claim") -> Check:
    return Check(name, "point", point(ok), text, None, role)


def describe(check: Check) -> str:
    """'premise: teacher - base (no better): 0.545 vs 0.472: +0.074 [...] n=4 -> does not hold'"""
    role = {"premise": "premise: ", "context": "reported: "}.get(check.role, "")
    return f"{role}{check.name} ({check.test}): {check.text} -> {check.outcome}"


def _outcome(checks: Sequence[Check]) -> Outcome:
    premise = [c.outcome for c in checks if c.role == "premise"]
    claim = all_of([c.outcome for c in checks if c.role == "claim"])
    return with_premise(all_of(premise), claim) if premise else claim


def _verdict(
    claim: str, statement: str, rule: str, decide: Callable[[str], list[Check]]
) -> Verdict:
    checks = {kind: decide(metric) for kind, metric in ACCURACY.items()}

    def say(cs: list[Check]) -> str:
        return "; ".join(describe(c) for c in cs)

    evidence = f"{say(checks['greedy'])} [sampled: {say(checks['sampled'])}]"
    return Verdict(
        claim,
        statement,
        rule,
        _outcome(checks["greedy"]),
        _outcome(checks["sampled"]),
        evidence,
        checks,
    )


# --- claim 1: stage 1 rises, then plateaus or falls, while entropy falls and KL grows ----------
def claim_1a(objective: str, sweep: dict[str, Any]) -> Verdict:
    points = sweep["arms"][objective]["curve"]
    last_epoch = points[-1]["epoch"]
    start, last = points[0], points[-1]
    trained = [p for p in points if p["epoch"] > 0] or points[-1:]

    def decide(acc: str) -> list[Check]:
        peak = max(trained, key=lambda p: _num(p[acc]["mean"]))
        quarter = [p for p in trained if p["epoch"] <= last_epoch / 4] or trained[:1]
        early = max(quarter, key=lambda p: _num(p[acc]["mean"]))
        ent0, ent1 = _num(start[M.ENTROPY_BATCH]["mean"]), _num(last[M.ENTROPY_BATCH]["mean"])
        kl = [_num(p[M.KL_EXACT_BATCH]["mean"]) for p in points]
        return [
            _unpaired_check(
                f"rise: best epoch ({peak['epoch']:g}) - epoch 0", peak[acc], start[acc],
                "superiority",
            ),
            _unpaired_check(
                f"late gain: epoch {last_epoch:g} - best of the first quarter "
                f"(epoch {early['epoch']:g})",
                last[acc],
                early[acc],
                "no better",
            ),
            _point_check("entropy falls", ent1 < ent0, f"{ent0:.3f} -> {ent1:.3f}"),
            _point_check(
                "KL largest at the last epoch",
                kl[-1] == max(kl) and kl[-1] > kl[0],
                " -> ".join(f"{k:.3f}" for k in kl),
            ),
        ]  # fmt: skip

    return _verdict(
        f"1a {objective}",
        "Stage 1, more epochs: accuracy rises quickly, then plateaus or falls while entropy "
        "falls and KL keeps growing.",
        "Superiority of the best epoch's accuracy over epoch 0 (the rise); 'no better' of the "
        "last epoch over the best of the first quarter of epochs (no late gain of δ or more: the "
        "plateau); mean entropy on the fixed batch lower at the last epoch than at epoch 0, and "
        "mean kl/exact_batch largest at the last epoch (point rules). The curve keeps no per-seed "
        "values, so its intervals are unpaired (wider than paired ones), and the best epoch is "
        "chosen by its mean.",
        decide,
    )


def _ceiling_point(arm: dict[str, Any], acc: str) -> dict[str, Any]:
    trained = [p for p in arm["curve"] if p["epoch"] > 0] or arm["curve"][-1:]
    return max(trained, key=lambda p: _num(p[acc]["mean"]))


def claim_1b(sweep: dict[str, Any]) -> Verdict:
    coefs = sweep["coefs"]
    ref, top = sweep["arms"][f"kl_coef={coefs[0]:g}"], sweep["arms"][f"kl_coef={max(coefs):g}"]
    kl_ref, kl_top = _mean(ref["final"], M.KL_EXACT_BATCH), _mean(top["final"], M.KL_EXACT_BATCH)

    def decide(acc: str) -> list[Check]:
        c_ref, c_top = _ceiling_point(ref, acc), _ceiling_point(top, acc)
        return [
            _point_check(
                "final KL lower",
                kl_top < kl_ref,
                f"kl_coef {coefs[0]:g} -> {max(coefs):g}: {kl_ref:.3f} -> {kl_top:.3f}",
            ),
            _unpaired_check(
                f"ceiling at kl_coef {coefs[0]:g} (epoch {c_ref['epoch']:g}) - at "
                f"{max(coefs):g} (epoch {c_top['epoch']:g})",
                c_ref[acc],
                c_top[acc],
                "superiority",
            ),
        ]

    return _verdict(
        "1b",
        "Raising the stage-1 kl_coef lowers both KL and the accuracy ceiling.",
        "Mean final kl/exact_batch at the largest coefficient below that at the first (point "
        "rule), and superiority of the first coefficient's ceiling (its best eval point after "
        "training started) over the largest coefficient's, unpaired as the curves keep no "
        "per-seed values.",
        decide,
    )


# --- claim 2: the student matches the teacher at several times lower KL -----------------------
def claim_2a(task: str, objective: str, arms: dict[str, Any]) -> Verdict:
    teacher, student = arms[f"teacher-{objective}"], arms[f"student-{objective}"]
    base = arms.get("base")
    kl_t, kl_s = _mean(teacher, M.KL_EXACT_BATCH), _mean(student, M.KL_EXACT_BATCH)
    ratio = kl_t / kl_s if kl_s > 0 else math.inf
    ent_t, ent_s = _mean(teacher, M.ENTROPY_BATCH), _mean(student, M.ENTROPY_BATCH)

    def decide(acc: str) -> list[Check]:
        if base is None:
            premise = [
                Check("premise", "superiority", INCONCLUSIVE, "no base arm", None, "premise")
            ]
        else:
            premise = [
                compare("teacher - base", teacher, base, acc, "superiority", role="premise"),
                compare("student - base", student, base, acc, "superiority", role="premise"),
            ]
        return [
            *premise,
            compare("student - teacher", student, teacher, acc, "non-inferiority"),
            _point_check(
                f"KL >= {SEVERAL_TIMES:g}x lower",
                ratio >= SEVERAL_TIMES,
                f"teacher {kl_t:.3f} / student {kl_s:.3f} = {ratio:.1f}x",
            ),
            _point_check("entropy higher", ent_s > ent_t, f"student {ent_s:.3f} vs {ent_t:.3f}"),
        ]

    return _verdict(
        f"2a {task}/{objective}",
        "Stage 2 from a strong teacher: accuracy >= the teacher's (within noise) at several "
        "times lower KL, with higher entropy than the teacher.",
        f"Premise: the teacher beats the base and the student beats the base (superiority "
        f"each). Claim: non-inferiority of the student to the teacher at margin δ = {TOL:g}, "
        f"mean kl/exact_batch of the teacher / the student's >= {SEVERAL_TIMES:g}, and mean "
        "entropy on the fixed batch higher for the student (point rules).",
        decide,
    )


def _aligned(points: list[dict[str, Any]], metric: str) -> dict[int, float]:
    """seed -> value at one curve point (by the 'seed' key when present, else by position)."""
    out = {}
    for i, s in enumerate(points):
        value = _num(s.get(metric))
        if not math.isnan(value):
            out[int(s.get("seed", i))] = value
    return out


def curve_comparison(
    student: list[dict[str, Any]], control: list[dict[str, Any]], metric: str
) -> tuple[Interval | None, list[tuple[float, Interval]]]:
    """Accuracy at matched KL along two KL-accuracy curves, paired over seeds.

    Returns the interval of the difference in normalised area (the mean accuracy over the common
    log-KL range: trapezoids over ln(budget), divided by the range's width) over the budgets
    that every seed of both arms reached (None with fewer than two such budgets), and the
    interval at each budget that some seed reached in both arms (those seeds only).
    """
    s_by = {float(p["budget"]): p for p in student}
    c_by = {float(p["budget"]): p for p in control}
    per_budget: list[tuple[float, Interval]] = []
    full: list[float] = []  # budgets every seed of both arms reached
    seeds: set[int] = set()
    for b in sorted(set(s_by) & set(c_by)):
        if b <= 0:
            continue
        s_vals = _aligned(s_by[b]["per_seed"], metric)
        c_vals = _aligned(c_by[b]["per_seed"], metric)
        both = sorted(set(s_vals) & set(c_vals))
        if not both:
            continue
        per_budget.append((b, paired([s_vals[i] for i in both], [c_vals[i] for i in both])))
        everyone = _seeds(s_by[b]["per_seed"]) | _seeds(c_by[b]["per_seed"])
        if set(both) == everyone and (not seeds or everyone == seeds):
            full.append(b)
            seeds = everyone
    if len(full) < 2:
        return None, per_budget
    xs = [math.log(b) for b in full]
    width = xs[-1] - xs[0]

    def area(by: dict[float, dict[str, Any]], seed: int) -> float:
        ys = [_aligned(by[b]["per_seed"], metric)[seed] for b in full]
        steps = zip(xs, xs[1:], ys, ys[1:], strict=False)
        return sum((y0 + y1) / 2 * (x1 - x0) for x0, x1, y0, y1 in steps) / width

    order = sorted(seeds)
    return paired([area(s_by, i) for i in order], [area(c_by, i) for i in order]), per_budget


def _seeds(points: list[dict[str, Any]]) -> set[int]:
    return {int(s.get("seed", i)) for i, s in enumerate(points)}


def claim_2b(task: str, objective: str, arms: dict[str, Any]) -> Verdict:
    student = arms[f"student-{objective}"]
    controls = {name: arms[name] for name in CONTROLS if name in arms}
    curves = arms.get(KL_CURVES) or {}
    student_curve = curves.get("student") or curves.get(f"student-{objective}")

    def decide(acc: str) -> list[Check]:
        checks: list[Check] = []
        if not controls:
            return [Check("controls", "superiority", INCONCLUSIVE, "no control arm", None)]
        for name, control in controls.items():
            short = name.removeprefix("control-")
            endpoint = compare(f"student - {short}", student, control, acc, "superiority")
            kl_s, kl_c = _mean(student, M.KL_EXACT_BATCH), _mean(control, M.KL_EXACT_BATCH)
            endpoint.text += f"; KL {kl_s:.3f} vs {kl_c:.3f}"
            control_curve = curves.get(name)
            area, per_budget = (
                curve_comparison(student_curve, control_curve, acc)
                if student_curve and control_curve
                else (None, [])
            )
            if area is None:
                checks.append(endpoint)
                continue
            endpoint.role = "context"
            checks.append(
                Check(
                    f"student - {short}, area over log KL",
                    "superiority",
                    superiority(area),
                    f"mean accuracy over the common log-KL range: {area.text()}",
                    area.as_dict(),
                )
            )
            checks.append(endpoint)
            for budget, ci in per_budget:
                checks.append(
                    Check(
                        f"student - {short} at KL {budget:g}",
                        "superiority",
                        superiority(ci),
                        ci.text(),
                        ci.as_dict(),
                        "context",
                    )
                )
        return checks

    return _verdict(
        f"2b {task}/{objective}",
        "The stronger form: the student beats each matched control (no-teacher advantage on the "
        "student's region and on a random region of its size, a placebo teacher, early-stopped "
        "stage 1) at matched KL.",
        "Superiority of the student over every control, each test on its own (all must hold; "
        "one that does not hold fails the claim). Where KL-accuracy curves exist for both, the "
        "test is on the area under accuracy against ln(KL budget) over the budgets every seed of "
        "both reached, divided by that range's width (the mean accuracy at matched KL); the "
        "endpoint and per-budget differences are reported beside it and do not decide. Without "
        "curves, the test is on the endpoints, the control run at the student's config and KL.",
        decide,
    )


# --- claims 3-5 --------------------------------------------------------------------------------
def claim_3(weak: dict[str, Any]) -> Verdict:
    arms = weak["arms"]
    base, teacher = arms["base"], arms[f"teacher-{weak['teacher']}"]
    signal = weak["primary_signal"]
    student = arms[f"student-{signal}"]

    def decide(acc: str) -> list[Check]:
        return [
            compare("teacher - base", teacher, base, acc, "no better", role="premise"),
            compare(f"student ({signal}) - base", student, base, acc, "superiority"),
        ]

    return _verdict(
        "3",
        "A weak mse teacher no better than pi_k still gives a student better than pi_k.",
        f"Premise: the teacher is no better than pi_k (the upper bound of teacher - pi_k < δ = "
        f"{TOL:g}; if the teacher is shown better, the claim is not applicable). Claim: "
        f"superiority of the student ({signal}, the construction fixed in advance) over pi_k.",
        decide,
    )


def claim_4(two: dict[str, Any], base: dict[str, Any] | None = None) -> Verdict:
    """Two teachers combined; `base` is pi_k on the same task and seeds, when two_teachers
    itself has no base arm (the strong-teacher experiment's)."""
    a, b = two["pair"]
    arms = two["arms"]
    combined = arms[f"student-{a}+{b}"]
    base = arms.get("base", base)

    def decide(acc: str) -> list[Check]:
        singles = {a: arms[f"student-{a}"], b: arms[f"student-{b}"]}
        name = max(singles, key=lambda k: _mean(singles[k], acc))
        better = singles[name]
        if base is None:
            premise = Check("premise", "superiority", INCONCLUSIVE, "no base arm", None, "premise")
        else:
            premise = compare("combined - base", combined, base, acc, "superiority", role="premise")
        return [
            premise,
            compare(f"combined - {name} alone", combined, better, acc, "non-inferiority"),
            compare(
                f"combined - {name} alone (superiority, reported)",
                combined,
                better,
                acc,
                "superiority",
                role="context",
            ),
        ]

    return _verdict(
        "4",
        "Two teachers combined do at least as well as the better one alone (docs/method.md's "
        "wording: at least as good, tested as non-inferiority, not as 'helps').",
        f"Premise: the combined student beats pi_k (superiority). Claim: non-inferiority of the "
        f"combined student to the better single-teacher student (the one with the higher mean) "
        f"at margin δ = {TOL:g}. Whether combining helps (superiority) is reported, not decided.",
        decide,
    )


def claim_5(rounds: dict[str, Any]) -> Verdict:
    arms = rounds["arms"]
    erpd, repeated = arms["erpd"], arms["stage1_repeated"]
    others = [n for n in arms if n not in ("erpd", "stage1_repeated")]

    def decide(acc: str) -> list[Check]:
        curve = " -> ".join(f"{_mean(r, acc):.3f}" for r in erpd)
        gain = compare("ERPD last round - first", erpd[-1], erpd[0], acc, "superiority")
        gain.text = f"ERPD {curve}; {gain.text}"
        checks = [
            gain,
            compare(
                "ERPD - repeated stage 1, last round",
                erpd[-1],
                repeated[-1],
                acc,
                "superiority",
            ),
        ]
        for name in others:
            label = f"ERPD - {name}, last round"
            checks.append(
                compare(label, erpd[-1], arms[name][-1], acc, "superiority", role="context")
            )
        return checks

    return _verdict(
        "5",
        "Rounds: pi_{k+1} keeps improving where repeated stage 1 alone plateaus.",
        "Superiority of ERPD's last round over its first, and superiority of ERPD's last round "
        "over repeated stage 1's last round. The other baselines are reported beside them.",
        decide,
    )


def decide_all(results: dict[str, Any]) -> list[Verdict]:
    """Every claim whose experiment ran, in docs/method.md's order."""
    out: list[Verdict] = []
    if "stage1_sweep" in results:
        out += [claim_1a(obj, results["stage1_sweep"]) for obj in results["stage1_sweep"]["arms"]]
    if "kl_sweep" in results:
        out.append(claim_1b(results["kl_sweep"]))
    if "strong_teacher" in results:
        strong = results["strong_teacher"]
        for task, arms in strong["tasks"].items():
            objectives = [k.removeprefix("teacher-") for k in arms if k.startswith("teacher-")]
            out += [claim_2a(task, obj, arms) for obj in objectives]
            out.append(claim_2b(task, strong["first_teacher"], arms))
    if "weak_teacher" in results:
        out.append(claim_3(results["weak_teacher"]))
    if "two_teachers" in results:
        two = results["two_teachers"]
        tasks = results.get("strong_teacher", {}).get("tasks", {})
        out.append(claim_4(two, tasks.get(two.get("task"), {}).get("base")))
    if "rounds" in results:
        out.append(claim_5(results["rounds"]))
    return out


def arms_of(task_arms: dict[str, Any]) -> dict[str, Any]:
    """The arms of strong_teacher.tasks[task], without the kl_curves beside them."""
    return {k: v for k, v in task_arms.items() if k != KL_CURVES}


def as_json(verdicts: Sequence[Verdict]) -> list[dict[str, Any]]:
    return [asdict(v) for v in verdicts]
