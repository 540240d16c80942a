"""Pipelines: a whole ERPD round (sample -> teachers -> student) in one request; deleting one
deletes its runs."""

from __future__ import annotations

import uuid
from typing import Annotated, Any

from fastapi import APIRouter, Body, Request
from fastapi.responses import JSONResponse, Response
from sqlalchemy.orm import Session

from server.api.deps import KeyDep, StateDep
from server.api.strict import strict_json
from server.api.submit import IdempotencyKey, actor, check_notify_url, create_and_publish
from server.schemas import PipelineCreate, PipelineOut
from server.services import storage, submissions

router = APIRouter(prefix="/pipelines", tags=["pipelines"])

EXAMPLE = {
    "model": "tiny",
    "dataset": "arithmetic",
    "sample": {"num_prompts": 128, "group_size": 8},
    "teachers": [{"objective": "sapo", "epochs": 20}, {"objective": "ce", "epochs": 20}],
    "stage2": {"signal": "logratio", "region": "top_frac", "top_frac": 0.2},
    "rounds": 1,
}


@router.post(
    "",
    status_code=201,
    response_model=PipelineOut,
    summary="Submit an ERPD pipeline",
    dependencies=[strict_json(PipelineCreate)],
)
def submit_pipeline(
    request: Request,
    state: StateDep,
    key: KeyDep,
    body: Annotated[PipelineCreate, Body(openapi_examples={"two teachers": {"value": EXAMPLE}})],
    idempotency_key: IdempotencyKey = None,
) -> JSONResponse:
    notify = check_notify_url(state.settings, body.notify_url)
    spec = body.model_dump(mode="json") | {"notify_url": notify}

    def create(session: Session) -> tuple[dict[str, Any], list[uuid.UUID]]:
        pipeline, runs = submissions.submit_pipeline(
            session,
            owner_id=key.id,
            limit=state.settings.max_active_runs,
            spec=spec,
            actor=actor(key),
        )
        out = PipelineOut(
            id=pipeline.id, name=pipeline.name, rounds=pipeline.rounds, runs=[r.id for r in runs]
        )
        return out.model_dump(mode="json"), [r.id for r in runs]

    return create_and_publish(
        request, state, key, body=spec, idempotency_key=idempotency_key, create=create
    )


@router.delete(
    "/{pipeline_id}",
    status_code=204,
    summary="Delete a pipeline with all its runs and their files",
)
def delete(pipeline_id: uuid.UUID, state: StateDep, key: KeyDep) -> Response:
    """409 while one of its runs is running, or while a run outside it reads one of them."""
    storage.delete_with_files(
        state.writes,
        state.settings.artifacts,
        lambda session: storage.delete_pipeline(session, pipeline_id=pipeline_id, owner_id=key.id),
    )
    return Response(status_code=204)
