"""ORM rows -> response models (one place, so every route shows a run the same way)."""

from __future__ import annotations

from typing import Any

from server.db import Run, RunEvent
from server.schemas import EventOut, RunOut, TeacherOut


def run_out(run: Run) -> RunOut:
    return RunOut(
        id=run.id,
        name=run.name,
        kind=run.kind,
        status=run.status,
        pipeline=run.pipeline_id,
        round=run.round,
        attempt=run.attempt,
        max_attempts=run.max_attempts,
        model=run.model_id,
        dataset=run.dataset_id,
        batch_run=run.batch_run_id,
        base_run=run.base_run_id,
        base_sha256=run.base_sha256,
        gpu=run.gpu,
        teachers=[TeacherOut(run=t.teacher_id, sha256=t.sha256) for t in run.teachers],
        config=run.config,
        tags=run.tags,
        cancel_requested=run.cancel_requested,
        worker=run.worker,
        device=run.device,
        progress={"step": run.progress_step, "total": run.progress_total},
        created_at=run.created_at,
        started_at=run.started_at,
        finished_at=run.finished_at,
        heartbeat_at=run.heartbeat_at,
        summary=run.summary,
        final_accuracy=run.final_accuracy,
        kl_spent=run.kl_spent,
        entropy=run.entropy,
        error=run.error,
    )


def run_json(run: Run) -> dict[str, Any]:
    return run_out(run).model_dump(mode="json")


def event_out(event: RunEvent) -> EventOut:
    return EventOut(
        id=event.id,
        at=event.at,
        event=event.event,
        from_status=event.from_status,
        to_status=event.to_status,
        attempt=event.attempt,
        actor=event.actor,
        reason=event.reason,
    )
