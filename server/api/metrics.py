"""Metric series (downsampled, incremental, paged by step), the metric catalogue, and run
comparison."""

from __future__ import annotations

import uuid
from collections.abc import Callable
from typing import Annotated, Any

import anyio
from fastapi import APIRouter, Query, Response
from sqlalchemy.orm import Session

from erpd import metrics as M
from server.api.deps import AppState, KeyDep, ReadSession, StateDep
from server.api.errors import ApiError
from server.schemas import CompareOut, CompareRow, MetricInfoOut, MetricsOut, SeriesOut
from server.services import get_run
from server.services.metrics import downsample, metric_page, series_names

router = APIRouter(tags=["metrics"])


@router.get("/metrics/catalogue", response_model=list[MetricInfoOut], summary="Metric meanings")
def catalogue(key: KeyDep) -> list[MetricInfoOut]:
    return [MetricInfoOut(**row) for row in M.catalogue_json()]


def _names(raw: list[str] | None) -> list[str] | None:
    if not raw:
        return None
    names = [n for item in raw for n in item.split(",") if n]
    for name in names:
        if name not in M.CATALOGUE:
            raise ApiError(422, "invalid", f"names: unknown metric {name!r}", "names")
    return names


# one response's bounds, whatever the run's length (docs/api.md, "Metrics and the stream")
MAX_POINTS = 100_000  # points in one response, all its series together
SCAN_POINTS = 100_000  # stored points one downsampled response reads, all series together


def _page(
    session: Session,
    *,
    run_id: uuid.UUID,
    names: list[str],
    since_step: int,
    end_step: int | None,
    max_points: int,
    thin: bool,
) -> MetricsOut:
    """One page: at most `max_points` points per series (fewer when many series share
    MAX_POINTS). Thinned, a page reads up to SCAN_POINTS stored points and keeps each bucket's
    extremes; raw, it reads only the points it returns. `next_since_step` continues it."""
    per_series = min(max_points, MAX_POINTS // max(1, len(names)))
    scan = max(per_series, SCAN_POINTS // max(1, len(names))) if thin else per_series
    page = metric_page(
        session,
        run_id=run_id,
        names=names,
        per_series=scan,
        since_step=since_step,
        end_step=end_step,
    )
    out, last = [], None
    for name, points in page.series.items():
        kept, thinned = downsample(points, per_series)
        if points.steps:
            last = max(last or -1, points.steps[-1])
        out.append(SeriesOut(name=name, steps=kept.steps, values=kept.values, downsampled=thinned))
    return MetricsOut(run=run_id, series=out, last_step=last, next_since_step=page.until)


async def bounded_read(state: AppState, read: Callable[[], bytes]) -> Response:
    """Run a heavy read in a worker thread, at most `metric_read_slots` at once per process:
    the others wait for a slot (503 after `db_statement_timeout_s`) instead of taking every
    request thread, so the rest of the API keeps answering. The JSON is built in the thread
    too, off the event loop."""
    wait = state.settings.db_statement_timeout_s
    try:
        with anyio.fail_after(wait):
            await state.metric_reads.acquire()
    except TimeoutError:
        raise ApiError(
            503, "unavailable", f"too many metric reads; none free in {wait:g} s"
        ) from None
    try:
        body = await anyio.to_thread.run_sync(read)
    finally:
        state.metric_reads.release()
    return Response(body, media_type="application/json")


@router.get("/runs/{run_id}/metrics", response_model=MetricsOut, summary="Metric series")
async def run_metrics(
    run_id: uuid.UUID,
    state: StateDep,
    key: KeyDep,
    names: Annotated[
        list[str] | None, Query(description="Comma-separated or repeated; default: all.")
    ] = None,
    since_step: Annotated[int, Query(ge=-1, description="Only steps after this one.")] = -1,
    end_step: Annotated[
        int | None, Query(ge=0, description="Only steps up to this one (inclusive).")
    ] = None,
    max_points: Annotated[
        int, Query(ge=10, le=MAX_POINTS, description="Points per series in this response.")
    ] = 2_000,
    downsample: Annotated[
        bool,
        Query(
            description="Thin long series to `max_points` (bucket extremes kept); false: exact "
            "points, `max_points` per page."
        ),
    ] = True,
) -> Response:
    wanted = _names(names)
    if end_step is not None and end_step <= since_step:
        raise ApiError(422, "invalid", "end_step: must be after since_step", "end_step")

    def read() -> bytes:
        with state.reads() as session:
            get_run(session, run_id=run_id, owner_id=key.id)
            page = _page(
                session,
                run_id=run_id,
                names=wanted or series_names(session, run_id=run_id),
                since_step=since_step,
                end_step=end_step,
                max_points=max_points,
                thin=downsample,
            )
        return page.model_dump_json().encode()

    return await bounded_read(state, read)


def _flatten(config: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    flat: dict[str, Any] = {}
    for key, value in config.items():
        path = f"{prefix}{key}"
        if isinstance(value, dict):
            flat.update(_flatten(value, path + "."))
        else:
            flat[path] = value
    return flat


@router.get("/compare", response_model=CompareOut, summary="Compare runs")
def compare(
    session: ReadSession,
    key: KeyDep,
    runs: Annotated[str, Query(description="2-20 comma-separated run ids.", max_length=800)],
) -> CompareOut:
    try:
        ids = [uuid.UUID(part) for part in runs.split(",") if part]
    except ValueError as exc:
        raise ApiError(422, "invalid", "runs: comma-separated run ids", "runs") from exc
    if not 2 <= len(ids) <= 20:
        raise ApiError(422, "invalid", "runs: between 2 and 20 run ids", "runs")
    found = [get_run(session, run_id=i, owner_id=key.id) for i in ids]
    flat = [_flatten(r.config) for r in found]
    keys = sorted(set().union(*flat))
    diff = {k: [f.get(k) for f in flat] for k in keys if len({repr(f.get(k)) for f in flat}) > 1}
    rows = [
        CompareRow(
            id=r.id,
            name=r.name,
            kind=r.kind,
            status=r.status,
            final_accuracy=r.final_accuracy,
            kl_spent=r.kl_spent,
            entropy=r.entropy,
        )
        for r in found
    ]
    return CompareOut(runs=rows, config_diff=diff)
