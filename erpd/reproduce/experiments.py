"""The six experiments of docs/method.md, each a function of the Lab returning plain JSON data.

Every experiment runs once per fixed batch (seed) and reports, per arm, each seed's final values
and their mean and spread; sweeps also report curves over epochs. Nothing here decides a verdict
(that is erpd.reproduce.verdicts, written before any result was seen).
"""

from __future__ import annotations

import math
import statistics
from collections import defaultdict
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from erpd import metrics as M
from erpd.reproduce.lab import Lab, Outcome

# what every arm reports; greedy and sampled accuracy both (they disagree when entropy moves)
FINAL_METRICS = (
    M.ACC_EVAL,
    M.ACC_EVAL_SAMPLED,
    M.KL_EXACT_BATCH,
    M.KL_K3_BATCH,
    M.ENTROPY_BATCH,
    M.ENTROPY_SAMPLED,
    M.DRIFT_CORRECT,
    M.DRIFT_INCORRECT,
    M.ACC_TRAIN_BATCH,
)
CURVE_METRICS = (*FINAL_METRICS, M.KL_SEQ_K3)
Result = dict[str, Any]


def spread(values: Sequence[float]) -> dict[str, float]:
    """mean, sample std, min and max over seeds (NaNs, e.g. a metric a run lacks, dropped)."""
    xs = [v for v in values if not math.isnan(v)]
    if not xs:
        return {"mean": math.nan, "std": math.nan, "min": math.nan, "max": math.nan, "n": 0}
    std = statistics.stdev(xs) if len(xs) > 1 else 0.0
    return {"mean": statistics.fmean(xs), "std": std, "min": min(xs), "max": max(xs), "n": len(xs)}


def arm(outcomes: Sequence[Outcome]) -> Result:
    """Final values of one arm over seeds."""
    per_seed = [
        {"status": o.status, "steps": o.steps, **{m: o.get(m) for m in FINAL_METRICS}}
        for o in outcomes
    ]
    stats = {m: spread([o.get(m) for o in outcomes]) for m in FINAL_METRICS}
    stats["steps"] = spread([float(o.steps) for o in outcomes])
    return {"per_seed": per_seed, **stats}


def curve(outcomes: Sequence[Outcome]) -> list[Result]:
    """Eval points over epochs, aggregated over seeds at each epoch all seeds reached."""
    by_epoch: dict[float, list[dict[str, float]]] = defaultdict(list)
    for o in outcomes:
        for point in o.curve:
            by_epoch[round(point["epoch"], 6)].append(point)
    rows = []
    for epoch in sorted(by_epoch):
        points = by_epoch[epoch]
        if len(points) < len(outcomes):
            continue  # a budget-stopped seed ended earlier: never average unequal sets
        row: Result = {"epoch": epoch}
        for m in CURVE_METRICS:
            row[m] = spread([float(p.get(m, math.nan)) for p in points])
        rows.append(row)
    return rows


def _per_seed(lab: Lab, fn: Callable[[int], dict[str, Outcome]]) -> dict[str, list[Outcome]]:
    arms: dict[str, list[Outcome]] = defaultdict(list)
    for seed in lab.seeds:
        for name, outcome in fn(seed).items():
            arms[name].append(outcome)
    return arms


# --- 1. stage-1 aggressiveness ----------------------------------------------------------------
def stage1_sweep(lab: Lab) -> Result:
    """Epochs on the fixed batch vs accuracy, entropy, KL and log-prob drift, per objective."""
    task = lab.cfg.primary
    pi_0 = lab.pi_0(task)

    def one(seed: int) -> dict[str, Outcome]:
        batch = lab.batch(task, seed, pi_0)
        return {
            obj: lab.stage1(
                task, seed, lab.sweep_config(obj), pi_k=pi_0, batch=batch, label=f"sweep-{obj}"
            )
            for obj in lab.cfg.sweep_objectives
        }

    arms = _per_seed(lab, one)
    return {
        "task": task,
        "epochs": lab.cfg.sweep_epochs,
        "arms": {name: {"curve": curve(o), "final": arm(o)} for name, o in arms.items()},
    }


