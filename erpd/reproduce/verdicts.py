"""The claims of docs/method.md ("What a correct implementation shows") as rules fixed in code.

These rules were written before any reproduction result existed and must not be tuned after
seeing one. Each claim is decided on greedy held-out accuracy (docs/method.md's headline metric)
and, separately, on sampled (T=1) accuracy, because the two disagree whenever entropy moves.

Noise: a difference counts only beyond `margin`: the larger of TOL (3 points, the low end of
docs/method.md's "tolerances of 3-5 points for any comparison") and two standard errors of the
per-seed paired differences. "At least as good" means diff >= -margin; "better" diff > margin.
"""

from __future__ import annotations

import math
import statistics
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from typing import Any

from erpd import metrics as M

TOL = 0.03
SEVERAL_TIMES = 3.0  # "several times lower KL": at least 3x
ACCURACY = {"greedy": M.ACC_EVAL, "sampled": M.ACC_EVAL_SAMPLED}


@dataclass
class Verdict:
    claim: str  # docs/method.md claim number and variant, e.g. "2a final/sapo"
    statement: str
    rule: str
    holds: bool  # on greedy accuracy
    holds_sampled: bool  # the same rule on sampled accuracy
    evidence: str  # the numbers that decide it (greedy; sampled in brackets)


def margin(diffs: Sequence[float]) -> float:
    xs = [d for d in diffs if not math.isnan(d)]
    if len(xs) < 2:
        return TOL
    return max(TOL, 2 * statistics.stdev(xs) / math.sqrt(len(xs)))


def _paired(a: dict[str, Any], b: dict[str, Any], metric: str) -> tuple[float, float]:
    """Mean of per-seed a - b and the margin it must clear."""
    diffs = [x[metric] - y[metric] for x, y in zip(a["per_seed"], b["per_seed"], strict=True)]
    return statistics.fmean(diffs), margin(diffs)


def _mean(arm: dict[str, Any], metric: str) -> float:
    return float(arm[metric]["mean"])


def _both(
    decide: Callable[[str], tuple[bool, str]],
) -> tuple[bool, bool, str]:
    greedy, evidence = decide(ACCURACY["greedy"])
    sampled, evidence_sampled = decide(ACCURACY["sampled"])
    return greedy, sampled, f"{evidence} [sampled: {evidence_sampled}]"


# --- claim 1: stage 1 rises, then plateaus or falls, while entropy falls and KL grows ----------
def claim_1a(objective: str, sweep: dict[str, Any]) -> Verdict:
    points = sweep["arms"][objective]["curve"]
    last_epoch = points[-1]["epoch"]

    def decide(acc: str) -> tuple[bool, str]:
        start, final = points[0][acc]["mean"], points[-1][acc]["mean"]
        trained = [p for p in points if p["epoch"] > 0]
        peak_point = max(trained, key=lambda p: p[acc]["mean"])
        peak = peak_point[acc]["mean"]
        quarter = [p for p in trained if p["epoch"] <= last_epoch / 4] or trained[:1]
        early = max(p[acc]["mean"] for p in quarter)
        kl = [p[M.KL_EXACT_BATCH]["mean"] for p in points]
        rises = peak - start > TOL
        no_late_gain = final - early <= TOL
        entropy_falls = points[-1][M.ENTROPY_BATCH]["mean"] < points[0][M.ENTROPY_BATCH]["mean"]
        kl_grows = kl[-1] == max(kl) and kl[-1] > peak_point[M.KL_EXACT_BATCH]["mean"]
        ok = rises and no_late_gain and entropy_falls and kl_grows
        text = (
            f"acc {start:.3f} -> peak {peak:.3f} (epoch {peak_point['epoch']:g}) -> "
            f"{final:.3f} at epoch {last_epoch:g}; entropy "
            f"{points[0][M.ENTROPY_BATCH]['mean']:.3f} -> {points[-1][M.ENTROPY_BATCH]['mean']:.3f}"
            f"; KL {kl[0]:.3f} -> {kl[-1]:.3f}"
        )
        return ok, text

    greedy, sampled, evidence = _both(decide)
    return Verdict(
        f"1a {objective}",
        "Stage 1, more epochs: accuracy rises quickly, then plateaus or falls while entropy "
        "falls and KL keeps growing.",
        f"peak - epoch 0 > {TOL}; last - best of the first quarter of epochs (or the first "
        f"eval) <= {TOL}; "
        "entropy last < epoch 0; KL largest at the last epoch and above KL at the peak",
        greedy,
        sampled,
        evidence,
    )


