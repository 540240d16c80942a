"""Create-then-publish: runs are committed first, their messages published after the commit.

Shared by the two routes that create runs (POST /runs, POST /pipelines): the Idempotency-Key
header, the webhook allow-list, and who the audit trail names as the actor.
"""

from __future__ import annotations

import uuid
from collections.abc import Callable, Sequence
from typing import Annotated, Any

from fastapi import Header, Request
from fastapi.responses import JSONResponse
from pydantic import HttpUrl
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session

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


def publish_ready(state: AppState, run_ids: Sequence[uuid.UUID]) -> None:
    outbox.publish_ready(state.writes, state.broker, run_ids)


def publish_pending(state: AppState) -> int:
    return outbox.publish_pending(state.writes, state.reads, state.broker)


def create_and_publish(
    request: Request,
    state: AppState,
    key: ApiKey,
    *,
    body: Any,
    idempotency_key: str | None,
    create: Creator,
) -> JSONResponse:
    """Run `create` in one transaction (with the Idempotency-Key row, if any), then publish.

    The broker is checked first, so a request while it is down gets 503 and creates nothing.
    """
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
    state.broker.ping()
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
    publish_ready(state, run_ids)
    return JSONResponse(response, status_code=201)
