"""The verdict rules on hand-built results: each claim can hold, fail, stay inconclusive, and
(where it has a premise) be not applicable; the rules also re-decide the committed results."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import pytest

from erpd import metrics as M
from erpd.reproduce.config import ReproduceConfig, preset
from erpd.reproduce.experiments import FINAL_METRICS, arm, curve, spread
from erpd.reproduce.lab import Outcome
from erpd.reproduce.stats import Interval, interval
from erpd.reproduce.verdicts import (
    FAILS,
    HOLDS,
    INCONCLUSIVE,
    NOT_APPLICABLE,
    OUTCOMES,
    TOL,
    claim_1a,
    claim_1b,
    claim_2a,
    claim_2b,
    claim_3,
    claim_4,
    claim_5,
    decide_all,
    no_better,
    non_inferiority,
    superiority,
    with_premise,
)

ROOT = Path(__file__).resolve().parents[2]
# seed-to-seed noise of a null effect: differences of +-12 points around 0
NOISE = (0.12, -0.11, 0.13, -0.12)


def outcome(acc: float, kl: float = 0.0, entropy: float = 0.5, **extra: float) -> Outcome:
    final = dict.fromkeys(FINAL_METRICS, 0.0)
    final.update({M.ACC_EVAL: acc, M.ACC_EVAL_SAMPLED: acc, M.KL_EXACT_BATCH: kl})
    final.update({M.ENTROPY_BATCH: entropy, **extra})
    return Outcome("x", "completed", 1, final)


def arm_of(*accs: float, kl: float = 0.0, entropy: float = 0.5) -> dict[str, Any]:
    return arm([outcome(a, kl, entropy) for a in accs])


def shifted(base: tuple[float, ...], by: float | tuple[float, ...], **kw: Any) -> dict[str, Any]:
    """An arm whose per-seed accuracy is base's plus `by` (one shift or one per seed)."""
    shifts = by if isinstance(by, tuple) else (by,) * len(base)
    return arm_of(*(b + d for b, d in zip(base, shifts, strict=True)), **kw)


BASE = (0.40, 0.48, 0.44, 0.52)  # pi_k on four batch seeds (the seeds differ in difficulty)


def ci(lo: float, hi: float, n: int = 4) -> Interval:
    return Interval((lo + hi) / 2, 0.01, lo, hi, n)


def test_the_three_tests_on_hand_built_intervals() -> None:
    assert superiority(ci(0.01, 0.10)) == HOLDS
    assert superiority(ci(-0.01, 0.02)) == FAILS  # any gain is below TOL
    assert superiority(ci(-0.02, 0.08)) == INCONCLUSIVE
    assert superiority(interval([0.2])) == INCONCLUSIVE  # one seed: no interval
    assert non_inferiority(ci(-0.02, 0.05)) == HOLDS
    assert non_inferiority(ci(-0.10, -0.04)) == FAILS
    assert non_inferiority(ci(-0.08, 0.02)) == INCONCLUSIVE
    assert no_better(ci(-0.05, 0.02)) == HOLDS
    assert no_better(ci(0.01, 0.09)) == FAILS
    assert no_better(ci(-0.02, 0.06)) == INCONCLUSIVE
    assert TOL == 0.03  # the margin the rules were written with


def test_a_premise_that_does_not_hold_makes_a_claim_not_applicable() -> None:
    for claim in OUTCOMES:
        assert with_premise(FAILS, claim) == NOT_APPLICABLE
        assert with_premise(INCONCLUSIVE, claim) != HOLDS
    assert with_premise(HOLDS, HOLDS) == HOLDS
    assert with_premise(INCONCLUSIVE, FAILS) == FAILS


def test_spread() -> None:
    s = spread([0.4, 0.5, math.nan])
    assert s["n"] == 2 and s["mean"] == pytest.approx(0.45) and s["min"] == 0.4
    assert s["std"] == pytest.approx(math.sqrt(0.005))


