"""An ERPD pipeline as runs: per round, one `sample` run (the fixed batch), one stage-1 run per
teacher on that batch, and one stage-2 run distilling them. Every round is created at once, so the
whole plan is visible (and counted against the quota) from the start; round k+1's runs name round
k's student as their base and wait until it succeeds and is pinned, or fail when it fails."""

from __future__ import annotations

import uuid
from typing import Any

from sqlalchemy.orm import Session

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
        runs += [batch, *teachers, base]
    return pipeline, runs


def runs_per_pipeline(rounds: int, teachers: int) -> int:
    """What a pipeline adds to its owner's queued runs (the quota counts them all at once)."""
    return rounds * (teachers + 2)
