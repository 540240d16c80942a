"""`GET /runs/{id}/stream`: server-sent events of a run's new metric points and status changes.

Events: `status` ({"status", "attempt", "step", "total"}) on connect and on every change,
`metrics` ({"points": [{"name", "step", "value"}]}) for points written since the last event,
`end` once the run has finished and everything was sent. The server polls the store every
`ERPD_STREAM_POLL_S` (it must work on SQLite, which has no LISTEN/NOTIFY); each poll is two
indexed reads in a read-only session, so a slow client never holds a lock.
"""

from __future__ import annotations

import json
import logging
import uuid
from collections.abc import AsyncIterator
from typing import Annotated, Any

import anyio
from fastapi import APIRouter, Query, Request
from sqlalchemy.exc import OperationalError
from sse_starlette import EventSourceResponse, ServerSentEvent

from server.api.deps import KeyDep, ReadSession, StateDep
from server.db import FINISHED, Run
from server.services import get_run
from server.services.queries import live_run, points_from

router = APIRouter(tags=["metrics"])
log = logging.getLogger("erpd.api")
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
    get_run(session, run_id=run_id, owner_id=key.id)  # 404 before the stream opens
    session.close()
    last: dict[str, int] = {}  # the last step sent, per metric
    # where the next read starts: the newest step seen, read again, since a step's eval points
    # may land after its training points (never after a later step's points)
    cursor = since_step + 1

    def poll() -> tuple[dict[str, Any], list[dict[str, Any]]] | None:
        nonlocal cursor
        with state.reads() as s:
            run = live_run(s, run_id=run_id, key_id=key.id)
            if run is None:  # the key was revoked while streaming, or the run is gone: stop
                return None
            rows = points_from(s, run_id=run_id, step=cursor, limit=MAX_POINTS_PER_EVENT * 2)
            points: list[dict[str, Any]] = []
            for name, step, value in rows:
                if len(points) == MAX_POINTS_PER_EVENT:
                    break  # the rest is sent by the next poll: the cursor stops at this step
                cursor = step
                if step > last.get(name, since_step):
                    points.append({"name": name, "step": step, "value": value})
                    last[name] = step
            return _status(run), points

    async def events() -> AsyncIterator[ServerSentEvent]:
        sent_status: dict[str, Any] | None = None
        outage = 0
        while True:
            try:
                polled = await anyio.to_thread.run_sync(poll)
            except OperationalError as exc:
                # the store is away (a restart, a failover): keep the client's stream open (the
                # pings go on) and poll again, backing off; nothing is skipped meanwhile
                outage += 1
                if outage == 1:
                    log.warning("run %s stream: store unreachable (%s)", run_id, exc.orig)
                if await request.is_disconnected():
                    return
                await anyio.sleep(min(5.0, state.settings.stream_poll_s * 2 ** min(outage, 10)))
                continue
            outage = 0
            if polled is None:
                yield ServerSentEvent("{}", event="end")
                return
            status, points = polled
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