def test_curve_averages_only_epochs_every_seed_reached() -> None:
    a = Outcome("a", "completed", 8, {}, [{"step": 0, "epoch": 0, M.ACC_EVAL: 0.2},
                                          {"step": 4, "epoch": 1, M.ACC_EVAL: 0.4}])  # fmt: skip
    b = Outcome("b", "kl_budget", 2, {}, [{"step": 0, "epoch": 0, M.ACC_EVAL: 0.3}])
    rows = curve([a, b])
    assert [r["epoch"] for r in rows] == [0]
    assert rows[0][M.ACC_EVAL]["mean"] == pytest.approx(0.25)


def sweep(accs: list[float], kls: list[float], ents: list[float], noise: float = 0.01) -> Any:
    """A stage-1 curve over epochs 0..16, four seeds spread +-noise around each mean."""
    offsets = (-1.5 * noise, -0.5 * noise, 0.5 * noise, 1.5 * noise)
    points = [
        {
            "epoch": e,
            M.ACC_EVAL: spread([a + o for o in offsets]),
            M.ACC_EVAL_SAMPLED: spread([a + o for o in offsets]),
            M.KL_EXACT_BATCH: spread([k, k]),
            M.ENTROPY_BATCH: spread([h, h]),
        }
        for e, a, k, h in zip([0, 1, 2, 4, 8, 16], accs, kls, ents, strict=True)
    ]
    return {"arms": {"sapo": {"curve": points}}}


ENTS = [0.6, 0.55, 0.5, 0.45, 0.4, 0.35]
KLS = [0.0, 0.05, 0.1, 0.2, 0.3, 0.4]


def test_claim_1a_rise_then_plateau() -> None:
    v = claim_1a("sapo", sweep([0.4, 0.5, 0.52, 0.5, 0.47, 0.45], KLS, ENTS))
    assert v.outcome == HOLDS and v.holds and "rise" in v.evidence
    # still climbing at the end: not a plateau
    assert claim_1a("sapo", sweep([0.4, 0.45, 0.5, 0.55, 0.6, 0.65], KLS, ENTS)).outcome == FAILS
    # never rose: any rise is shown to be below TOL
    flat = sweep([0.4, 0.4, 0.4, 0.4, 0.4, 0.4], KLS, ENTS)
    assert claim_1a("sapo", flat).outcome == FAILS
    # entropy did not fall
    up = sweep([0.4, 0.5, 0.5, 0.5, 0.5, 0.5], KLS, ENTS[::-1])
    assert claim_1a("sapo", up).outcome == FAILS
    # the same rise-then-plateau buried in seed noise cannot be told from a flat curve
    noisy = sweep([0.4, 0.5, 0.52, 0.5, 0.47, 0.45], KLS, ENTS, noise=0.15)
    assert claim_1a("sapo", noisy).outcome == INCONCLUSIVE


def test_claim_1b_needs_lower_kl_and_a_lower_ceiling() -> None:
    def kl_sweep(ceiling_top: float, kl_top: float, noise: float = 0.01) -> dict[str, Any]:
        ref = sweep([0.4, 0.53, 0.5, 0.5, 0.5, 0.5], KLS, ENTS, noise)["arms"]["sapo"]["curve"]
        top = sweep([0.4, ceiling_top, 0.45, 0.45, 0.45, 0.45], KLS, ENTS, noise)
        top = top["arms"]["sapo"]["curve"]
        return {
            "coefs": [0.0, 1.0],
            "arms": {
                "kl_coef=0": {"final": arm_of(0.5, 0.5, kl=0.4), "curve": ref},
                "kl_coef=1": {"final": arm_of(0.45, 0.45, kl=kl_top), "curve": top},
            },
        }

    assert claim_1b(kl_sweep(0.46, 0.05)).outcome == HOLDS
    # the same ceiling, measured closely enough to rule out a 3-point difference
    assert claim_1b(kl_sweep(0.53, 0.05, noise=0.004)).outcome == FAILS
    assert claim_1b(kl_sweep(0.46, 0.5)).outcome == FAILS  # KL not lowered
    assert claim_1b(kl_sweep(0.46, 0.05, noise=0.2)).outcome == INCONCLUSIVE