# --- 2. KL coefficient in stage 1 -------------------------------------------------------------
def kl_sweep(lab: Lab) -> Result:
    """sapo with a k3 penalty to pi_k: the accuracy ceiling and KL per coefficient."""
    task = lab.cfg.primary
    pi_0 = lab.pi_0(task)

    def one(seed: int) -> dict[str, Outcome]:
        batch = lab.batch(task, seed, pi_0)
        return {
            f"kl_coef={coef:g}": lab.stage1(
                task,
                seed,
                lab.sweep_config("sapo", kl_coef=coef),
                pi_k=pi_0,
                batch=batch,
                label=f"sweep-sapo-kl{coef:g}",
            )
            for coef in lab.cfg.kl_coefs
        }

    arms = _per_seed(lab, one)
    out: Result = {"task": task, "coefs": lab.cfg.kl_coefs, "arms": {}}
    for name, outcomes in arms.items():
        points = curve(outcomes)
        trained = [p for p in points if p["epoch"] > 0]
        out["arms"][name] = {
            "curve": points,
            "final": arm(outcomes),
            # the ceiling: the best mean accuracy over the eval points after training started
            "ceiling": max((p[M.ACC_EVAL]["mean"] for p in trained), default=math.nan),
            "ceiling_sampled": max(
                (p[M.ACC_EVAL_SAMPLED]["mean"] for p in trained), default=math.nan
            ),
        }
    return out


# --- 3. ERPD with strong teachers, controls at matched KL, stage-2 ablations -------------------
def strong_teacher(lab: Lab) -> Result:
    """Teacher vs student vs the two controls at the student's KL, on every task."""
    c = lab.cfg
    first = c.strong_objectives[0]
    out: Result = {"first_teacher": first, "tasks": {}}
    for task in c.tasks:
        pi_0 = lab.pi_0(task)

        def one(seed: int, task: str = task, pi_0: Any = pi_0) -> dict[str, Outcome]:
            batch = lab.batch(task, seed, pi_0)
            arms = {"base": lab.measure(task, seed, pi_0, pi_k=pi_0, batch=batch, label="base")}
            teachers = {}
            for obj in c.objectives(task):
                t = lab.stage1(
                    task,
                    seed,
                    lab.teacher_config(obj),
                    pi_k=pi_0,
                    batch=batch,
                    label=f"teacher-{obj}",
                )
                teachers[obj] = arms[f"teacher-{obj}"] = t
                arms[f"student-{obj}"] = lab.stage2(
                    task,
                    seed,
                    c.student,
                    pi_k=pi_0,
                    batch=batch,
                    teachers=[t],
                    label=f"student-{obj}",
                )
            # matched KL: both controls may spend exactly what the student spent, no more
            kl = max(arms[f"student-{first}"].get(M.KL_EXACT_BATCH), 1e-6)
            control = c.student.model_copy(
                update={"signal": "advantage", "epochs": c.control_max_epochs, "kl_budget": kl}
            )
            arms["control-advantage"] = lab.stage2(
                task, seed, control, pi_k=pi_0, batch=batch, teachers=[], label="control-advantage"
            )
            early = lab.teacher_config(
                first, kl_budget=kl, eval_at_epochs=None, eval_every_epochs=1
            )
            arms["control-early-stop"] = lab.stage1(
                task,
                seed,
                early,
                pi_k=pi_0,
                batch=batch,
                label="control-early-stop",
                eval_start=False,
            )
            if task == c.primary:
                for name in c.ablations:
                    arms[f"ablation {name}"] = lab.stage2(
                        task,
                        seed,
                        c.ablation(name),
                        pi_k=pi_0,
                        batch=batch,
                        teachers=[teachers[first]],
                        label=f"ablation-{name.replace('=', '')}",
                    )
            return arms

        arms = _per_seed(lab, one)
        out["tasks"][task] = {name: arm(o) for name, o in arms.items()}
    return out