def claim_1b(sweep: dict[str, Any]) -> Verdict:
    coefs = sweep["coefs"]
    ref, top = sweep["arms"][f"kl_coef={coefs[0]:g}"], sweep["arms"][f"kl_coef={max(coefs):g}"]
    kl_ref, kl_top = _mean(ref["final"], M.KL_EXACT_BATCH), _mean(top["final"], M.KL_EXACT_BATCH)

    def decide(acc: str) -> tuple[bool, str]:
        key = "ceiling" if acc == M.ACC_EVAL else "ceiling_sampled"
        ok = kl_top < kl_ref and ref[key] - top[key] > TOL
        return ok, (
            f"kl_coef {coefs[0]:g} -> {max(coefs):g}: final KL {kl_ref:.3f} -> {kl_top:.3f}, "
            f"ceiling {ref[key]:.3f} -> {top[key]:.3f}"
        )

    greedy, sampled, evidence = _both(decide)
    return Verdict(
        "1b",
        "Raising the stage-1 kl_coef lowers both KL and the accuracy ceiling.",
        f"final KL at the largest coefficient < at the first; ceiling lower by > {TOL}",
        greedy,
        sampled,
        evidence,
    )


# --- claim 2: the student matches the teacher at several times lower KL -----------------------
def claim_2a(task: str, objective: str, arms: dict[str, Any]) -> Verdict:
    teacher, student = arms[f"teacher-{objective}"], arms[f"student-{objective}"]
    kl_t, kl_s = _mean(teacher, M.KL_EXACT_BATCH), _mean(student, M.KL_EXACT_BATCH)
    ratio = kl_t / kl_s if kl_s > 0 else math.inf
    ent_t, ent_s = _mean(teacher, M.ENTROPY_BATCH), _mean(student, M.ENTROPY_BATCH)

    def decide(acc: str) -> tuple[bool, str]:
        diff, m = _paired(student, teacher, acc)
        ok = diff >= -m and ratio >= SEVERAL_TIMES and ent_s > ent_t
        return ok, (
            f"student {_mean(student, acc):.3f} vs teacher {_mean(teacher, acc):.3f} "
            f"(diff {diff:+.3f}, margin {m:.3f}); KL {kl_s:.3f} vs {kl_t:.3f} ({ratio:.1f}x); "
            f"entropy {ent_s:.3f} vs {ent_t:.3f}"
        )

    greedy, sampled, evidence = _both(decide)
    return Verdict(
        f"2a {task}/{objective}",
        "Stage 2 from a strong teacher: accuracy >= the teacher's (within noise) at several "
        "times lower KL, with higher entropy than the teacher.",
        f"student - teacher >= -margin; teacher KL / student KL >= {SEVERAL_TIMES:g}; "
        "student entropy > teacher entropy",
        greedy,
        sampled,
        evidence,
    )


def claim_2b(task: str, objective: str, arms: dict[str, Any]) -> Verdict:
    student = arms[f"student-{objective}"]
    controls = {"no-teacher": arms["control-advantage"], "early-stop": arms["control-early-stop"]}

    def decide(acc: str) -> tuple[bool, str]:
        parts, ok = [], True
        for name, control in controls.items():
            diff, m = _paired(student, control, acc)
            ok = ok and diff > m
            parts.append(
                f"{name} {_mean(control, acc):.3f} at KL {_mean(control, M.KL_EXACT_BATCH):.3f} "
                f"(diff {diff:+.3f}, margin {m:.3f})"
            )
        head = f"student {_mean(student, acc):.3f} at KL {_mean(student, M.KL_EXACT_BATCH):.3f}"
        return ok, head + " vs " + "; ".join(parts)

    greedy, sampled, evidence = _both(decide)
    return Verdict(
        f"2b {task}/{objective}",
        "The stronger form: the student beats the no-teacher control and early-stopped stage 1 "
        "at matched KL.",
        "student - control > margin, for both controls (each given the student's KL as budget)",
        greedy,
        sampled,
        evidence,
    )


