"""Liveness and readiness (no key needed: load balancers and compose health checks call them)."""

from __future__ import annotations

from fastapi import APIRouter
from fastapi.responses import JSONResponse

from server.api.deps import StateDep
from server.db import ping
from server.queue import BrokerUnavailableError

router = APIRouter(tags=["health"])


@router.get("/healthz", summary="The process is up")
def healthz() -> dict[str, str]:
    return {"status": "ok"}


@router.get("/readyz", summary="The database and the broker are reachable")
def readyz(state: StateDep) -> JSONResponse:
    checks: dict[str, str] = {}
    try:
        ping(state.engine)
        checks["database"] = "ok"
    except Exception as exc:  # any failure to reach it means "not ready"
        checks["database"] = f"unreachable: {type(exc).__name__}"
    try:
        state.broker.ping()
        checks["broker"] = "ok"
    except BrokerUnavailableError:
        checks["broker"] = "unreachable"
    ready = all(v == "ok" for v in checks.values())
    return JSONResponse({"ready": ready, "checks": checks}, status_code=200 if ready else 503)
