"""`GET /runs/{id}/stream`: server-sent events of a run's new metric points and status changes.

Events: `status` ({"status", "attempt", "step", "total"}) on connect and on every change,
`metrics` ({"points": [{"name", "step", "value"}]}) for points written since the last event,
`end` once the run has finished and everything was sent. The server polls the store every
`ERPD_STREAM_POLL_S` (it must work on SQLite, which has no LISTEN/NOTIFY); each poll is two
indexed reads in a read-only session, so a slow client never holds a lock.

Every event carries an `id:`, the stream's position: `<step>` when every point before that step
was sent, `<step>:<name>,<name>` when the points of those names at that step were sent too (a
step's eval points may land after its training points, never after a later step's). A client
that reconnects with `Last-Event-ID` (browsers' EventSource do it by themselves) continues from
that position: no point is sent twice and none is skipped.
"""

from __future__ import annotations

import json
import logging
import re
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Annotated, Any

import anyio
from fastapi import APIRouter, Header, Query, Request
from sqlalchemy.exc import OperationalError
from sse_starlette import EventSourceResponse, ServerSentEvent

from server.api.deps import KeyDep, ReadSession, StateDep
from server.api.errors import ApiError
from server.db import FINISHED, Run
from server.services import get_run
from server.services.queries import live_run, points_from

router = APIRouter(tags=["metrics"])
log = logging.getLogger("erpd.api")
MAX_POINTS_PER_EVENT = 5_000
_POSITION = re.compile(r"^(-?\d{1,19})(?::([A-Za-z0-9_./@-]{1,64}(?:,[A-Za-z0-9_./@-]{1,64})*))?$")


@dataclass
class Position:
    """Where a stream stands: every point before `step` was sent, and at `step` those of
    `names`. Its text is the events' `id:` and what `Last-Event-ID` sends back."""

    step: int
    names: set[str] = field(default_factory=set)

    def __str__(self) -> str:
        return f"{self.step}:{','.join(sorted(self.names))}" if self.names else str(self.step)

    @classmethod
    def parse(cls, text: str) -> Position:
        match = _POSITION.match(text.strip())
        if match is None or int(match[1]) < 0:
            raise ApiError(
                422,
                "invalid",
                "Last-Event-ID: not an id this stream sent (`<step>` or `<step>:<names>`)",
                "Last-Event-ID",
            )
        return cls(int(match[1]), set(match[2].split(",")) if match[2] else set())

    def take(self, name: str, step: int) -> bool:
        """Whether the point (name, step) is new to the client; if so, the position moves past
        it. Points come in (step, name) order, from `step` on."""
        if step < self.step or (step == self.step and name in self.names):
            return False
        if step > self.step:
            self.step, self.names = step, set()
        self.names.add(name)
        return True


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
    last_event_id: Annotated[
        str | None,
        Header(
            alias="Last-Event-ID",
            max_length=4096,
            description="Resume after this event (its `id:`); overrides since_step.",
        ),
    ] = None,
) -> EventSourceResponse:
    position = Position(since_step + 1)
    if last_event_id is not None and last_event_id.strip():
        position = Position.parse(last_event_id)
    get_run(session, run_id=run_id, owner_id=key.id)  # 404 before the stream opens
    session.close()

    def poll() -> tuple[dict[str, Any], str, list[dict[str, Any]]] | None:
        """The run's status, the position before this poll's points, and the points."""
        with state.reads() as s:
            run = live_run(s, run_id=run_id, key_id=key.id)
            if run is None:  # the key was revoked while streaming, or the run is gone: stop
                return None
            # from the position's step, read again: a step's eval points may land after its
            # training points (never after a later step's points)
            rows = points_from(s, run_id=run_id, step=position.step, limit=MAX_POINTS_PER_EVENT * 2)
            before = str(position)
            points: list[dict[str, Any]] = []
            for name, step, value in rows:
                if len(points) == MAX_POINTS_PER_EVENT:
                    break  # the rest is sent by the next poll, from the position reached
                if position.take(name, step):
                    points.append({"name": name, "step": step, "value": value})
            return _status(run), before, points

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
                yield ServerSentEvent("{}", event="end", id=str(position))
                return
            status, before, points = polled
            if status != sent_status:  # its id: the points after it are still to come
                yield ServerSentEvent(json.dumps(status), event="status", id=before)
                sent_status = status
            if points:
                body = json.dumps({"points": points})
                yield ServerSentEvent(body, event="metrics", id=str(position))
                continue  # more may be waiting: poll again at once
            if status["status"] in {s.value for s in FINISHED}:
                yield ServerSentEvent("{}", event="end", id=str(position))
                return
            if await request.is_disconnected():
                return
            await anyio.sleep(state.settings.stream_poll_s)

    return EventSourceResponse(events(), ping=15)