# --- claims 3-5 --------------------------------------------------------------------------------
def claim_3(weak: dict[str, Any]) -> Verdict:
    arms = weak["arms"]
    base, teacher = arms["base"], arms[f"teacher-{weak['teacher']}"]
    student = arms[f"student-{weak['primary_signal']}"]

    def decide(acc: str) -> tuple[bool, str]:
        diff, m = _paired(student, base, acc)
        t_diff, _ = _paired(teacher, base, acc)
        premise = "weak (no better than pi_k)" if t_diff <= TOL else "NOT weak: premise fails"
        return diff > m, (
            f"student ({weak['primary_signal']}) {_mean(student, acc):.3f} vs pi_k "
            f"{_mean(base, acc):.3f} (diff {diff:+.3f}, margin {m:.3f}); teacher "
            f"{_mean(teacher, acc):.3f}, {premise}"
        )

    greedy, sampled, evidence = _both(decide)
    return Verdict(
        "3",
        "A weak mse teacher no better than pi_k still gives a student better than pi_k.",
        f"student ({weak['primary_signal']}, fixed in advance) - pi_k > margin",
        greedy,
        sampled,
        evidence,
    )


def claim_4(two: dict[str, Any]) -> Verdict:
    a, b = two["pair"]
    arms = two["arms"]
    combined = arms[f"student-{a}+{b}"]

    def decide(acc: str) -> tuple[bool, str]:
        better = max((arms[f"student-{a}"], arms[f"student-{b}"]), key=lambda x: _mean(x, acc))
        name = a if better is arms[f"student-{a}"] else b
        diff, m = _paired(combined, better, acc)
        return diff >= -m, (
            f"combined {_mean(combined, acc):.3f} vs better single ({name}) "
            f"{_mean(better, acc):.3f} (diff {diff:+.3f}, margin {m:.3f})"
        )

    greedy, sampled, evidence = _both(decide)
    return Verdict(
        "4",
        "Two teachers combined do at least as well as the better one alone.",
        "combined - better single-teacher student >= -margin",
        greedy,
        sampled,
        evidence,
    )


def claim_5(rounds: dict[str, Any]) -> Verdict:
    erpd, repeated = rounds["arms"]["erpd"], rounds["arms"]["stage1_repeated"]

    def decide(acc: str) -> tuple[bool, str]:
        gain, m1 = _paired(erpd[-1], erpd[0], acc)
        lead, m2 = _paired(erpd[-1], repeated[-1], acc)
        curve = " -> ".join(f"{_mean(r, acc):.3f}" for r in erpd)
        rep = " -> ".join(f"{_mean(r, acc):.3f}" for r in repeated)
        return gain > m1 and lead > m2, (
            f"ERPD {curve} (last - first {gain:+.3f}, margin {m1:.3f}); repeated stage 1 "
            f"{rep} (ERPD lead {lead:+.3f}, margin {m2:.3f})"
        )

    greedy, sampled, evidence = _both(decide)
    return Verdict(
        "5",
        "Rounds: pi_{k+1} keeps improving where repeated stage 1 alone plateaus.",
        "ERPD last round - ERPD first round > margin, and ERPD last round - repeated stage 1 "
        "last round > margin",
        greedy,
        sampled,
        evidence,
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
        out.append(claim_4(results["two_teachers"]))
    if "rounds" in results:
        out.append(claim_5(results["rounds"]))
    return out


def as_json(verdicts: Sequence[Verdict]) -> list[dict[str, Any]]:
    return [asdict(v) for v in verdicts]
