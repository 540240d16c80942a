"""An ERPD pipeline as runs: per round, one `sample` run (the fixed batch), one stage-1 run per
teacher on that batch, one stage-2 run distilling them (the student) and one run per matched
control on the same batch (erpd/control_table.py). Every round is created at once, so the whole
plan is visible (and counted against the quota) from the start; round k+1's runs name round k's
student as their base and wait until it succeeds and is pinned, or fail when it fails.

Nothing reads a control: a control that fails fails alone, never the student or a later round.
The pipeline keeps its plan (which run plays which role in which round) in its config, under
`plan`, so its summary (server/services/pipeline_summary.py) never guesses roles from names."""

from __future__ import annotations

import uuid
from typing import Any

from sqlalchemy.orm import Session

from erpd.config import ControlName, Stage1Config, Stage2Config
from erpd.control_table import control_config
from erpd.controls import uses_teachers
from server.db import Pipeline, Run, RunKind, utcnow
from server.services.runs import create_run


def create_pipeline(
    session: Session,
    *,
    spec: dict[str, Any],
    model_id: uuid.UUID,
    dataset_id: uuid.UUID,
    owner_id: uuid.UUID | None,
    actor: str,
) -> tuple[Pipeline, list[Run]]:
    """`spec` is a validated PipelineCreate dumped to JSON (see server/schemas.py)."""
    now = utcnow()
    name = spec.get("name") or f"pipeline-{now:%Y%m%d-%H%M%S}"
    pipeline = Pipeline(
        id=uuid.uuid4(),
        name=name,
        owner_id=owner_id,
        model_id=model_id,
        dataset_id=dataset_id,
        rounds=spec["rounds"],
        teacher_objectives=[t["objective"] for t in spec["teachers"]],
        stage2=spec["stage2"],
        config=spec,
        created_at=now,
    )
    session.add(pipeline)
    session.flush()
    common = {"task": spec["task"], "sample": spec["sample"], "runtime": spec["runtime"]}
    runs: list[Run] = []
    plan: list[dict[str, Any]] = []
    base: Run | None = None
    for k in range(spec["rounds"]):
        shared: dict[str, Any] = {
            "model_id": model_id,
            "dataset_id": dataset_id,
            "owner_id": owner_id,
            "pipeline_id": pipeline.id,
            "round": k,
            "base_run_id": None if base is None else base.id,
            "gpu": spec.get("gpu"),
            "max_attempts": spec.get("max_attempts", 3),
            "tags": spec["tags"],
            "actor": actor,
        }
        batch = create_run(
            session, kind=RunKind.SAMPLE, name=f"{name}/r{k}/sample", config=common, **shared
        )
        teachers = [
            create_run(
                session,
                kind=RunKind.STAGE1,
                name=f"{name}/r{k}/teacher-{i}-{teacher['objective']}",
                config={**common, "stage": teacher, "eval": spec["eval"]},
                batch_run_id=batch.id,
                **shared,
            )
            for i, teacher in enumerate(spec["teachers"])
        ]
        last = k + 1 == spec["rounds"]
        base = create_run(
            session,
            kind=RunKind.STAGE2,
            name=f"{name}/r{k}/student",
            config={**common, "stage": spec["stage2"], "eval": spec["eval"]},
            batch_run_id=batch.id,
            teacher_ids=[t.id for t in teachers],
            # the pipeline's webhook fires once, when its last student ends (any earlier failure
            # reaches it through the dependency chain)
            notify_url=spec.get("notify_url") if last else None,
            **shared,
        )
        controls = _controls(session, spec, name, k, common, batch, teachers, shared)
        runs += [batch, *teachers, base, *controls.values()]
        plan.append(_planned(batch, teachers, base, controls))
    pipeline.config = {**spec, "plan": plan}
    return pipeline, runs


def _planned(
    batch: Run, teachers: list[Run], student: Run, controls: dict[str, Run]
) -> dict[str, Any]:
    """A round's entry of the plan: which run plays which role."""
    return {
        "sample": str(batch.id),
        "teachers": [str(t.id) for t in teachers],
        "student": str(student.id),
        # pairs, not an object: JSONB does not keep an object's key order
        "controls": [[c, str(run.id)] for c, run in controls.items()],
    }


def _controls(
    session: Session,
    spec: dict[str, Any],
    name: str,
    k: int,
    common: dict[str, Any],
    batch: Run,
    teachers: list[Run],
    shared: dict[str, Any],
) -> dict[str, Run]:
    """Round k's control runs, beside its student on the same batch and base."""
    stage2 = Stage2Config.model_validate(spec["stage2"])
    configs = [Stage1Config.model_validate(t) for t in spec["teachers"]]
    made: dict[str, Run] = {}
    control: ControlName
    for control in spec.get("controls", []):
        stage = control_config(control, configs, stage2)
        kind = RunKind.STAGE1 if isinstance(stage, Stage1Config) else RunKind.STAGE2
        reads = kind is RunKind.STAGE2 and uses_teachers(control)
        if kind is RunKind.STAGE2 and not reads:  # no teachers: nothing to weigh
            stage = stage.model_copy(update={"teacher_weights": None})
        made[control] = create_run(
            session,
            kind=kind,
            name=f"{name}/r{k}/control-{control}",
            config={**common, "stage": stage.model_dump(mode="json"), "eval": spec["eval"]},
            batch_run_id=batch.id,
            teacher_ids=[t.id for t in teachers] if reads else [],
            **shared,
        )
    return made


def runs_per_pipeline(rounds: int, teachers: int, controls: int = 0) -> int:
    """What a pipeline adds to its owner's queued runs (the quota counts them all at once):
    per round the sample run, the teachers, the student and the controls."""
    return rounds * (teachers + 2 + controls)
