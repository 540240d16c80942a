"""`GET /runs/{id}/stream`: server-sent events of a run's new metric points and status changes.

Events: `status` ({"status", "attempt", "step", "total"}) on connect and on every change,
`metrics` ({"points": [{"name", "step", "value"}]}) for points written since the last event,
`end` once the run has finished and everything was sent. The server polls the store every
`ERPD_STREAM_POLL_S` (it must work on SQLite, which has no LISTEN/NOTIFY); each poll is two
indexed reads in a read-only session, so a slow client never holds a lock.
"""

from __future__ import annotations

import json
import uuid
from collections.abc import AsyncIterator
from typing import Annotated, Any

import anyio
from fastapi import APIRouter, Query, Request
from sqlalchemy import select
from sse_starlette import EventSourceResponse, ServerSentEvent

from server.api.deps import KeyDep, ReadSession, StateDep
from server.db import FINISHED, MetricPoint, Run

router = APIRouter(tags=["metrics"])
MAX_POINTS_PER_EVENT = 5_000


def _status(run: Run) -> dict[str, Any]:
    return {
        "status": run.status.value,
        "attempt": run.attempt,
        "step": run.progress_step,
        "total": run.progress_total,
    }


@router.get(
    "/runs/{run_id}/stream",
    summary="Live metric points and status changes (server-sent events)",
    response_class=EventSourceResponse,
)
async def stream(
    run_id: uuid.UUID,
    request: Request,
    state: StateDep,
    session: ReadSession,
    key: KeyDep,
    since_step: Annotated[int, Query(ge=-1, description="Send points after this step.")] = -1,
) -> EventSourceResponse:
    from server.services import get_run

    get_run(session, run_id=run_id, owner_id=key.id)  # 404 before the stream opens
    session.close()
    last: dict[str, int] = {}

    def poll() -> tuple[dict[str, Any], list[dict[str, Any]]]:
        with state.reads() as s:
            run = s.get(Run, run_id)
            assert run is not None
            rows = s.execute(
                select(MetricPoint.name, MetricPoint.step, MetricPoint.value)
                .where(
                    MetricPoint.run_id == run_id,
                    MetricPoint.step > min([since_step, *last.values()]),
                )
                .order_by(MetricPoint.step, MetricPoint.name)
                .limit(MAX_POINTS_PER_EVENT * 4)
            ).all()
            points = []
            for name, step, value in rows:
                if step > last.get(name, since_step):
                    points.append({"name": name, "step": step, "value": value})
                    last[name] = step
            return _status(run), points[:MAX_POINTS_PER_EVENT]

    async def events() -> AsyncIterator[ServerSentEvent]:
        sent_status: dict[str, Any] | None = None
        while True:
            status, points = await anyio.to_thread.run_sync(poll)
            if status != sent_status:
                yield ServerSentEvent(json.dumps(status), event="status")
                sent_status = status
            if points:
                yield ServerSentEvent(json.dumps({"points": points}), event="metrics")
                continue  # more may be waiting: poll again at once
            if status["status"] in {s.value for s in FINISHED}:
                yield ServerSentEvent("{}", event="end")
                return
            if await request.is_disconnected():
                return
            await anyio.sleep(state.settings.stream_poll_s)

    return EventSourceResponse(events(), ping=15)