def strong(student: Any, teacher: Any, **more: Any) -> dict[str, Any]:
    return {"base": arm_of(*BASE, kl=0.0, entropy=0.55), "teacher-sapo": teacher,
            "student-sapo": student, **more}  # fmt: skip


def test_claim_2a_student_matches_a_teacher_that_beats_the_base() -> None:
    teacher = shifted(BASE, 0.10, kl=0.34, entropy=0.37)
    student = shifted(BASE, (0.10, 0.11, 0.09, 0.10), kl=0.06, entropy=0.52)
    v = claim_2a("final", "sapo", strong(student, teacher))
    assert v.outcome == HOLDS and v.outcome_sampled == HOLDS
    assert {c.role for c in v.checks["greedy"]} == {"premise", "claim"}
    # only 1.7x lower KL
    v = claim_2a("final", "sapo", strong(shifted(BASE, 0.10, kl=0.2, entropy=0.52), teacher))
    assert v.outcome == FAILS
    # a clear loss: 7 points below the teacher, still above the base
    v = claim_2a("final", "sapo", strong(shifted(BASE, (0.03, 0.04, 0.03, 0.02), kl=0.06,
                                                 entropy=0.52), teacher))  # fmt: skip
    assert v.outcome == FAILS


def test_claim_2a_is_not_applicable_when_the_teacher_is_below_the_base() -> None:
    """The calibration leak of issue 21: a teacher under the base made 2a 'hold' before."""
    teacher = shifted(BASE, -0.15, kl=0.34, entropy=0.37)
    student = shifted(BASE, (0.05, 0.04, 0.06, 0.05), kl=0.06, entropy=0.52)
    v = claim_2a("steps", "sapo", strong(student, teacher))
    assert v.outcome == NOT_APPLICABLE and not v.holds


def test_a_null_effect_in_large_noise_holds_nothing() -> None:
    # superiority: the student is the base plus noise
    weak = {
        "teacher": "mse",
        "primary_signal": "gated_advantage",
        "arms": {
            "base": arm_of(*BASE),
            "teacher-mse": shifted(BASE, 0.0),
            "student-gated_advantage": shifted(BASE, NOISE),
        },
    }
    assert claim_3(weak).outcome == INCONCLUSIVE
    # non-inferiority with a premise that fails: a teacher no better than the base, a student
    # within noise of it, and every other condition met
    teacher = shifted(BASE, (0.0, 0.01, -0.01, 0.0), kl=0.34, entropy=0.37)
    student = shifted(BASE, NOISE, kl=0.06, entropy=0.52)
    v = claim_2a("final", "sapo", strong(student, teacher))
    assert v.outcome == NOT_APPLICABLE
    # and a noisy premise leaves it inconclusive at best
    teacher = shifted(BASE, (0.2, -0.1, 0.25, -0.05), kl=0.34, entropy=0.37)
    assert claim_2a("final", "sapo", strong(student, teacher)).outcome == INCONCLUSIVE


def test_claim_3_weak_teacher() -> None:
    def weak(teacher_gain: Any, student_gain: Any) -> dict[str, Any]:
        return {
            "teacher": "mse",
            "primary_signal": "gated_advantage",
            "arms": {
                "base": arm_of(*BASE),
                "teacher-mse": shifted(BASE, teacher_gain),
                "student-gated_advantage": shifted(BASE, student_gain),
                "student-sign": shifted(BASE, -0.2),  # reported, never decides
            },
        }

    assert claim_3(weak((0.0, 0.01, -0.01, 0.0), (0.06, 0.05, 0.07, 0.06))).outcome == HOLDS
    # the premise fails: the teacher is clearly better than pi_k
    v = claim_3(weak((0.08, 0.07, 0.09, 0.08), (0.06, 0.05, 0.07, 0.06)))
    assert v.outcome == NOT_APPLICABLE and "premise" in v.evidence
    # the student is clearly no better than pi_k
    assert claim_3(weak((0.0, 0.01, -0.01, 0.0), (-0.01, 0.0, 0.01, -0.01))).outcome == FAILS


