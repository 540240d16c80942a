"""The FastAPI app factory. Routes are thin (server/api/), logic lives in server/services/, and
this process never imports torch: messages go to the workers by task name."""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

import anyio
from fastapi import APIRouter, FastAPI
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from server.api import (
    checkpoints,
    datasets,
    docs,
    health,
    metrics,
    pipelines,
    registry,
    runs,
    stream,
    telemetry,
)
from server.api.deps import AppState
from server.api.errors import error_response, install
from server.api.submit import publish_pending, publish_wait_s
from server.db import make_engine, read_session_factory, session_factory
from server.db.session import Timeouts
from server.queue import Broker
from server.schemas import ErrorOut
from server.services import ensure_builtins
from server.services.outbox import Dispatcher
from server.settings import Settings, get_settings

log = logging.getLogger("erpd.api")
PREFIX = "/api/v1"
# every route may answer these, always as {"error": {"code", "message", "field"}}
ERROR_RESPONSES: dict[int | str, dict[str, object]] = {
    status: {"model": ErrorOut, "description": meaning}
    for status, meaning in {
        401: "Missing, unknown or revoked API key",
        404: "Not found (or another key's)",
        409: "Illegal state transition",
        413: "Body too large",
        422: "Invalid input; `field` names it",
        429: "Too many active runs for this key",
        503: "Database or broker unreachable or too slow; `Retry-After` says when to retry",
    }.items()
}


class BodyLimit:
    """413 for a request body over the limit, counted as it streams in (Content-Length can be
    absent or lie). Uploads have their own, larger limit."""

    def __init__(self, app: ASGIApp, *, limit: int, upload_limit: int) -> None:
        self.app, self.limit, self.upload_limit = app, limit, upload_limit

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        limit = self.upload_limit if scope["path"].endswith("/datasets") else self.limit
        declared = dict(scope["headers"]).get(b"content-length")
        if declared is not None and declared.isdigit() and int(declared) > limit:
            await error_response(413, "too_large", f"request body over {limit} bytes")(
                scope, receive, send
            )
            return
        seen = 0

        async def counted() -> Message:
            nonlocal seen
            message = await receive()
            if message["type"] == "http.request":
                seen += len(message.get("body", b""))
                if seen > limit:
                    raise _TooLargeError(limit)
            return message

        await self.app(scope, counted, send)


class _TooLargeError(StarletteHTTPException):
    """An HTTPException, so that FastAPI's body parser re-raises it as it is (it turns any other
    error while reading the body into a 400)."""

    def __init__(self, limit: int) -> None:
        super().__init__(413, f"request body over {limit} bytes")


def _open_state(settings: Settings) -> AppState:
    """The API's store and broker, each wait on them bounded by the settings."""
    timeouts = Timeouts(
        statement=settings.db_statement_timeout_s,
        connect=settings.db_connect_timeout_s,
        pool=settings.db_pool_timeout_s,
    )
    engine = make_engine(settings.db_url, timeouts)
    writes = session_factory(engine)
    with writes.begin() as session:
        ensure_builtins(session)
    broker = Broker(
        settings.broker,
        settings.queue,
        settings.housekeeping_queue,
        timeout=settings.broker_timeout_s,
    )
    state = AppState(
        settings,
        engine,
        writes,
        read_session_factory(engine),
        broker,
        # reads the state's attributes at each round (a test may swap the store under it)
        Dispatcher(lambda: publish_pending(state), interval_s=settings.outbox_interval_s),
        anyio.CapacityLimiter(settings.metric_read_slots),
        anyio.CapacityLimiter(8),
    )
    return state


def create_app(settings: Settings | None = None) -> FastAPI:
    settings = settings or get_settings()

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        state = _open_state(settings)
        app.state.erpd = state
        telemetry.watch_store(app, state)
        async with anyio.create_task_group() as tasks:
            tasks.start_soon(state.dispatcher.run)
            # runs committed while the broker was away get their message now (a bounded wait)
            with anyio.move_on_after(publish_wait_s(settings)):
                await state.dispatcher.kick().wait()
            yield
            state.dispatcher.stop()  # let a round in progress end, within its bound
            tasks.cancel_scope.deadline = anyio.current_time() + publish_wait_s(settings)
        state.broker.close()
        state.engine.dispose()

    app = FastAPI(
        title="erpd-hub",
        version="0.1.0",
        summary="Extreme Region Policy Distillation as a service",
        description="Submit ERPD stage runs and pipelines, follow them, download checkpoints. "
        "Every endpoint but /healthz and /readyz needs `Authorization: Bearer <API key>` "
        '(`erpd-hub create-key NAME`). Errors are `{"error": {"code", "message", "field"}}`.',
        lifespan=lifespan,
        openapi_url=None,  # served below, behind a key unless ERPD_PUBLIC_DOCS
        docs_url=None,
        redoc_url=None,
    )
    install(app)
    telemetry.install(app)
    api = APIRouter(prefix=PREFIX, responses=ERROR_RESPONSES)
    for module in (
        health,
        telemetry,
        runs,
        pipelines,
        metrics,
        stream,
        checkpoints,
        registry,
        datasets,
    ):
        api.include_router(module.router)
    app.include_router(api)
    docs.install(app, prefix=PREFIX, public=settings.public_docs)
    app.add_middleware(
        BodyLimit, limit=settings.max_body_bytes, upload_limit=settings.max_upload_bytes
    )
    return app
