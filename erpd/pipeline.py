"""ERPD rounds: sample from pi_k -> stage 1 (teachers) -> stage 2 -> pi_{k+1}.

Output layout (every directory is written atomically, so a pipeline re-run after a crash reuses
what completed and resumes what was stopped):

    OUT/base/checkpoint              the tiny base (when no model.path is given)
    OUT/round-K/batch                the fixed RolloutBatch of round K
    OUT/round-K/teacher-NAME/        stage-1 run (checkpoint/, resume/)
    OUT/round-K/student/             stage-2 run (checkpoint/ = pi_{K+1})
    OUT/round-K/control-NAME/        a matched control (`controls`), on round K's batch
    OUT/metrics.jsonl                every metric point of every run
    OUT/summary.json                 the base / teacher / student / control table, and per
                                     round the student against each control (`controls`)

A control runs after its round's student and never feeds the next round; one that fails (a
diverged loss, say) is recorded as failed and the pipeline goes on (erpd/control_table.py).
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Literal

from erpd import metrics as M
from erpd.config import ControlName, PipelineConfig, Stage1Config
from erpd.control_table import Arm, EvalPoint, RoundTable, control_config, eval_points, round_table
from erpd.controls import uses_teachers
from erpd.errors import ConfigError, DivergedError
from erpd.evaluate import batch_diagnostics
from erpd.files import write_json
from erpd.models import load_policy
from erpd.progress import ProgressFactory, no_progress
from erpd.rollout import ROLLOUT_META, RolloutBatch, batch_timeouts
from erpd.spec import StageSpec, sample_batch, tiny_base
from erpd.stage import StageEnv, StageResult
from erpd.stage2 import check_inputs as check_stage2_inputs


@dataclass
class Row:
    """One line of the summary table: a policy, its accuracy, and what it cost in KL."""

    round: int
    role: str  # base | teacher | student | control
    name: str
    acc_eval: float | None
    acc_eval_sampled: float | None
    kl_exact: float | None  # full-vocabulary KL to the round's pi_k on the fixed batch
    entropy: float | None  # token entropy on the fixed batch
    steps: int
    status: str
    path: str
    error: str | None = None  # a control that failed (the pipeline goes on without it)


@dataclass
class PipelineResult:
    status: str  # completed | stopped (resumable: run the same command again)
    rows: list[Row]
    student: Path
    metrics: Path
    summary: Path
    wall_time: float
    controls: list[RoundTable] = field(default_factory=list)
    """Per round with controls: the student against each (empty without `controls`)."""


def _row(k: int, role: str, res: StageResult) -> Row:
    s = res.summary
    return Row(
        round=k,
        role=role,
        name=res.run,
        acc_eval=s.get(M.ACC_EVAL),
        acc_eval_sampled=s.get(M.ACC_EVAL_SAMPLED),
        kl_exact=s.get(M.KL_EXACT_BATCH),
        entropy=s.get(M.ENTROPY_BATCH),
        steps=res.steps,
        status=res.status,
        path=str(res.checkpoint),
    )


def _base_row(k: int, path: Path, batch: RolloutBatch, env: StageEnv) -> Row:
    """pi_k measured the same way as its teachers and student (KL to itself is 0 by definition)."""
    model, tokenizer = load_policy(path, env.device)
    values = env.evaluator(tokenizer, 0)(model, step=0)
    values.update(batch_diagnostics(model, None, batch, bf16=env.bf16))
    return Row(
        round=k,
        role="base",
        name=f"round-{k}/base",
        acc_eval=values.get(M.ACC_EVAL),
        acc_eval_sampled=values.get(M.ACC_EVAL_SAMPLED),
        kl_exact=0.0,
        entropy=values.get(M.ENTROPY_BATCH),
        steps=0,
        status="completed",
        path=str(path),
    )


def _sample(k: int, pi_k: Path, out: Path, cfg: PipelineConfig, env: StageEnv) -> RolloutBatch:
    path = out / f"round-{k}" / "batch"
    if (path / ROLLOUT_META).is_file():
        return RolloutBatch.load(path)
    batch = sample_batch(pi_k, path, cfg, env, k)
    values = {M.REWARD_MEAN: batch.rewards.mean().item(), M.REWARD_TIMEOUTS: batch_timeouts(batch)}
    env.sink.log(f"round-{k}/sample", 0, values)
    return batch


@dataclass
class _Round:
    """What every stage of round k shares: the pipeline, pi_0, pi_k and the fixed batch."""

    cfg: PipelineConfig
    out: Path
    k: int
    pi_0: Path
    pi_k: Path
    batch: RolloutBatch

    def run(
        self, env: StageEnv, stage: Literal["stage1", "stage2"], name: str, **extra: Any
    ) -> StageResult:
        """The stage `name` of this round, unless it finished in an earlier invocation."""
        run_dir = self.out / f"round-{self.k}" / name
        done = StageResult.finished(run_dir)
        if done is not None:
            return done
        spec = StageSpec(
            stage=stage,
            pipeline=self.cfg.model_dump(mode="json"),
            pi_k=str(self.pi_k),
            pi_0=str(self.pi_0),
            batch=str(run_dir.parent / "batch"),
            run_dir=str(run_dir),
            run=f"round-{self.k}/{name}",
            **extra,
        )
        return spec.run_stage(env, self.batch)


def run_pipeline(
    cfg: PipelineConfig,
    out_dir: str | Path,
    *,
    sink: M.MetricSink | None = None,
    progress: ProgressFactory = no_progress,
    should_stop: Callable[[], bool] | None = None,
) -> PipelineResult:
    """Run `cfg.rounds` ERPD rounds into out_dir; returns the summary rows and the final student."""
    started = time.time()
    check_stage2_inputs(cfg.stage2, len(cfg.teachers))  # before a base or a batch is made
    out = Path(out_dir)
    jsonl = M.JsonlSink(out / "metrics.jsonl")
    env = StageEnv.of(cfg, M.TeeSink(jsonl, sink) if sink else jsonl, progress)  # validates first
    _claim_output_dir(out, cfg)
    env.should_stop = should_stop
    rows: list[Row] = []
    try:
        pi_0 = Path(cfg.model.path) if cfg.model.path is not None else None
        if pi_0 is None:
            pi_0 = tiny_base(cfg.model.tiny, cfg.base, env, out / "base", cfg.runtime.seed)
        pi_k = pi_0
        for k in range(cfg.rounds):
            batch = _sample(k, pi_k, out, cfg, env)
            rows.append(_base_row(k, pi_k, batch, env))
            this = _Round(cfg, out, k, pi_0, pi_k, batch)
            teachers: list[StageResult] = []
            for t in cfg.teachers:
                res = this.run(env, "stage1", f"teacher-{t.label}", config=t.model_dump())
                if res.stopped:
                    return _finish(out, rows, pi_k, jsonl, started, "stopped")
                teachers.append(res)
                rows.append(_row(k, "teacher", res))
            student = this.run(
                env,
                "stage2",
                "student",
                config=cfg.stage2.model_dump(),
                teachers=[str(t.checkpoint) for t in teachers],
                pinned=[t.sha256 for t in teachers],
            )
            if student.stopped or student.checkpoint is None:
                return _finish(out, rows, pi_k, jsonl, started, "stopped")
            rows.append(_row(k, "student", student))
            controls = _controls(this, env, teachers)
            rows += controls
            if any(r.status == "stopped" for r in controls):
                return _finish(out, rows, pi_k, jsonl, started, "stopped")
            pi_k = student.checkpoint
        return _finish(out, rows, pi_k, jsonl, started, "completed")
    finally:
        env.sink.close()


def _controls(this: _Round, env: StageEnv, teachers: list[StageResult]) -> list[Row]:
    """Round k's matched controls, one after another on its batch, until one is stopped; a
    control that diverges is a failed row, not a failed pipeline."""
    rows = []
    name: ControlName
    for name in this.cfg.controls:
        stage = control_config(name, this.cfg.teachers, this.cfg.stage2)
        run = f"control-{name}"
        kind: Literal["stage1", "stage2"] = "stage1"
        extra: dict[str, Any] = {}
        if not isinstance(stage, Stage1Config):
            kind, reads = "stage2", teachers if uses_teachers(name) else []
            extra = {"teachers": [str(t.checkpoint) for t in reads]}
            extra["pinned"] = [t.sha256 for t in reads]
        try:
            res = this.run(env, kind, run, config=stage.model_dump(), **extra)
        except DivergedError as exc:
            path = str(this.out / f"round-{this.k}" / run)
            rows.append(_failed(this.k, f"round-{this.k}/{run}", path, str(exc)))
            continue
        rows.append(_row(this.k, "control", res))
        if res.stopped:
            break
    return rows


def _failed(k: int, name: str, path: str, error: str) -> Row:
    return Row(k, "control", name, None, None, None, None, 0, "failed", path, error)


def _artefact_fields(cfg: PipelineConfig) -> dict[str, object]:
    """The parts of a config that shape the checkpoints. Device, eval settings, the number of
    rounds and the controls do not: a finished run may be re-evaluated, moved to a GPU,
    extended or given controls (they never feed a round)."""
    data = cfg.model_dump(mode="json", exclude={"eval": True, "rounds": True, "controls": True})
    data["runtime"].pop("device")
    return data


def _claim_output_dir(out: Path, cfg: PipelineConfig) -> None:
    """Reuse an output directory only for the same config: finished stages are not re-run, so
    a changed config over an old run would silently mix the two."""
    if out.exists() and not out.is_dir():
        raise ConfigError("--out", f"{out} exists and is not a directory")
    recorded = out / "config.json"
    if recorded.is_file():
        try:
            previous = _artefact_fields(PipelineConfig.model_validate_json(recorded.read_text()))
        except ValueError as exc:
            raise ConfigError(
                "--out", f"{out}/config.json is unreadable or from another erpd version"
            ) from exc
        if previous != _artefact_fields(cfg):
            raise ConfigError(
                "--out", f"{out} holds a pipeline with another config; use a new --out or delete it"
            )
    elif out.is_dir() and any(out.iterdir()):
        raise ConfigError("--out", f"{out} is not empty and holds no erpd pipeline")
    out.mkdir(parents=True, exist_ok=True)
    # the latest eval/rounds/device win; the rest is unchanged
    write_json(recorded, cfg.model_dump(mode="json"), indent=2)


def _finish(
    out: Path, rows: list[Row], student: Path, jsonl: M.JsonlSink, started: float, status: str
) -> PipelineResult:
    summary = out / "summary.json"
    wall = time.time() - started
    tables = _tables(rows, jsonl.path)
    body = {
        "status": status,
        "rows": [asdict(r) for r in rows],
        "controls": [t.as_dict() for t in tables],
        "student": str(student),
        "wall_time_s": wall,
    }
    write_json(summary, body, indent=2)
    return PipelineResult(status, rows, student, jsonl.path, summary, wall, tables)


def _tables(rows: list[Row], metrics: Path) -> list[RoundTable]:
    """Per round with controls, the student against each, from the runs' eval points."""
    if not any(r.role == "control" for r in rows):
        return []
    by_run: dict[str, list[tuple[int, str, float | None]]] = {}
    for p in M.read_jsonl(metrics):
        step, value = p["step"], p["value"]
        if isinstance(step, int):
            number = float(value) if isinstance(value, int | float) else None
            by_run.setdefault(str(p["run"]), []).append((step, str(p["name"]), number))
    tables = []
    for k in sorted({r.round for r in rows if r.role == "control"}):
        student = next((r for r in rows if r.round == k and r.role == "student"), None)
        if student is not None:
            controls = [_arm(r, by_run) for r in rows if r.round == k and r.role == "control"]
            tables.append(round_table(k, *_arm(student, by_run), controls))
    return tables


def _arm(
    r: Row, by_run: dict[str, list[tuple[int, str, float | None]]]
) -> tuple[Arm, list[EvalPoint]]:
    """A student or control row as an arm of its round's table, with its eval points (none for
    a run that failed or stopped: its early points are not its result)."""
    name = r.name.split("/")[-1].removeprefix("control-")
    finished = r.status not in ("failed", "stopped")
    points = eval_points(by_run.get(r.name, [])) if finished else []
    run_dir = str(Path(r.path).parent) if finished else r.path
    if r.role == "student":
        return Arm("student", "student", run_dir, r.status, r.steps), points
    return Arm("control", name, run_dir, r.status, r.steps), points