def two(combined: Any, sapo: Any, ce: Any) -> dict[str, Any]:
    return {
        "task": "final",
        "pair": ["sapo", "ce"],
        "arms": {"student-sapo": sapo, "student-ce": ce, "student-sapo+ce": combined},
    }


def test_claim_4_combined_at_least_as_good_as_the_better_single() -> None:
    base = arm_of(*BASE)
    sapo, ce = shifted(BASE, 0.08), shifted(BASE, 0.05)
    v = claim_4(two(shifted(BASE, (0.08, 0.07, 0.09, 0.08)), sapo, ce), base)
    assert v.outcome == HOLDS  # at least as good; it does not "help" and is not said to
    assert any(c.role == "context" and c.test == "superiority" for c in v.checks["greedy"])
    # clearly below the better single
    assert claim_4(two(shifted(BASE, (0.02, 0.01, 0.03, 0.02)), sapo, ce), base).outcome == FAILS
    # the premise fails: the combined student is no better than pi_k (nor are the singles)
    flat = shifted(BASE, (0.0, 0.01, -0.01, 0.0))
    assert claim_4(two(flat, flat, flat), base).outcome == NOT_APPLICABLE
    # no base to check the premise against: never holds
    assert claim_4(two(shifted(BASE, 0.08), sapo, ce)).outcome == INCONCLUSIVE


def test_claim_2b_student_must_beat_every_control() -> None:
    arms = strong(
        shifted(BASE, (0.10, 0.11, 0.09, 0.10), kl=0.05),
        shifted(BASE, 0.12, kl=0.3),
        **{
            "control-advantage-region": shifted(BASE, 0.04, kl=0.05),
            "control-early-stop": shifted(BASE, 0.03, kl=0.05),
        },
    )
    v = claim_2b("final", "sapo", arms)
    assert v.outcome == HOLDS
    assert {c.name for c in v.checks["greedy"]} == {
        "student - advantage-region",
        "student - early-stop",
    }
    arms["control-placebo"] = shifted(BASE, (0.10, 0.10, 0.10, 0.11), kl=0.05)  # as good
    assert claim_2b("final", "sapo", arms).outcome == FAILS
    arms["control-placebo"] = shifted(BASE, (0.0, 0.2, -0.05, 0.15), kl=0.05)  # noisy
    assert claim_2b("final", "sapo", arms).outcome == INCONCLUSIVE
    # results written before the controls were restructured
    old = strong(shifted(BASE, 0.1), shifted(BASE, 0.12),
                 **{"control-advantage": shifted(BASE, 0.1)})  # fmt: skip
    assert claim_2b("final", "sapo", old).outcome == FAILS


def kl_curve(gains: dict[float, tuple[float | None, ...]]) -> list[dict[str, Any]]:
    """A KL-accuracy curve as the experiments write it: per budget, one entry per seed (the
    seed's accuracy the first time its KL crossed the budget; None where it never did)."""
    rows = []
    for budget, per_seed in gains.items():
        seeds = [
            {"seed": i, M.ACC_EVAL: None if g is None else BASE[i] + g,
             M.ACC_EVAL_SAMPLED: None if g is None else BASE[i] + g}
            for i, g in enumerate(per_seed)
        ]  # fmt: skip
        values = [s[M.ACC_EVAL] for s in seeds if s[M.ACC_EVAL] is not None]
        rows.append({"budget": budget, "per_seed": seeds, M.ACC_EVAL: spread(values)})
    return rows


