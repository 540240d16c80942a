"""Typed dependencies: routes read as plain functions of a session, a key and the app state."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from typing import Annotated

from fastapi import Depends, Request
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer
from sqlalchemy import Engine
from sqlalchemy.orm import Session, sessionmaker

from server.api.errors import ApiError
from server.db import ApiKey
from server.queue import Broker
from server.services import authenticate
from server.settings import Settings


@dataclass
class AppState:
    settings: Settings
    engine: Engine
    writes: sessionmaker[Session]
    reads: sessionmaker[Session]
    broker: Broker


def get_state(request: Request) -> AppState:
    state: AppState = request.app.state.erpd
    return state


StateDep = Annotated[AppState, Depends(get_state)]


def read_session(state: StateDep) -> Iterator[Session]:
    """Reads only. Writes open their own transaction in the route (`with state.writes.begin()`),
    so the commit has happened before the response is built and before a message is published,
    whatever order FastAPI runs dependency teardown in."""
    with state.reads() as session:
        yield session


ReadSession = Annotated[Session, Depends(read_session)]

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
