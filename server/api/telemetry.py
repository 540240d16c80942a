"""`GET /metrics`: Prometheus text for the API itself (requests, latencies, queue depth, runs by
status). Each app has its own registry, so several apps in one process never collide."""

from __future__ import annotations

import time
from collections.abc import Iterator

from fastapi import APIRouter, FastAPI, Request, Response
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Histogram
from prometheus_client.core import GaugeMetricFamily, Metric
from prometheus_client.exposition import generate_latest
from prometheus_client.registry import Collector
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from server.api.deps import AppState, KeyDep, StateDep
from server.api.errors import ApiError
from server.db import RunStatus
from server.services.queries import runs_by_status

router = APIRouter(tags=["health"])


class _StoreCollector(Collector):
    """Read at scrape time: runs by status from the store, messages waiting on the broker."""

    def __init__(self, state: AppState) -> None:
        self.state = state

    def collect(self) -> Iterator[Metric]:
        runs = GaugeMetricFamily("erpd_runs", "Runs by status.", labels=["status"])
        with self.state.reads() as session:
            counts = runs_by_status(session)
        for status in RunStatus:
            runs.add_metric([status.value], counts.get(status, 0))
        yield runs
        depth = self.state.broker.depth()
        if depth is not None:
            yield GaugeMetricFamily("erpd_queue_depth", "Messages waiting on the run queue.", depth)


def install(app: FastAPI) -> CollectorRegistry:
    registry = CollectorRegistry()
    requests = Counter(
        "erpd_http_requests", "HTTP requests.", ["method", "route", "status"], registry=registry
    )
    latency = Histogram(
        "erpd_http_request_seconds", "HTTP request latency.", ["method", "route"], registry=registry
    )

    app.add_middleware(_Measure, requests=requests, latency=latency)
    app.state.prometheus = registry
    return registry


class _Measure:
    """Pure ASGI (not BaseHTTPMiddleware, which runs the app in a task group and would wrap a
    body-limit error raised while reading the request into an ExceptionGroup)."""

    def __init__(self, app: ASGIApp, *, requests: Counter, latency: Histogram) -> None:
        self.app, self.requests, self.latency = app, requests, latency

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        started, status = time.perf_counter(), 500

        async def sending(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, sending)
        finally:
            # the route's template (/runs/{run_id}), never the raw path: bounded label values
            route = str(getattr(scope.get("route"), "path", "unmatched"))
            self.latency.labels(scope["method"], route).observe(time.perf_counter() - started)
            self.requests.labels(scope["method"], route, str(status)).inc()


def watch_store(app: FastAPI, state: AppState) -> None:
    """Called once the app's state exists (lifespan start)."""
    app.state.prometheus.register(_StoreCollector(state))


@router.get("/metrics", summary="Prometheus metrics of the API", response_class=Response)
def metrics(request: Request, state: StateDep, key: KeyDep) -> Response:
    # counts across every user's runs: operators only (ERPD_OPERATOR_KEYS); others see nothing
    if key.name not in state.settings.operator_keys:
        raise ApiError(404, "not_found", "no such endpoint for this key")
    registry: CollectorRegistry = request.app.state.prometheus
    return Response(generate_latest(registry), media_type=CONTENT_TYPE_LATEST)
