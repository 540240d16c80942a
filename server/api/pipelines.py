"""Pipelines: a whole ERPD round (sample -> teachers -> student, and the matched controls asked
for) in one request; read back with the student-vs-control table; deleting one deletes its
runs."""

from __future__ import annotations

import uuid
from typing import Annotated, Any

from fastapi import APIRouter, Body, Request
from fastapi.responses import JSONResponse, Response
from sqlalchemy.orm import Session

from server.api.deps import KeyDep, ReadSession, StateDep
from server.api.strict import strict_json
from server.api.submit import IdempotencyKey, actor, check_notify_url, create_and_publish
from server.api.views import run_out
from server.schemas import (
    ArmOut,
    ComparisonOut,
    PipelineCreate,
    PipelineDetail,
    PipelineOut,
    PipelineRunOut,
    RoundOut,
)
from server.services import storage, submissions
from server.services.pipeline_summary import PipelineSummary, RoundSummary, pipeline_summary

router = APIRouter(prefix="/pipelines", tags=["pipelines"])

EXAMPLE = {
    "model": "tiny",
    "dataset": "arithmetic",
    "sample": {"num_prompts": 128, "group_size": 8},
    "teachers": [{"objective": "sapo", "epochs": 20}, {"objective": "ce", "epochs": 20}],
    "stage2": {"signal": "logratio", "region": "top_frac", "top_frac": 0.2},
    "rounds": 1,
}
WITH_CONTROLS = EXAMPLE | {
    "teachers": [{"objective": "sapo", "epochs": 20}],
    "controls": ["advantage_region", "advantage_random", "placebo", "early_stop"],
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
    body: Annotated[
        PipelineCreate,
        Body(
            openapi_examples={
                "two teachers": {"value": EXAMPLE},
                "with matched controls": {"value": WITH_CONTROLS},
            }
        ),
    ],
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


def _round_out(r: RoundSummary) -> RoundOut:
    runs = [
        PipelineRunOut(**run_out(m.run).model_dump(), role=m.role, control=m.control)
        for m in r.runs
    ]
    table = r.table
    if table is None:
        return RoundOut(round=r.round, runs=runs, arms=[], comparisons=[])
    return RoundOut(
        round=r.round,
        runs=runs,
        arms=[ArmOut.model_validate(a, from_attributes=True) for a in table.arms],
        comparisons=[
            ComparisonOut.model_validate(c, from_attributes=True) for c in table.comparisons
        ],
    )


def _detail(summary: PipelineSummary) -> PipelineDetail:
    p = summary.pipeline
    return PipelineDetail(
        id=p.id,
        name=p.name,
        rounds=p.rounds,
        controls=summary.controls,
        created_at=p.created_at,
        by_round=[_round_out(r) for r in summary.rounds],
    )


@router.get(
    "/{pipeline_id}",
    response_model=PipelineDetail,
    summary="A pipeline: its runs by round and role, the student against each control",
)
def read(pipeline_id: uuid.UUID, session: ReadSession, key: KeyDep) -> PipelineDetail:
    """Per round, the student and each matched control read at one eval point (the final one;
    early_stop's first at or past the student's final KL), and student minus control on greedy
    and sampled accuracy with a 95% interval: diff ± 1.96·sqrt(se_student² + se_control²), the
    evaluation-sampling error of one seed. Both arms are scored on the same problems, so the
    interval is conservative; it does not include seed-to-seed variation. A run that has not
    succeeded shows its status with null numbers."""
    return _detail(pipeline_summary(session, pipeline_id=pipeline_id, owner_id=key.id))
