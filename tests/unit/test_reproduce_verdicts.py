"""The verdict rules on hand-built results: each claim can both hold and fail."""

from __future__ import annotations

import math
from typing import Any

import pytest

from erpd import metrics as M
from erpd.reproduce.config import ReproduceConfig, preset
from erpd.reproduce.experiments import FINAL_METRICS, arm, curve, spread
from erpd.reproduce.lab import Outcome
from erpd.reproduce.verdicts import TOL, claim_1a, claim_1b, claim_2a, claim_2b, claim_5, margin


def outcome(acc: float, kl: float = 0.0, entropy: float = 0.5, **extra: float) -> Outcome:
    final = dict.fromkeys(FINAL_METRICS, 0.0)
    final.update({M.ACC_EVAL: acc, M.ACC_EVAL_SAMPLED: acc, M.KL_EXACT_BATCH: kl})
    final.update({M.ENTROPY_BATCH: entropy, **extra})
    return Outcome("x", "completed", 1, final)


def arm_of(*accs: float, kl: float = 0.0, entropy: float = 0.5) -> dict[str, Any]:
    return arm([outcome(a, kl, entropy) for a in accs])


def test_spread_and_margin() -> None:
    s = spread([0.4, 0.5, math.nan])
    assert s["n"] == 2 and s["mean"] == pytest.approx(0.45) and s["min"] == 0.4
    assert s["std"] == pytest.approx(math.sqrt(0.005))
    assert margin([0.01]) == TOL  # one seed: no spread to estimate
    assert margin([0.0, 0.0, 0.0]) == TOL
    # 2 standard errors of the paired differences, when larger than TOL
    assert margin([0.0, 0.2]) == pytest.approx(2 * math.sqrt(0.02) / math.sqrt(2))


def test_curve_averages_only_epochs_every_seed_reached() -> None:
    a = Outcome("a", "completed", 8, {}, [{"step": 0, "epoch": 0, M.ACC_EVAL: 0.2},
                                          {"step": 4, "epoch": 1, M.ACC_EVAL: 0.4}])  # fmt: skip
    b = Outcome("b", "kl_budget", 2, {}, [{"step": 0, "epoch": 0, M.ACC_EVAL: 0.3}])
    rows = curve([a, b])
    assert [r["epoch"] for r in rows] == [0]
    assert rows[0][M.ACC_EVAL]["mean"] == pytest.approx(0.25)


def sweep(accs: list[float], kls: list[float], ents: list[float]) -> dict[str, Any]:
    points = [
        {
            "epoch": e,
            M.ACC_EVAL: spread([a]),
            M.ACC_EVAL_SAMPLED: spread([a]),
            M.KL_EXACT_BATCH: spread([k]),
            M.ENTROPY_BATCH: spread([h]),
        }
        for e, a, k, h in zip([0, 1, 2, 4, 8, 16], accs, kls, ents, strict=True)
    ]
    return {"arms": {"sapo": {"curve": points}}}


def test_claim_1a_rise_then_plateau() -> None:
    ents = [0.6, 0.55, 0.5, 0.45, 0.4, 0.35]
    kls = [0.0, 0.05, 0.1, 0.2, 0.3, 0.4]
    assert claim_1a("sapo", sweep([0.4, 0.5, 0.52, 0.5, 0.47, 0.45], kls, ents)).holds
    # still climbing at the end: not a plateau
    assert not claim_1a("sapo", sweep([0.4, 0.45, 0.5, 0.55, 0.6, 0.65], kls, ents)).holds
    # never rose beyond noise
    assert not claim_1a("sapo", sweep([0.4, 0.41, 0.42, 0.41, 0.4, 0.4], kls, ents)).holds
    # entropy did not fall
    assert not claim_1a("sapo", sweep([0.4, 0.5, 0.5, 0.5, 0.5, 0.5], kls, ents[::-1])).holds


def test_claim_1b_needs_lower_kl_and_a_lower_ceiling() -> None:
    def kl_sweep(ceiling_top: float, kl_top: float) -> dict[str, Any]:
        return {
            "coefs": [0.0, 1.0],
            "arms": {
                "kl_coef=0": {"final": arm_of(0.4, kl=0.4), "ceiling": 0.53,
                              "ceiling_sampled": 0.4},
                "kl_coef=1": {"final": arm_of(0.4, kl=kl_top), "ceiling": ceiling_top,
                              "ceiling_sampled": 0.4},
            },
        }  # fmt: skip

    v = claim_1b(kl_sweep(0.48, 0.05))
    assert v.holds and not v.holds_sampled  # equal sampled ceilings: not lowered
    assert not claim_1b(kl_sweep(0.52, 0.05)).holds  # within noise
    assert not claim_1b(kl_sweep(0.48, 0.5)).holds  # KL not lowered


def test_claim_2a_student_matches_teacher_at_several_times_lower_kl() -> None:
    arms = {
        "teacher-sapo": arm_of(0.47, 0.49, kl=0.34, entropy=0.37),
        "student-sapo": arm_of(0.46, 0.50, kl=0.06, entropy=0.52),
    }
    assert claim_2a("final", "sapo", arms).holds
    arms["student-sapo"] = arm_of(0.46, 0.50, kl=0.2, entropy=0.52)  # only 1.7x lower KL
    assert not claim_2a("final", "sapo", arms).holds
    arms["student-sapo"] = arm_of(0.40, 0.42, kl=0.06, entropy=0.52)  # 7 points worse
    assert not claim_2a("final", "sapo", arms).holds


def test_claim_2b_student_must_beat_both_controls() -> None:
    arms = {
        "student-sapo": arm_of(0.56, 0.57, kl=0.05),
        "control-advantage": arm_of(0.50, 0.51, kl=0.05),
        "control-early-stop": arm_of(0.51, 0.52, kl=0.05),
    }
    assert claim_2b("final", "sapo", arms).holds
    arms["control-early-stop"] = arm_of(0.55, 0.56, kl=0.05)
    assert not claim_2b("final", "sapo", arms).holds


def test_claim_5_rounds() -> None:
    def rounds(erpd: list[float], repeated: list[float]) -> dict[str, Any]:
        return {
            "arms": {
                "erpd": [arm_of(a, a + 0.01) for a in erpd],
                "stage1_repeated": [arm_of(a, a + 0.01) for a in repeated],
            }
        }

    assert claim_5(rounds([0.55, 0.56, 0.61], [0.52, 0.52, 0.50])).holds
    assert not claim_5(rounds([0.55, 0.56, 0.57], [0.52, 0.52, 0.50])).holds  # no gain
    assert not claim_5(rounds([0.55, 0.56, 0.61], [0.52, 0.56, 0.60])).holds  # no lead


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
