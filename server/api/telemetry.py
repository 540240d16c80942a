"""`GET /metrics`: Prometheus text for the API itself (requests, latencies, queue depth, runs by
status). Each app has its own registry, so several apps in one process never collide."""

from __future__ import annotations

import time
from collections.abc import Awaitable, Callable, Iterator

from fastapi import APIRouter, FastAPI, Request, Response
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Histogram
from prometheus_client.core import GaugeMetricFamily, Metric
from prometheus_client.exposition import generate_latest
from prometheus_client.registry import Collector
from sqlalchemy import func, select

from server.api.deps import AppState, KeyDep
from server.db import Run, RunStatus

router = APIRouter(tags=["health"])


class _StoreCollector(Collector):
    """Read at scrape time: runs by status from the store, messages waiting on the broker."""

    def __init__(self, state: AppState) -> None:
        self.state = state

    def collect(self) -> Iterator[Metric]:
        runs = GaugeMetricFamily("erpd_runs", "Runs by status.", labels=["status"])
        with self.state.reads() as session:
            counts = dict(
                session.execute(select(Run.status, func.count()).group_by(Run.status)).all()
            )
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

    @app.middleware("http")
    async def measure(
        request: Request, call_next: Callable[[Request], Awaitable[Response]]
    ) -> Response:
        started = time.perf_counter()
        response = await call_next(request)
        route = _route(request)
        latency.labels(request.method, route).observe(time.perf_counter() - started)
        requests.labels(request.method, route, str(response.status_code)).inc()
        return response

    app.state.prometheus = registry
    return registry


def watch_store(app: FastAPI, state: AppState) -> None:
    """Called once the app's state exists (lifespan start)."""
    app.state.prometheus.register(_StoreCollector(state))


def _route(request: Request) -> str:
    """The route's template (/api/v1/runs/{run_id}), never the raw path: bounded label values.
    The router records the matched route in the (shared) scope while handling the request."""
    route = request.scope.get("route")
    return str(getattr(route, "path", "unmatched"))


@router.get("/metrics", summary="Prometheus metrics of the API", response_class=Response)
def metrics(request: Request, key: KeyDep) -> Response:
    registry: CollectorRegistry = request.app.state.prometheus
    return Response(generate_latest(registry), media_type=CONTENT_TYPE_LATEST)
