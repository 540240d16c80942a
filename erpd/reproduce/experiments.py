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
from erpd.config import ControlName, Stage2Config
from erpd.controls import early_stop_control, stage2_control, uses_teachers
from erpd.reproduce.lab import Lab, Outcome
from erpd.rollout import RolloutBatch

# what every arm reports; greedy and sampled accuracy both (they disagree when entropy moves)
FINAL_METRICS = (
    M.ACC_EVAL,
    M.ACC_EVAL_SAMPLED,
    M.KL_EXACT_BATCH,
    M.KL_K3_BATCH,
    M.KL_SEQ_K3,  # the on-policy KL, reported beside kl/exact_batch
    M.ENTROPY_BATCH,
    M.ENTROPY_SAMPLED,
    M.DRIFT_CORRECT,
    M.DRIFT_INCORRECT,
    M.ACC_TRAIN_BATCH,
)
CURVE_METRICS = FINAL_METRICS
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


# --- 3. ERPD with strong teachers, matched controls, KL-accuracy curves, ablations ------------
def control_label(name: ControlName) -> str:
    return "control-" + name.replace("_", "-")


def strong_teacher(lab: Lab) -> Result:
    """Teacher vs student vs the matched controls, on every task; on the first task also the
    KL-accuracy curves of the student and the controls, and the stage-2 ablations."""
    c = lab.cfg
    first = c.strong_objectives[0]
    out: Result = {"first_teacher": first, "controls": list(c.controls), "tasks": {}}
    for task in c.tasks:
        pi_0 = lab.pi_0(task)
        curves: dict[str, list[Outcome]] = defaultdict(list)

        def one(
            seed: int, task: str = task, pi_0: Any = pi_0, curves: Any = curves
        ) -> dict[str, Outcome]:
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
            student_kl = max(arms[f"student-{first}"].get(M.KL_EXACT_BATCH), 1e-6)
            arms.update(
                _controls(
                    lab, task, seed, c.student, teachers[first], batch,
                    early_budget=student_kl, max_epochs=c.control_max_epochs,
                )
            )  # fmt: skip
            if task == c.primary:
                for name, outcome in _curve_runs(lab, task, seed, teachers[first], batch).items():
                    curves[name].append(outcome)
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
        if curves:
            out["tasks"][task]["kl_curves"] = {
                name: kl_curve(o, c.kl_curve_budgets) for name, o in curves.items()
            }
    return out


def _controls(
    lab: Lab,
    task: str,
    seed: int,
    student: Stage2Config,
    teacher: Outcome,
    batch: RolloutBatch,
    *,
    early_budget: float,
    max_epochs: int,
    prefix: str = "",
    early_update: dict[str, Any] | None = None,
) -> dict[str, Outcome]:
    """The matched controls of one student: the stage-2 ones at the student's own config (the
    same steps and budget), early_stop until its KL passes `early_budget`."""
    c = lab.cfg
    pi_0 = lab.pi_0(task)
    arms: dict[str, Outcome] = {}
    for name in c.controls:
        label = control_label(name)
        if name == "early_stop":
            cfg1 = early_stop_control(
                lab.teacher_config(teacher.label.removeprefix("teacher-")),
                student,
                early_budget,
                max_epochs=max_epochs,
            ).model_copy(update=early_update or {})
            arms[label] = lab.stage1(
                task, seed, cfg1, pi_k=pi_0, batch=batch, label=prefix + label, eval_start=False
            )
        else:
            arms[label] = lab.stage2(
                task,
                seed,
                stage2_control(student, name),
                pi_k=pi_0,
                batch=batch,
                teachers=[teacher] if uses_teachers(name) else [],
                label=prefix + label,
            )
    return arms


