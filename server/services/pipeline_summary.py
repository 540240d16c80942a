"""A pipeline read back whole: its runs by round and role, and per round the student against each
matched control (erpd/control_table.py builds the table; this module reads what it needs from
the store).

Roles come from the plan the pipeline recorded when it was created (server/services/pipelines.py);
a pipeline from before plans existed has no controls, and its roles follow from the runs' kinds.
Only a succeeded run is read: a control still queued, running, failed or cancelled shows its
status with null numbers, and never holds back the student's row.
"""

from __future__ import annotations

import uuid
from dataclasses import dataclass, field
from typing import Any

from sqlalchemy import select
from sqlalchemy.orm import Session

from erpd.control_table import POINT_METRICS, Arm, EvalPoint, RoundTable, eval_points, round_table
from server.db import Pipeline, Run, RunKind, RunStatus
from server.services.errors import NotFoundError
from server.services.metrics import metric_series

KIND_ROLE = {RunKind.SAMPLE: "sample", RunKind.STAGE1: "teacher", RunKind.STAGE2: "student"}


@dataclass
class PipelineRun:
    run: Run
    role: str  # sample | teacher | student | control
    control: str | None = None


@dataclass
class RoundSummary:
    round: int
    runs: list[PipelineRun] = field(default_factory=list)
    table: RoundTable | None = None


@dataclass
class PipelineSummary:
    pipeline: Pipeline
    controls: list[str]
    rounds: list[RoundSummary]


def _plan(pipeline: Pipeline, runs: list[Run]) -> list[list[tuple[str, str | None, uuid.UUID]]]:
    """Per round, (role, control, run id) in the order sample, teachers, student, controls."""
    plan: list[dict[str, Any]] | None = pipeline.config.get("plan")
    if plan is None:  # created before plans: no controls, roles by kind
        rounds: list[list[tuple[str, str | None, uuid.UUID]]] = [[] for _ in range(pipeline.rounds)]
        order = list(KIND_ROLE)
        for run in sorted(runs, key=lambda r: (order.index(r.kind), r.created_at)):
            if 0 <= run.round < pipeline.rounds:
                rounds[run.round].append((KIND_ROLE[run.kind], None, run.id))
        return rounds
    return [
        [
            ("sample", None, uuid.UUID(r["sample"])),
            *[("teacher", None, uuid.UUID(t)) for t in r["teachers"]],
            ("student", None, uuid.UUID(r["student"])),
            *[("control", c, uuid.UUID(i)) for c, i in r["controls"]],
        ]
        for r in plan
    ]


def _points(session: Session, run: Run) -> list[EvalPoint]:
    """A succeeded run's eval points (nothing for a run that has not succeeded)."""
    if run.status is not RunStatus.SUCCEEDED:
        return []
    series = metric_series(session, run_id=run.id, names=POINT_METRICS)
    return eval_points(
        (step, name, value)
        for name, s in series.items()
        for step, value in zip(s.steps, s.values, strict=True)
    )


def _arm(run: Run, role: str, name: str) -> Arm:
    return Arm(
        role="student" if role == "student" else "control",
        name=name,
        run=str(run.id),
        status=run.status.value,
        steps=run.progress_step,
    )


def _table(session: Session, k: int, members: list[PipelineRun]) -> RoundTable | None:
    student = next((m.run for m in members if m.role == "student"), None)
    if student is None:  # deleted
        return None
    controls = [
        (_arm(m.run, m.role, str(m.control)), _points(session, m.run))
        for m in members
        if m.role == "control"
    ]
    return round_table(k, _arm(student, "student", "student"), _points(session, student), controls)


def pipeline_summary(
    session: Session, *, pipeline_id: uuid.UUID, owner_id: uuid.UUID | None
) -> PipelineSummary:
    """The key's pipeline with its runs by round and role and each round's control table;
    another key's pipeline is not found."""
    pipeline = session.get(Pipeline, pipeline_id)
    if pipeline is None or pipeline.owner_id != owner_id:
        raise NotFoundError("pipeline", pipeline_id)
    runs = list(session.scalars(select(Run).where(Run.pipeline_id == pipeline_id)))
    by_id = {r.id: r for r in runs}
    rounds = []
    for k, members in enumerate(_plan(pipeline, runs)):
        found = [
            PipelineRun(by_id[run_id], role, control)
            for role, control, run_id in members
            if run_id in by_id  # a run deleted on its own is left out
        ]
        rounds.append(RoundSummary(k, found, _table(session, k, found)))
    return PipelineSummary(pipeline, list(pipeline.config.get("controls", [])), rounds)