def test_claim_2b_decides_on_the_area_under_the_kl_accuracy_curves() -> None:
    student_curve = kl_curve({0.01: (0.02,) * 4, 0.05: (0.08, 0.09, 0.07, 0.08),
                              0.2: (0.10, 0.11, 0.1, 0.09)})  # fmt: skip
    # the control catches up only at the largest budget and never reaches 0.2 on one seed
    control_curve = kl_curve({0.01: (0.0,) * 4, 0.05: (0.02, 0.03, 0.01, 0.02),
                              0.2: (0.10, None, 0.1, 0.1)})  # fmt: skip
    arms = strong(
        shifted(BASE, 0.10, kl=0.05),
        shifted(BASE, 0.12, kl=0.3),
        **{
            # at its endpoint the control looks as good as the student
            "control-placebo": shifted(BASE, 0.10, kl=0.05),
            "kl_curves": {"student": student_curve, "control-placebo": control_curve},
        },
    )
    v = claim_2b("final", "sapo", arms)
    area = next(c for c in v.checks["greedy"] if "area" in c.name)
    assert area.role == "claim" and area.outcome == HOLDS and area.ci is not None
    # the area covers 0.01..0.05 (every seed of both reached them), not 0.2: the mean of the
    # differences at its two ends, 0.02 and 0.06
    assert area.ci["n"] == 4 and area.ci["diff"] == pytest.approx(0.04)
    assert v.outcome == HOLDS
    at = {c.name: c for c in v.checks["greedy"] if " at KL " in c.name}
    assert set(at) == {f"student - placebo at KL {b:g}" for b in (0.01, 0.05, 0.2)}
    assert at["student - placebo at KL 0.2"].ci["n"] == 3 and all(
        c.role == "context" for c in at.values()
    )
    # the same control along the whole curve: the student no longer beats it
    arms["kl_curves"]["control-placebo"] = student_curve
    assert claim_2b("final", "sapo", arms).outcome == FAILS


def test_claim_5_rounds() -> None:
    def rounds(erpd: list[float], repeated: list[float]) -> dict[str, Any]:
        def per_round(xs: list[float]) -> list[dict[str, Any]]:
            return [shifted(BASE, (x, x + 0.01, x - 0.01, x)) for x in xs]

        return {"arms": {"erpd": per_round(erpd), "stage1_repeated": per_round(repeated),
                         "onpolicy_grpo": per_round(erpd)}}  # fmt: skip

    assert claim_5(rounds([0.05, 0.06, 0.11], [0.02, 0.02, 0.0])).outcome == HOLDS
    assert claim_5(rounds([0.05, 0.06, 0.05], [0.02, 0.02, 0.0])).outcome == FAILS  # no gain
    assert claim_5(rounds([0.05, 0.06, 0.11], [0.02, 0.06, 0.11])).outcome == FAILS  # no lead


def test_one_seed_decides_nothing() -> None:
    teacher, student = arm_of(0.6, kl=0.3, entropy=0.3), arm_of(0.7, kl=0.05, entropy=0.5)
    arms = {"base": arm_of(0.3), "teacher-sapo": teacher, "student-sapo": student}
    v = claim_2a("final", "sapo", arms)
    assert v.outcome == INCONCLUSIVE and "no interval, n=1" in v.evidence


COMMITTED = sorted(
    p.relative_to(ROOT).as_posix() for p in ROOT.glob("docs/reproduction/*/results.json")
)


def test_a_reproduction_is_committed() -> None:
    assert "docs/reproduction/quick/results.json" in COMMITTED


@pytest.mark.parametrize("path", COMMITTED)
def test_the_committed_results_are_decided_by_the_rules(path: str) -> None:
    """Every committed reproduction is re-decided by the rules to the verdicts it records, and
    the invariants of the rules hold on it (whatever the verdicts are)."""
    body = json.loads((ROOT / path).read_text())
    verdicts = decide_all(body["experiments"])
    assert [v.claim for v in verdicts] == [v["claim"] for v in body["verdicts"]]
    recorded = [(v["outcome"], v["outcome_sampled"]) for v in body["verdicts"]]
    assert [(v.outcome, v.outcome_sampled) for v in verdicts] == recorded
    for v in verdicts:
        for kind, outcome in (("greedy", v.outcome), ("sampled", v.outcome_sampled)):
            assert outcome in OUTCOMES
            checks = v.checks[kind]
            premise = [c.outcome for c in checks if c.role == "premise"]
            claim = [c.outcome for c in checks if c.role == "claim"]
            if outcome == HOLDS:
                assert set(premise + claim) == {HOLDS}
            if FAILS in premise:
                assert outcome == NOT_APPLICABLE
            for c in checks:
                if c.ci is not None and c.ci["n"] >= 2:
                    assert c.ci["lo"] <= c.ci["diff"] <= c.ci["hi"]