def _curve_runs(
    lab: Lab, task: str, seed: int, teacher: Outcome, batch: RolloutBatch
) -> dict[str, Outcome]:
    """The student and each control trained until they cross the largest KL budget, evaluated
    at every budget they cross (one run each)."""
    c = lab.cfg
    budgets = c.kl_curve_budgets
    along = {
        "epochs": c.curve_max_epochs,
        "kl_budget": max(budgets),
        "eval_at_kl": budgets,
        "eval_at_epochs": None,
        "eval_every_epochs": c.curve_max_epochs,
    }
    student = c.student.model_copy(update=along)
    pi_0 = lab.pi_0(task)
    runs = {
        "student": lab.stage2(
            task, seed, student, pi_k=pi_0, batch=batch, teachers=[teacher], label="curve-student"
        )
    }
    runs.update(
        _controls(
            lab, task, seed, student, teacher, batch, early_budget=max(budgets),
            max_epochs=c.curve_max_epochs, prefix="curve-", early_update={"eval_at_kl": budgets},
        )
    )  # fmt: skip
    return runs


def kl_curve(outcomes: Sequence[Outcome], budgets: Sequence[float]) -> list[Result]:
    """One arm's KL-accuracy curve over seeds: at each budget, every seed's eval point at the
    step its run crossed it (NaN for a seed whose run ended below it), index = seed.

    The crossing is the one the run recorded (eval_at_kl): a minibatch's KL can cross a mark
    while the whole batch's kl/exact_batch at that eval sits just below it, so the points are
    found by step, never by filtering on kl/exact_batch >= budget."""
    rows = []
    for budget in budgets:
        per_seed: list[dict[str, Any]] = []
        values: dict[str, list[float]] = defaultdict(list)
        for seed, o in enumerate(outcomes):
            step = o.kl_crossings.get(budget)
            point = next((p for p in o.curve if p["step"] == step), None)
            row = {m: math.nan if point is None else point.get(m, math.nan) for m in FINAL_METRICS}
            for m, v in row.items():
                values[m].append(v)
            per_seed.append({"seed": seed, "step": point and point["step"], **row})
        stats = {m: spread(values[m]) for m in FINAL_METRICS}
        rows.append({"budget": budget, "per_seed": per_seed, **stats})
    return rows


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
        # what a student without this teacher's token signal gets on the same batch: the
        # teacher-free control (the same run as the strong-teacher experiment's) and the
        # placebo of the primary signal
        primary = c.student.model_copy(update={"signal": c.weak_primary})
        for name in ("advantage_random", "placebo"):
            if name in c.controls:
                arms[control_label(name)] = lab.stage2(
                    task,
                    seed,
                    stage2_control(primary if name == "placebo" else c.student, name),
                    pi_k=pi_0,
                    batch=batch,
                    teachers=[teacher] if uses_teachers(name) else [],
                    label=f"weak-{control_label(name)}",
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
ROUND_ARMS = ("erpd", "stage1_repeated", "no_teacher", "onpolicy_grpo", "onpolicy_grpo_steps")


def rounds(lab: Lab) -> Result:
    """ERPD rounds against the baselines a reviewer asks for, each measured the same way after
    every round: held-out accuracy, and KL to pi_0 and entropy on the seed's round-0 batch (the
    cumulative cost of all rounds), with the cumulative optimizer steps and samples it took.

        erpd                 sample -> teacher -> student, the student seeds the next round
        stage1_repeated      sample -> teacher, the teacher seeds the next round
        no_teacher           sample -> stage 2 with the outcome advantage on every token, at
                             the student's budget (the same trust region, no teacher)
        onpolicy_grpo        one GRPO step per fresh batch, as many samples as ERPD's round
        onpolicy_grpo_steps  one GRPO step per fresh batch, as many optimizer steps as ERPD's
                             round (teacher + student): far more samples
    """
    c = lab.cfg
    series: dict[str, list[list[Outcome]]] = defaultdict(list)  # arm -> seed -> rounds
    own_kl: dict[str, list[list[float]]] = defaultdict(list)  # KL to each round's own pi_k
    costs: dict[str, list[list[tuple[int, int]]]] = defaultdict(list)  # cumulative steps, samples
    for seed in lab.seeds:
        arms, kls, cost = _rounds_of_seed(lab, seed)
        for name, outcomes in arms.items():
            series[name].append(outcomes)
            costs[name].append(cost[name])
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
                "steps_total": spread([float(k[r][0]) for k in costs[name]]),
                "samples_total": spread([float(k[r][1]) for k in costs[name]]),
            }
            for r in range(c.rounds)
        ]
    return out


