"""Metric series (downsampled, incremental), the metric catalogue, and run comparison."""

from __future__ import annotations

import uuid
from typing import Annotated, Any

from fastapi import APIRouter, Query

from erpd import metrics as M
from server.api.deps import KeyDep, ReadSession
from server.api.errors import ApiError
from server.schemas import CompareOut, CompareRow, MetricInfoOut, MetricsOut, SeriesOut
from server.services import get_run, metric_series
from server.services.metrics import downsample, series_names

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


@router.get("/runs/{run_id}/metrics", response_model=MetricsOut, summary="Metric series")
def run_metrics(
    run_id: uuid.UUID,
    session: ReadSession,
    key: KeyDep,
    names: Annotated[
        list[str] | None, Query(description="Comma-separated or repeated; default: all.")
    ] = None,
    since_step: Annotated[int, Query(ge=-1, description="Only steps after this one.")] = -1,
    max_points: Annotated[int, Query(ge=10, le=100_000)] = 2_000,
) -> MetricsOut:
    get_run(session, run_id=run_id, owner_id=key.id)
    wanted = _names(names) or series_names(session, run_id=run_id)
    series = metric_series(session, run_id=run_id, names=wanted, since_step=since_step)
    out, last = [], None
    for name, points in series.items():
        kept, thinned = downsample(points, max_points)
        if points.steps:
            last = max(last or -1, points.steps[-1])
        out.append(SeriesOut(name=name, steps=kept.steps, values=kept.values, downsampled=thinned))
    return MetricsOut(run=run_id, series=out, last_step=last)


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