def test_presets_validate_and_differ_in_size_only() -> None:
    quick = ReproduceConfig.model_validate(preset("quick"))
    full = ReproduceConfig.model_validate(preset("full"))
    assert full.seeds >= 4 and max(full.sweep_epochs) == 32 and 0.01 in full.kl_coefs
    assert quick.teacher == full.teacher and quick.student == full.student
    assert quick.tasks == full.tasks and list(quick.tasks) == ["final", "steps"]
    for name in full.ablations:
        full.ablation(name)  # every ablation is a valid Stage2Config


@pytest.mark.parametrize(
    ("data", "message"),
    [
        ({"ablations": {"x": {"clip_eps": 3}}}, "ablations.x.clip_eps"),
        ({"ablations": {"x": {"nonsense": 1}}}, "ablations.x.nonsense"),
        ({"strong_objectives": ["sapo"]}, "two_teachers"),
        ({"strong_objectives": ["sapo", "sapo"]}, "distinct"),
        ({"onpolicy_prompts": 48}, "multiple of onpolicy_prompts"),
        ({"tasks": {}}, "tasks"),
        ({"tasks": {"Bad Name": {}}}, "tasks"),
    ],
)
def test_invalid_reproduce_configs(data: dict[str, Any], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        ReproduceConfig.model_validate(data)


def test_set_changes_one_field_of_the_presets_teacher() -> None:
    from erpd.cli import apply_override

    data = preset("quick")
    apply_override(data, "teacher.anchor=epoch")
    apply_override(data, "tasks.final.arithmetic.eval_size=300")
    cfg = ReproduceConfig.model_validate(data)
    default = ReproduceConfig.model_validate(preset("quick"))
    assert cfg.teacher.anchor == "epoch"
    assert cfg.teacher.model_copy(update={"anchor": "behaviour"}) == default.teacher
    assert list(cfg.tasks) == ["final", "steps"] and cfg.tasks["final"].arithmetic.eval_size == 300


def test_decide_all_reads_the_restructured_strong_teacher_experiment() -> None:
    """kl_curves sit beside the arms of a task; two_teachers borrows the base of its task."""
    student = shifted(BASE, (0.10, 0.11, 0.09, 0.10), kl=0.06, entropy=0.52)
    curves = kl_curve({0.01: (0.02,) * 4, 0.05: (0.08,) * 4})
    results = {
        "strong_teacher": {
            "first_teacher": "sapo",
            "tasks": {
                "final": strong(
                    student,
                    shifted(BASE, 0.10, kl=0.34, entropy=0.37),
                    **{
                        "control-placebo": shifted(BASE, 0.01, kl=0.06),
                        "kl_curves": {"student": curves, "control-placebo": curves},
                    },
                )
            },
        },
        "two_teachers": two(shifted(BASE, 0.02), shifted(BASE, 0.08), shifted(BASE, 0.05)),
    }
    verdicts = {v.claim: v for v in decide_all(results)}
    assert list(verdicts) == ["2a final/sapo", "2b final/sapo", "4"]
    premise = verdicts["4"].checks["greedy"][0]
    assert premise.role == "premise" and premise.outcome == HOLDS  # 2 points above the base
    assert verdicts["4"].outcome == FAILS  # 6 points below the better single
    assert verdicts["2b final/sapo"].outcome == FAILS  # identical curves: no gain at matched KL
