"""One error shape for every failure: {"error": {"code", "message", "field"}}, never a trace."""

from __future__ import annotations

import logging
from collections.abc import Mapping

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from psycopg.errors import QueryCanceled
from sqlalchemy.exc import DataError, DBAPIError, InterfaceError, OperationalError
from sqlalchemy.exc import TimeoutError as PoolTimeoutError
from starlette.exceptions import HTTPException as StarletteHTTPException

from server.queue import BrokerUnavailableError
from server.services import (
    ConflictError,
    IllegalTransitionError,
    InvalidInputError,
    NotFoundError,
    QuotaExceededError,
    ServiceError,
)
from server.services.idempotency import IdempotencyConflictError

log = logging.getLogger("erpd.api")


class ApiError(Exception):
    def __init__(self, status: int, code: str, message: str, field: str | None = None) -> None:
        super().__init__(message)
        self.status, self.code, self.message, self.field = status, code, message, field


RETRY_AFTER_S = 5  # what a 503 tells a client to wait before it tries again


def error_response(
    status: int,
    code: str,
    message: str,
    field: str | None = None,
    headers: Mapping[str, str] | None = None,
) -> JSONResponse:
    body = {"error": {"code": code, "message": message, "field": field}}
    headers = dict(headers or {})
    if status == 401:  # RFC 9110: a 401 names the scheme it wants
        headers.setdefault("WWW-Authenticate", "Bearer")
    if status == 503:
        headers.setdefault("Retry-After", str(RETRY_AFTER_S))
    return JSONResponse(body, status_code=status, headers=headers)


def unavailable(message: str) -> JSONResponse:
    return error_response(503, "unavailable", message)


def _database_error(exc: DBAPIError) -> JSONResponse | None:
    """503 for a database that is away or too slow; None for anything else (a bug: 500)."""
    slow = ("statement timeout", "database is locked")
    if isinstance(exc.orig, QueryCanceled) or any(m in str(exc.orig) for m in slow):
        return unavailable("the database did not answer in time; retry later")
    if isinstance(exc, OperationalError | InterfaceError) or exc.connection_invalidated:
        log.warning("database unavailable: %s", exc.orig)
        return unavailable("the database is unreachable; retry later")
    return None


def _field(loc: tuple[int | str, ...], *, tagged: bool) -> str:
    # ("body", "config", "stage", "lr") -> "config.stage.lr". POST /runs validates a union
    # tagged by `kind`, whose tag leads the loc and is dropped; elsewhere "sample" or "stage2" is
    # a real field (a pipeline's) and stays.
    parts = [str(p) for p in loc if p not in ("body", "query", "path", "header")]
    if tagged and parts[:1] in (["sample"], ["stage1"], ["stage2"]):
        parts = parts[1:]
    return ".".join(parts) or "body"


def install(app: FastAPI) -> None:
    @app.exception_handler(ApiError)
    async def _api(_: Request, exc: ApiError) -> JSONResponse:
        return error_response(exc.status, exc.code, exc.message, exc.field)

    @app.exception_handler(RequestValidationError)
    async def _validation(request: Request, exc: RequestValidationError) -> JSONResponse:
        first = exc.errors()[0]
        tagged = request.method == "POST" and request.url.path.rstrip("/").endswith("/runs")
        field = _field(tuple(first.get("loc", ())), tagged=tagged)
        if first.get("type") == "json_invalid":  # its loc is a character offset, not a field
            field = "body"
        if first.get("type") in ("union_tag_invalid", "union_tag_not_found"):
            tag = str(first.get("ctx", {}).get("discriminator", "kind")).strip("'")
            field = tag if field == "body" else f"{field}.{tag}"
        return error_response(422, "invalid", f"{field}: {first.get('msg')}", field)

    @app.exception_handler(StarletteHTTPException)
    async def _http(_: Request, exc: StarletteHTTPException) -> JSONResponse:
        codes = {404: "not_found", 405: "method_not_allowed", 413: "too_large"}
        code = codes.get(exc.status_code, "http_error")
        # the router's 405 carries the `Allow` header RFC 9110 asks for: keep it
        return error_response(exc.status_code, code, str(exc.detail), headers=exc.headers)

    @app.exception_handler(ServiceError)
    async def _service(_: Request, exc: ServiceError) -> JSONResponse:
        if isinstance(exc, NotFoundError):
            return error_response(404, "not_found", str(exc))
        if isinstance(exc, IllegalTransitionError):
            return error_response(409, "conflict", str(exc))
        if isinstance(exc, ConflictError):
            return error_response(409, "conflict", str(exc), exc.field)
        if isinstance(exc, InvalidInputError):
            return error_response(422, "invalid", str(exc), exc.field)
        if isinstance(exc, QuotaExceededError):
            return error_response(429, "too_many_runs", str(exc))
        if isinstance(exc, IdempotencyConflictError):
            return error_response(422, "idempotency_conflict", str(exc), exc.field)
        return error_response(400, "bad_request", str(exc))

    @app.exception_handler(BrokerUnavailableError)
    async def _broker(_: Request, exc: BrokerUnavailableError) -> JSONResponse:
        return unavailable("the job broker is unreachable; retry later")

    @app.exception_handler(PoolTimeoutError)
    async def _pool(_: Request, exc: PoolTimeoutError) -> JSONResponse:
        log.warning("no free database connection: %s", exc)
        return unavailable("the database is busy (no free connection); retry later")

    @app.exception_handler(DataError)
    async def _value(_: Request, exc: DataError) -> JSONResponse:
        # a value the database cannot store (e.g. a NUL character in text) is the caller's error
        return error_response(422, "invalid", "a value in the request cannot be stored")

    @app.exception_handler(DBAPIError)
    async def _dbapi(_: Request, exc: DBAPIError) -> JSONResponse:
        if (answer := _database_error(exc)) is not None:
            return answer
        log.exception("database error")
        return error_response(500, "internal", "internal error")

    @app.exception_handler(Exception)
    async def _bug(_: Request, exc: Exception) -> JSONResponse:
        log.exception("unhandled error")
        return error_response(500, "internal", "internal error")
