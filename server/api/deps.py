"""Typed dependencies: routes read as plain functions of a session, a key and the app state."""

from __future__ import annotations

import logging
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Annotated

import anyio
from fastapi import Depends, Request
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer
from sqlalchemy import Engine
from sqlalchemy.exc import DBAPIError
from sqlalchemy.orm import Session, sessionmaker

from server.api.errors import ApiError
from server.db import ApiKey
from server.queue import Broker
from server.services import authenticate
from server.services.outbox import Dispatcher
from server.settings import Settings

log = logging.getLogger("erpd.api")


@dataclass
class AppState:
    settings: Settings
    engine: Engine
    writes: sessionmaker[Session]
    reads: sessionmaker[Session]
    broker: Broker
    dispatcher: Dispatcher
    metric_reads: anyio.CapacityLimiter  # metric series reads served at once
    probes: anyio.CapacityLimiter  # /readyz's check threads


async def get_state(request: Request) -> AppState:
    """A coroutine (it never blocks): a sync dependency would need a request thread, and
    /readyz must answer when every one of them waits on a dependency."""
    state: AppState = request.app.state.erpd
    return state


StateDep = Annotated[AppState, Depends(get_state)]


def read_session(state: StateDep) -> Iterator[Session]:
    """Reads only. Writes open their own transaction in the route (`with state.writes.begin()`),
    so the commit has happened before the response is built and before a message is published.

    The session closes when the route returns, before the response starts (`scope="function"`
    below): closed after it, as FastAPI does by default, a database that went away in between
    raised after the status line was sent, and the client got a cut-off response. Closing only
    ends a read-only transaction, so a failure to close loses nothing: the answer stands (the
    pool drops the broken connection)."""
    session = state.reads()
    try:
        yield session
    finally:
        try:
            session.close()
        except DBAPIError as exc:
            log.warning("closing a read session failed: %s", exc.orig)


ReadSession = Annotated[Session, Depends(read_session, scope="function")]

_bearer = HTTPBearer(auto_error=False, description="An API key from `erpd-hub create-key`.")


def current_key(
    state: StateDep,
    credentials: Annotated[HTTPAuthorizationCredentials | None, Depends(_bearer)],
) -> ApiKey:
    if credentials is None:
        raise ApiError(401, "unauthorized", "missing API key: send `Authorization: Bearer <key>`")
    with state.reads() as session:
        key = authenticate(session, secret=credentials.credentials)
    if key is None:
        raise ApiError(401, "unauthorized", "unknown or revoked API key")
    return key


KeyDep = Annotated[ApiKey, Depends(current_key)]
