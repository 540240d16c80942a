"""Runs: submit one stage, list, read, follow the audit trail, cancel, retry, rename/tag."""

from __future__ import annotations

import logging
import uuid
from datetime import datetime
from typing import Annotated, Any

from fastapi import APIRouter, Body, Header, Query, Request
from fastapi.responses import JSONResponse
from pydantic import HttpUrl
from sqlalchemy.orm import Session

from server.api.deps import KeyDep, ReadSession, StateDep
from server.api.errors import ApiError
from server.api.submit import check_quota, create_and_publish, publish_ready
from server.api.views import event_out, run_json, run_out
from server.db import ApiKey, Model, RunKind, RunStatus
from server.schemas import EventOut, RunCreate, RunOut, RunPage, RunPatch
from server.services import (
    InvalidInputError,
    NotFoundError,
    create_run,
    get_run,
    list_runs,
    outbox,
    request_cancel,
    retry_run,
    run_events,
)
from server.services.registry import find, find_dataset
from server.services.runs import TAG, set_name_and_tags
from server.settings import Settings

router = APIRouter(prefix="/runs", tags=["runs"])
log = logging.getLogger("erpd.api")
IdempotencyKey = Annotated[
    str | None,
    Header(alias="Idempotency-Key", max_length=200, description="Retry-safe submission."),
]

EXAMPLE = {
    "kind": "stage1",
    "model": "tiny",
    "dataset": "arithmetic",
    "config": {"stage": {"objective": "sapo", "epochs": 20}, "sample": {"num_prompts": 128}},
    "tags": ["sweep"],
}


def actor(key: ApiKey) -> str:
    return f"api:{key.prefix}"


def resolve(
    session: Session, key: ApiKey, *, model: str, dataset: str
) -> tuple[uuid.UUID, uuid.UUID]:
    found_model = find(session, Model, name=model)
    if found_model is None:
        raise ApiError(422, "invalid", f"model: {model!r} is not registered (GET /models)", "model")
    found = find_dataset(session, name=dataset, owner_id=key.id)
    if found is None:
        raise ApiError(
            422, "invalid", f"dataset: {dataset!r} is not registered (GET /datasets)", "dataset"
        )
    return found_model.id, found.id


def check_notify_url(settings: Settings, url: HttpUrl | None) -> str | None:
    if url is None:
        return None
    if url.host not in settings.webhook_hosts:
        raise ApiError(
            422, "invalid", f"notify_url: host {url.host!r} is not on the allow-list", "notify_url"
        )
    return str(url)


@router.post("", status_code=201, response_model=RunOut, summary="Submit one stage run")
def submit_run(
    request: Request,
    state: StateDep,
    key: KeyDep,
    body: Annotated[RunCreate, Body(openapi_examples={"stage1": {"value": EXAMPLE}})],
    idempotency_key: IdempotencyKey = None,
) -> JSONResponse:
    notify = check_notify_url(state.settings, body.notify_url)

    def create(session: Session) -> tuple[dict[str, Any], list[uuid.UUID]]:
        check_quota(session, state, key, adding=1)
        model_id, dataset_id = resolve(session, key, model=body.model, dataset=body.dataset)
        teachers = list(getattr(body, "teachers", ()))
        batch = getattr(body, "batch_run", None)
        # before any check that could describe another key's runs
        _owned_inputs(session, key, teachers, batch_run=batch, base_run=body.base_run)
        try:
            run = create_run(
                session,
                kind=RunKind(body.kind),
                model_id=model_id,
                dataset_id=dataset_id,
                config=body.config.model_dump(mode="json"),
                name=body.name,
                owner_id=key.id,
                teacher_ids=teachers,
                batch_run_id=batch,
                base_run_id=body.base_run,
                gpu=body.gpu,
                notify_url=notify,
                tags=body.tags,
                max_attempts=body.max_attempts,
                actor=actor(key),
            )
        except InvalidInputError as exc:
            field = _api_field(exc.field)
            message = f"{field}: {str(exc).removeprefix(f'{exc.field}: ')}"
            raise ApiError(422, "invalid", message, field) from exc
        return run_json(run), [run.id]

    payload = body.model_dump(mode="json")
    return create_and_publish(
        request, state, key, body=payload, idempotency_key=idempotency_key, create=create
    )


def _owned_inputs(
    session: Session,
    key: ApiKey,
    teachers: list[uuid.UUID],
    **runs: uuid.UUID | None,
) -> None:
    """Teacher, batch and base runs must be the caller's own (another key's run is not found)."""
    named = [(f"teachers.{i}", t) for i, t in enumerate(teachers)]
    named += [(field, run) for field, run in runs.items() if run is not None]
    for field, run_id in named:
        try:
            get_run(session, run_id=run_id, owner_id=key.id)
        except NotFoundError as exc:
            raise ApiError(422, "invalid", f"{field}: run {run_id} not found", field) from exc


# the service layer names ids, the API names the runs: report the field the client sent
_FIELDS = {"teacher_ids": "teachers", "batch_run_id": "batch_run", "base_run_id": "base_run"}


def _api_field(field: str) -> str:
    head, dot, rest = field.partition(".")
    return _FIELDS.get(head, head) + dot + rest


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
    get_run(session, run_id=run_id, owner_id=key.id)
    return [event_out(e) for e in run_events(session, run_id=run_id)]


@router.post("/{run_id}/cancel", response_model=RunOut, summary="Cancel (409 if finished)")
def cancel(run_id: uuid.UUID, state: StateDep, key: KeyDep) -> RunOut:
    with state.writes.begin() as session:
        get_run(session, run_id=run_id, owner_id=key.id)
        run = request_cancel(session, run_id=run_id, actor=actor(key))
        out = run_out(run)
    if run.status is RunStatus.CANCELLED:  # its webhook, and those of runs that waited on it
        try:
            outbox.publish_notifications(state.writes, state.reads, state.broker)
        except Exception:  # the cancel is committed; the reaper's reconcile sends them later
            log.warning("run %s: webhooks not queued now; the reaper will", run.id)
    return out


@router.post("/{run_id}/retry", response_model=RunOut, summary="New attempt, same config")
def retry(run_id: uuid.UUID, state: StateDep, key: KeyDep) -> RunOut:
    state.broker.ping()
    with state.writes.begin() as session:
        get_run(session, run_id=run_id, owner_id=key.id)
        check_quota(session, state, key, adding=1)
        out = run_out(retry_run(session, run_id=run_id, actor=actor(key)))
    publish_ready(state, [run_id])
    return out


@router.patch("/{run_id}", response_model=RunOut, summary="Rename or re-tag a run")
def patch(run_id: uuid.UUID, body: RunPatch, state: StateDep, key: KeyDep) -> RunOut:
    with state.writes.begin() as session:
        run = get_run(session, run_id=run_id, owner_id=key.id)
        set_name_and_tags(session, run=run, name=body.name, tags=body.tags)
        return run_out(run)