# --- 4. a weak teacher and the signal constructions --------------------------------------------
def weak_teacher(lab: Lab) -> Result:
    """An mse teacher against the unlearned pi_k, distilled with each signal construction."""
    c = lab.cfg
    task = c.primary
    pi_0 = lab.pi_0(task)

    def one(seed: int) -> dict[str, Outcome]:
        batch = lab.batch(task, seed, pi_0)
        teacher = lab.stage1(
            task,
            seed,
            lab.teacher_config(c.weak_objective),
            pi_k=pi_0,
            batch=batch,
            label=f"teacher-{c.weak_objective}",
        )
        arms = {
            "base": lab.measure(task, seed, pi_0, pi_k=pi_0, batch=batch, label="base"),
            f"teacher-{c.weak_objective}": teacher,
        }
        for signal in c.weak_signals:
            cfg = c.student.model_copy(update={"signal": signal})
            arms[f"student-{signal}"] = lab.stage2(
                task,
                seed,
                cfg,
                pi_k=pi_0,
                batch=batch,
                teachers=[teacher],
                label=f"weak-student-{signal}",
            )
        return arms

    arms = _per_seed(lab, one)
    return {
        "task": task,
        "teacher": c.weak_objective,
        "primary_signal": c.weak_primary,
        "arms": {name: arm(o) for name, o in arms.items()},
    }


# --- 5. two teachers combined -----------------------------------------------------------------
def two_teachers(lab: Lab) -> Result:
    """The first two strong teachers' signals combined (w = 1/2 each) vs each alone."""
    c = lab.cfg
    task = c.primary
    pi_0 = lab.pi_0(task)
    pair = c.strong_objectives[:2]

    def one(seed: int) -> dict[str, Outcome]:
        batch = lab.batch(task, seed, pi_0)
        teachers = [
            lab.stage1(
                task, seed, lab.teacher_config(o), pi_k=pi_0, batch=batch, label=f"teacher-{o}"
            )
            for o in pair
        ]
        arms = {
            f"student-{o}": lab.stage2(
                task, seed, c.student, pi_k=pi_0, batch=batch, teachers=[t], label=f"student-{o}"
            )
            for o, t in zip(pair, teachers, strict=True)
        }
        arms["student-" + "+".join(pair)] = lab.stage2(
            task,
            seed,
            c.student,
            pi_k=pi_0,
            batch=batch,
            teachers=teachers,
            label="student-" + "-".join(pair),
        )
        return arms

    arms = _per_seed(lab, one)
    return {"task": task, "pair": pair, "arms": {name: arm(o) for name, o in arms.items()}}


# --- 6. rounds --------------------------------------------------------------------------------
def rounds(lab: Lab) -> Result:
    """ERPD rounds vs repeated stage 1 vs on-policy GRPO at an equal number of samples.

    Every arm's policy after round r is measured the same way: held-out accuracy, and KL to
    pi_0 and entropy on the seed's round-0 batch (the cumulative cost of all rounds).
    """
    c = lab.cfg
    series: dict[str, list[list[Outcome]]] = defaultdict(list)  # arm -> seed -> rounds
    own_kl: dict[str, list[list[float]]] = defaultdict(list)  # KL to each round's own pi_k
    for seed in lab.seeds:
        arms, kls = _rounds_of_seed(lab, seed)
        for name, outcomes in arms.items():
            series[name].append(outcomes)
            if name in kls:
                own_kl[name].append(kls[name])
    out: Result = {
        "task": c.primary,
        "rounds": c.rounds,
        "samples_per_round": c.sample.num_prompts * c.sample.group_size,
        "arms": {},
    }
    for name, per_seed in series.items():
        out["arms"][name] = [
            {
                "round": r + 1,
                **arm([seed_rounds[r] for seed_rounds in per_seed]),
                "kl_round": spread([k[r] for k in own_kl[name]]) if name in own_kl else None,
            }
            for r in range(c.rounds)
        ]
    return out