def _rounds_of_seed(
    lab: Lab, seed: int
) -> tuple[dict[str, list[Outcome]], dict[str, list[float]], dict[str, list[tuple[int, int]]]]:
    """One seed's arms, round by round: each arm's measured policy after every round, the KL
    each ERPD student / repeated teacher / no-teacher run spent against its own round's pi_k,
    and each arm's cumulative (optimizer steps, samples)."""
    seed_rounds = _SeedRounds(lab, seed)
    for r in range(lab.cfg.rounds):
        seed_rounds.round(r)
    arms = seed_rounds.arms
    return arms, seed_rounds.kls, {name: seed_rounds.cost[name] for name in arms}


class _SeedRounds:
    """The rounds of one seed: every arm's current policy, what it measured and spent."""

    def __init__(self, lab: Lab, seed: int) -> None:
        c = self.c = lab.cfg
        self.lab, self.seed, self.task = lab, seed, c.primary
        self.pi_0 = lab.pi_0(self.task)
        self.first = c.strong_objectives[0]
        self.teacher_cfg = lab.teacher_config(self.first)
        group = c.sample.group_size
        self.per_round = c.sample.num_prompts * group
        self.per_onpolicy_step = c.onpolicy_prompts * group
        self.batches_per_round = c.sample.num_prompts // c.onpolicy_prompts
        self.onpolicy_cfg = self.teacher_cfg.model_copy(
            update={
                "objective": "grpo",
                "epochs": 1,
                "minibatch_size": self.per_onpolicy_step,
                "eval_at_epochs": None,
            }
        )
        self.no_teacher_cfg = c.student.model_copy(update={"signal": "advantage", "region": "all"})
        self.batch0 = lab.batch(self.task, seed, self.pi_0)
        self.policy = dict.fromkeys(ROUND_ARMS, self.pi_0)
        self.arms: dict[str, list[Outcome]] = defaultdict(list)
        self.kls: dict[str, list[float]] = defaultdict(list)
        self.cost: dict[str, list[tuple[int, int]]] = {name: [] for name in ROUND_ARMS}
        self.onpolicy_rollouts = 0  # fresh batches drawn so far by onpolicy_grpo_steps

    def round(self, r: int) -> None:
        erpd_steps = self._erpd(r)
        self._repeated(r)
        self._no_teacher(r)
        first = r * self.batches_per_round
        self._onpolicy("onpolicy_grpo", r, first, self.batches_per_round, "onpolicy")
        if self.c.onpolicy_matched_steps:
            done = self.onpolicy_rollouts
            self.onpolicy_rollouts += self._onpolicy(
                "onpolicy_grpo_steps", r, done, erpd_steps, "onpolicy-steps",
                per_rollout=self.c.onpolicy_steps_per_rollout,
            )  # fmt: skip

    def _record(self, arm: str, r: int, run: Outcome, steps: int, samples: int) -> None:
        """Measure the arm's policy after round r the same way for every arm."""
        policy = Path(str(run.checkpoint))
        self.arms[arm].append(
            self.lab.measure(
                self.task, self.seed, policy, pi_k=self.pi_0, batch=self.batch0,
                label=f"{arm}-round{r + 1}",
            )
        )  # fmt: skip
        done_steps, done_samples = self.cost[arm][-1] if self.cost[arm] else (0, 0)
        self.cost[arm].append((done_steps + steps, done_samples + samples))
        self.policy[arm] = policy

    def _teacher_on(self, pi_k: Path, r: int) -> tuple[Outcome, RolloutBatch]:
        lab, cfg = self.lab, self.teacher_cfg
        batch = lab.batch(self.task, self.seed, pi_k, round_index=r)
        label = f"teacher-{self.first}"
        if r == 0:  # the strong-teacher experiment's teacher, with its curve
            return lab.stage1(self.task, self.seed, cfg, pi_k=pi_k, batch=batch, label=label), batch
        # later rounds are measured by `_record`: the teacher's own evals would be wasted
        final_only = cfg.model_copy(update={"eval_at_epochs": [cfg.epochs]})
        teacher = lab.stage1(
            self.task, self.seed, final_only, pi_k=pi_k, batch=batch, label=label,
            eval_start=False,
        )  # fmt: skip
        return teacher, batch

    def _erpd(self, r: int) -> int:
        """Round r of ERPD (round 0 is the strong-teacher experiment's teacher and student);
        returns its optimizer steps."""
        pi_k = self.policy["erpd"]
        teacher, batch = self._teacher_on(pi_k, r)
        student = self.lab.stage2(
            self.task, self.seed, self.c.student, pi_k=pi_k, batch=batch, teachers=[teacher],
            label=f"student-{self.first}",
        )  # fmt: skip
        self.kls["erpd"].append(student.get(M.KL_EXACT_BATCH))
        steps = teacher.steps + student.steps
        self._record("erpd", r, student, steps, self.per_round)
        return steps

    def _repeated(self, r: int) -> None:
        teacher, _ = self._teacher_on(self.policy["stage1_repeated"], r)
        self.kls["stage1_repeated"].append(teacher.get(M.KL_EXACT_BATCH))
        self._record("stage1_repeated", r, teacher, teacher.steps, self.per_round)

    def _no_teacher(self, r: int) -> None:
        pi_k = self.policy["no_teacher"]
        batch = self.lab.batch(self.task, self.seed, pi_k, round_index=r)
        run = self.lab.stage2(
            self.task, self.seed, self.no_teacher_cfg, pi_k=pi_k, batch=batch, teachers=[],
            label="no-teacher",
        )  # fmt: skip
        self.kls["no_teacher"].append(run.get(M.KL_EXACT_BATCH))
        self._record("no_teacher", r, run, run.steps, self.per_round)

    def _onpolicy(
        self, arm: str, r: int, first: int, count: int, prefix: str, *, per_rollout: int = 1
    ) -> int:
        """`count` GRPO steps of onpolicy_prompts each, on fresh batches (indices first,
        first + 1, ...) drawn from the arm's current policy; each batch feeds up to
        `per_rollout` of them (one epoch of minibatches, PPO-style: the last is per_rollout - 1
        steps stale). Returns the number of batches drawn."""
        policy, step, left, j = self.policy[arm], None, count, first
        while left > 0:
            k = min(per_rollout, left)
            fresh = self.lab.batch(
                self.task, self.seed, policy, round_index=j,
                num_prompts=self.c.onpolicy_prompts * k,
            )  # fmt: skip
            step = self.lab.stage1(
                self.task, self.seed, self.onpolicy_cfg, pi_k=policy, batch=fresh,
                label=f"{prefix}-{j}", evaluate=False,
            )  # fmt: skip
            policy = Path(str(step.checkpoint))
            left, j = left - k, j + 1
        if step is None:
            raise ValueError(f"{arm}: round {r + 1} has no optimizer step to match")
        self._record(arm, r, step, count, count * self.per_onpolicy_step)
        return j - first


RUNNERS: dict[str, Callable[[Lab], Result]] = {
    "stage1_sweep": stage1_sweep,
    "kl_sweep": kl_sweep,
    "strong_teacher": strong_teacher,
    "weak_teacher": weak_teacher,
    "two_teachers": two_teachers,
    "rounds": rounds,
}
