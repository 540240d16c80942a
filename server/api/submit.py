"""Create-then-publish: runs are committed first, their messages published after the response.

A route's transaction writes the runs (each queued run with no `enqueued_at` is its own outbox
row); the process's outbox dispatcher (server/services/outbox.py) publishes them once the
response is on its way, so a slow or frozen broker never delays or fails a submission: the run
waits, queued, until the broker takes its message.

Shared by the routes that create or requeue runs (POST /runs, POST /pipelines, retry): the
Idempotency-Key header, the webhook allow-list, and who the audit trail names as the actor.
"""

from __future__ import annotations

import uuid
from collections.abc import Callable, Sequence
from typing import Annotated, Any

import anyio
from fastapi import Header, Request
from fastapi.responses import JSONResponse
from pydantic import HttpUrl
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session
from starlette.background import BackgroundTask

from server.api.deps import AppState
from server.api.errors import ApiError
from server.db import ApiKey
from server.services import idempotency, outbox
from server.settings import Settings

Creator = Callable[[Session], tuple[dict[str, Any], Sequence[uuid.UUID]]]
IdempotencyKey = Annotated[
    str | None,
    Header(alias="Idempotency-Key", max_length=200, description="Retry-safe submission."),
]


def actor(key: ApiKey) -> str:
    return f"api:{key.prefix}"


def check_notify_url(settings: Settings, url: HttpUrl | None) -> str | None:
    if url is None:
        return None
    if url.host not in settings.webhook_hosts:
        raise ApiError(
            422, "invalid", f"notify_url: host {url.host!r} is not on the allow-list", "notify_url"
        )
    return str(url)


def publish_pending(state: AppState) -> int:
    """One round of the outbox: every queued, ready run without its message, then webhooks."""
    return outbox.publish_pending(state.writes, state.reads, state.broker)


def publish_wait_s(settings: Settings) -> float:
    """The longest a round of the outbox takes when the broker is away: a failed connect and
    a failed read, plus the database's share."""
    return 2 * settings.broker_timeout_s + 1


async def dispatch(state: AppState) -> None:
    """After the response (a background task): have the outbox publish now, and wait for that
    round, at most `publish_wait_s`, without holding a thread. The wait keeps the request's task
    alive until its message is out (a test client sees it on the queue when the call returns;
    a server shutting down lets it finish)."""
    done = state.dispatcher.kick()
    with anyio.move_on_after(publish_wait_s(state.settings)):
        await done.wait()


def dispatched(state: AppState) -> BackgroundTask:
    return BackgroundTask(dispatch, state)


def create_and_publish(
    request: Request,
    state: AppState,
    key: ApiKey,
    *,
    body: Any,
    idempotency_key: str | None,
    create: Creator,
) -> JSONResponse:
    """Run `create` in one transaction (with the Idempotency-Key row, if any); the outbox
    publishes after the response. The broker is never waited on: while it is away the run is
    accepted (201) and stays queued until the outbox can publish it."""
    digest = idempotency.body_hash(request.url.path, body)

    def replayed() -> JSONResponse | None:
        """The earlier answer to this Idempotency-Key, if a request with it committed."""
        if idempotency_key is None:
            return None
        with state.reads() as session:
            earlier = idempotency.replay(
                session, owner_id=key.id, key=idempotency_key, request_sha256=digest
            )
        if earlier is None:
            return None
        status, response = earlier
        return JSONResponse(response, status_code=status, headers={"Idempotent-Replayed": "true"})

    if (earlier := replayed()) is not None:
        return earlier
    try:
        with state.writes.begin() as session:
            response, run_ids = create(session)
            if idempotency_key is not None:
                idempotency.remember(
                    session,
                    owner_id=key.id,
                    key=idempotency_key,
                    request_sha256=digest,
                    status_code=201,
                    response=response,
                )
    except IntegrityError:
        # a concurrent request with the same key committed first: answer as it did
        if (earlier := replayed()) is None:
            raise
        return earlier
    return JSONResponse(
        response, status_code=201, background=dispatched(state) if run_ids else None
    )