def _rounds_of_seed(lab: Lab, seed: int) -> tuple[dict[str, list[Outcome]], dict[str, list[float]]]:
    """One seed's three arms, round by round: each arm's measured policy after every round,
    and the KL each ERPD student and repeated teacher spent against its own round's pi_k."""
    c = lab.cfg
    task = c.primary
    pi_0 = lab.pi_0(task)
    first = c.strong_objectives[0]
    teacher_cfg = lab.teacher_config(first)
    batches_per_round = c.sample.num_prompts // c.onpolicy_prompts
    onpolicy_cfg = teacher_cfg.model_copy(
        update={
            "objective": "grpo",
            "epochs": 1,
            "minibatch_size": c.onpolicy_prompts * c.sample.group_size,
            "eval_at_epochs": None,
        }
    )
    batch0 = lab.batch(task, seed, pi_0)

    def measure(outcome: Outcome, name: str) -> Outcome:
        policy = Path(str(outcome.checkpoint))
        return lab.measure(task, seed, policy, pi_k=pi_0, batch=batch0, label=name)

    def teacher_on(pi_k: Path, r: int) -> tuple[Outcome, Any]:
        batch = lab.batch(task, seed, pi_k, round_index=r)
        label = f"teacher-{first}"
        if r == 0:  # the strong-teacher experiment's teacher, with its curve
            return lab.stage1(task, seed, teacher_cfg, pi_k=pi_k, batch=batch, label=label), batch
        # later rounds are measured by `measure`: the teacher's own evals would be wasted
        final_only = teacher_cfg.model_copy(update={"eval_at_epochs": [teacher_cfg.epochs]})
        teacher = lab.stage1(
            task, seed, final_only, pi_k=pi_k, batch=batch, label=label, eval_start=False
        )
        return teacher, batch

    current = repeated = policy = pi_0
    arms: dict[str, list[Outcome]] = defaultdict(list)
    kls: dict[str, list[float]] = defaultdict(list)
    for r in range(c.rounds):
        # round 0 of both arms is the strong-teacher experiment's teacher and student
        teacher, batch = teacher_on(current, r)
        label = f"student-{first}"
        student = lab.stage2(
            task, seed, c.student, pi_k=current, batch=batch, teachers=[teacher], label=label
        )
        arms["erpd"].append(measure(student, f"erpd-round{r + 1}"))
        kls["erpd"].append(student.get(M.KL_EXACT_BATCH))
        current = Path(str(student.checkpoint))

        teacher, _ = teacher_on(repeated, r)
        arms["stage1_repeated"].append(measure(teacher, f"stage1-round{r + 1}"))
        kls["stage1_repeated"].append(teacher.get(M.KL_EXACT_BATCH))
        repeated = Path(str(teacher.checkpoint))

        for j in range(r * batches_per_round, (r + 1) * batches_per_round):
            fresh = lab.batch(task, seed, policy, round_index=j, num_prompts=c.onpolicy_prompts)
            label = f"onpolicy-{j}"
            step = lab.stage1(
                task, seed, onpolicy_cfg, pi_k=policy, batch=fresh, label=label, evaluate=False
            )
            policy = Path(str(step.checkpoint))
        arms["onpolicy_grpo"].append(measure(step, f"onpolicy-round{r + 1}"))
    return arms, kls


RUNNERS: dict[str, Callable[[Lab], Result]] = {
    "stage1_sweep": stage1_sweep,
    "kl_sweep": kl_sweep,
    "strong_teacher": strong_teacher,
    "weak_teacher": weak_teacher,
    "two_teachers": two_teachers,
    "rounds": rounds,
}
