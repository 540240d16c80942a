"""Liveness and readiness (no key needed: load balancers and compose health checks call them).

`/healthz` is a coroutine that touches nothing: it answers from the event loop even when every
request thread is stuck on a dependency. `/readyz` checks the database and the broker at once,
each in a thread of its own pool, and gives each `readyz_timeout_s`: it answers within that
bound whatever they do (a check still running then is left to end on its own timeouts).
"""

from __future__ import annotations

from collections.abc import Callable

import anyio
from fastapi import APIRouter
from fastapi.responses import JSONResponse

from server.api.deps import AppState, StateDep
from server.db import ping
from server.queue import BrokerUnavailableError

router = APIRouter(tags=["health"])


@router.get("/healthz", summary="The process is up")
async def healthz() -> dict[str, str]:
    return {"status": "ok"}


async def _check(
    state: AppState, probe: Callable[[], None], out: dict[str, str], name: str
) -> None:
    timeout = state.settings.readyz_timeout_s
    out[name] = f"timeout: no answer in {timeout:g} s"
    with anyio.move_on_after(timeout):
        try:
            # its own few threads (`probes`): never queued behind request threads, and a probe
            # storm during an outage cannot start more (those waiting time out like the rest)
            await anyio.to_thread.run_sync(probe, limiter=state.probes, abandon_on_cancel=True)
            out[name] = "ok"
        except BrokerUnavailableError:
            out[name] = "unreachable"
        except Exception as exc:  # any failure to reach it means "not ready"
            out[name] = f"unreachable: {type(exc).__name__}"


@router.get("/readyz", summary="The database and the broker are reachable")
async def readyz(state: StateDep) -> JSONResponse:
    checks: dict[str, str] = {}
    async with anyio.create_task_group() as tasks:
        tasks.start_soon(_check, state, lambda: ping(state.engine), checks, "database")
        tasks.start_soon(_check, state, state.broker.ping, checks, "broker")
    ready = all(v == "ok" for v in checks.values())
    checks = {name: checks[name] for name in ("database", "broker")}
    return JSONResponse({"ready": ready, "checks": checks}, status_code=200 if ready else 503)
