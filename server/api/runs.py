"""Runs: submit one stage, list, read, follow the audit trail, cancel, retry, rename/tag,
delete.

The checks of a submission (quota, names, ownership of the inputs) are the service layer's
(server/services/submissions.py); each route here turns a request into one service call.
"""

from __future__ import annotations

import logging
import uuid
from datetime import datetime
from typing import Annotated, Any

from fastapi import APIRouter, BackgroundTasks, Body, Query, Request
from fastapi.responses import JSONResponse, Response
from sqlalchemy.orm import Session

from server.api.deps import KeyDep, ReadSession, StateDep
from server.api.strict import strict_json
from server.api.submit import (
    IdempotencyKey,
    actor,
    check_notify_url,
    create_and_publish,
    dispatch,
)
from server.api.views import event_out, run_json, run_out
from server.db import RunKind, RunStatus
from server.schemas import EventOut, RunCreate, RunOut, RunPage, RunPatch
from server.services import get_run, list_runs, run_events, storage, submissions
from server.services.runs import TAG

router = APIRouter(prefix="/runs", tags=["runs"])
log = logging.getLogger("erpd.api")

EXAMPLE = {
    "kind": "stage1",
    "model": "tiny",
    "dataset": "arithmetic",
    "config": {"stage": {"objective": "sapo", "epochs": 20}, "sample": {"num_prompts": 128}},
    "tags": ["sweep"],
}


@router.post(
    "",
    status_code=201,
    response_model=RunOut,
    summary="Submit one stage run",
    dependencies=[strict_json(RunCreate)],
)
def submit_run(
    request: Request,
    state: StateDep,
    key: KeyDep,
    body: Annotated[RunCreate, Body(openapi_examples={"stage1": {"value": EXAMPLE}})],
    idempotency_key: IdempotencyKey = None,
) -> JSONResponse:
    notify = check_notify_url(state.settings, body.notify_url)

    def create(session: Session) -> tuple[dict[str, Any], list[uuid.UUID]]:
        run = submissions.submit_run(
            session,
            owner_id=key.id,
            limit=state.settings.max_active_runs,
            kind=RunKind(body.kind),
            model=body.model,
            dataset=body.dataset,
            config=body.config.model_dump(mode="json"),
            name=body.name,
            teachers=list(getattr(body, "teachers", ())),
            batch_run=getattr(body, "batch_run", None),
            base_run=body.base_run,
            gpu=body.gpu,
            notify_url=notify,
            tags=body.tags,
            max_attempts=body.max_attempts,
            actor=actor(key),
        )
        return run_json(run), [run.id]

    payload = body.model_dump(mode="json")
    return create_and_publish(
        request, state, key, body=payload, idempotency_key=idempotency_key, create=create
    )


@router.get("", response_model=RunPage, summary="List your runs, newest first")
def list_(
    session: ReadSession,
    key: KeyDep,
    status: Annotated[list[RunStatus] | None, Query()] = None,
    kind: Annotated[list[RunKind] | None, Query()] = None,
    tag: Annotated[str | None, Query(pattern=TAG.pattern)] = None,
    pipeline: uuid.UUID | None = None,
    created_after: datetime | None = None,
    created_before: datetime | None = None,
    limit: Annotated[int, Query(ge=1, le=500)] = 50,
    cursor: Annotated[str | None, Query(max_length=512)] = None,
) -> RunPage:
    page = list_runs(
        session,
        status=status,
        kind=kind,
        tag=tag,
        owner_id=key.id,
        pipeline_id=pipeline,
        created_after=created_after,
        created_before=created_before,
        limit=limit,
        cursor=cursor,
    )
    return RunPage(items=[run_out(r) for r in page.items], next=page.next_cursor)


@router.get("/{run_id}", response_model=RunOut, summary="One run with its lineage")
def read(run_id: uuid.UUID, session: ReadSession, key: KeyDep) -> RunOut:
    return run_out(get_run(session, run_id=run_id, owner_id=key.id))


@router.get("/{run_id}/events", response_model=list[EventOut], summary="The audit trail")
def events(run_id: uuid.UUID, session: ReadSession, key: KeyDep) -> list[EventOut]:
    return [event_out(e) for e in run_events(session, run_id=run_id, owner_id=key.id)]


@router.post("/{run_id}/cancel", response_model=RunOut, summary="Cancel (409 if finished)")
def cancel(run_id: uuid.UUID, state: StateDep, key: KeyDep, background: BackgroundTasks) -> RunOut:
    with state.writes.begin() as session:
        run = submissions.cancel(session, run_id=run_id, owner_id=key.id, actor=actor(key))
        out = run_out(run)
    if run.status is RunStatus.CANCELLED:  # its webhook, and those of runs that waited on it
        background.add_task(dispatch, state)  # the outbox queues them after the response
    return out


@router.post("/{run_id}/retry", response_model=RunOut, summary="New attempt, same config")
def retry(run_id: uuid.UUID, state: StateDep, key: KeyDep, background: BackgroundTasks) -> RunOut:
    with state.writes.begin() as session:
        run = submissions.retry(
            session,
            run_id=run_id,
            owner_id=key.id,
            limit=state.settings.max_active_runs,
            actor=actor(key),
        )
        out = run_out(run)
    background.add_task(dispatch, state)  # the outbox publishes it after the response
    return out


@router.delete(
    "/{run_id}",
    status_code=204,
    summary="Delete a run with its metrics, events, checkpoints and files",
)
def delete(run_id: uuid.UUID, state: StateDep, key: KeyDep) -> Response:
    """409 while it runs (cancel it first) or while another run reads it as its teacher, batch
    or base (the message names them: delete those first)."""
    storage.delete_with_files(
        state.writes,
        state.settings.artifacts,
        lambda session: storage.delete_runs(session, run_ids=[run_id], owner_id=key.id),
    )
    return Response(status_code=204)


@router.patch(
    "/{run_id}",
    response_model=RunOut,
    summary="Rename or re-tag a run",
    dependencies=[strict_json(RunPatch)],
)
def patch(run_id: uuid.UUID, body: RunPatch, state: StateDep, key: KeyDep) -> RunOut:
    with state.writes.begin() as session:
        run = submissions.rename(
            session, run_id=run_id, owner_id=key.id, name=body.name, tags=body.tags
        )
        return run_out(run)
