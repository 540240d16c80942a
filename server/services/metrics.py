"""Metric points: bulk writes that never duplicate a row, and reads by series.

The unique key is (run_id, name, step). A resumed or redelivered run re-reports the steps after
its checkpoint; the last write wins, so a series always shows the attempt that finished. Points
are written as one executemany of INSERT ... ON CONFLICT DO UPDATE on the table (both backends
speak this upsert; SQLAlchemy batches it into multi-row statements at the driver), which
benchmarks/metric_inserts.py measured 6-15x faster than compiling multi-row VALUES ourselves.
"""

from __future__ import annotations

import math
import time
import uuid
from collections.abc import Iterable, Sequence
from typing import NamedTuple, cast

from sqlalchemy import Table, select
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.orm import Session

from erpd import metrics as M
from server.db import MetricPoint
from server.services.errors import InvalidInputError
from server.services.runs import get_run
from server.services.transitions import running_attempt


class Point(NamedTuple):
    step: int
    name: str
    value: float | None
    wall_time: float


def record_metrics(
    session: Session,
    *,
    run_id: uuid.UUID,
    points: Iterable[Point],
    attempt: int | None = None,
) -> int:
    """Upsert the points; returns how many distinct (name, step) keys were written.

    Within one call a repeated key keeps its last value: Postgres refuses a statement that
    would update the same row twice, so duplicates are folded here first. A worker passes the
    `attempt` it claimed, so a worker the reaper gave up on cannot overwrite the new attempt's
    points (StaleAttemptError).
    """
    if attempt is None:
        get_run(session, run_id=run_id)
    else:
        running_attempt(session, run_id=run_id, attempt=attempt, action="record metrics")
    latest: dict[tuple[str, int], dict[str, object]] = {}
    for step, name, value, wall_time in points:
        if name not in M.CATALOGUE:
            raise InvalidInputError("name", f"unknown metric name {name!r} (see erpd/metrics.py)")
        if isinstance(step, bool) or not isinstance(step, int) or step < 0:
            raise InvalidInputError("step", f"{name}: step {step!r} is not an integer >= 0")
        if value is not None and not isinstance(value, int | float):
            raise InvalidInputError("value", f"{name}: {value!r} is not a number")
        v = None if value is None or not math.isfinite(value) else float(value)
        latest[(name, step)] = {
            "run_id": run_id,
            "name": name,
            "step": int(step),
            "value": v,
            "wall_time": float(wall_time),
        }
    if not latest:
        return 0
    insert = postgresql.insert if session.get_bind().dialect.name == "postgresql" else sqlite.insert
    table = cast(Table, MetricPoint.__table__)
    stmt = insert(table)
    stmt = stmt.on_conflict_do_update(
        index_elements=[table.c.run_id, table.c.name, table.c.step],
        set_={"value": stmt.excluded.value, "wall_time": stmt.excluded.wall_time},
    )
    # on the Table, not the ORM entity: the Core executemany path, no per-row ORM bookkeeping
    session.execute(stmt, list(latest.values()))
    return len(latest)


def points_now(step: int, values: dict[str, float]) -> list[Point]:
    """One step's values as points stamped with the current wall time."""
    now = time.time()
    return [Point(step, name, value, now) for name, value in values.items()]


def metric_series(
    session: Session, *, run_id: uuid.UUID, names: Sequence[str], since_step: int = -1
) -> dict[str, list[tuple[int, float | None]]]:
    """Each named series after `since_step`, in step order (the incremental poll)."""
    rows = session.execute(
        select(MetricPoint.name, MetricPoint.step, MetricPoint.value)
        .where(
            MetricPoint.run_id == run_id,
            MetricPoint.name.in_(names),
            MetricPoint.step > since_step,
        )
        .order_by(MetricPoint.name, MetricPoint.step)
    )
    series: dict[str, list[tuple[int, float | None]]] = {name: [] for name in names}
    for name, step, value in rows:
        series[name].append((step, value))
    return series


def downsample(
    points: Sequence[tuple[int, float | None]], max_points: int
) -> tuple[list[tuple[int, float | None]], bool]:
    """At most about `max_points` points that keep the shape of a series.

    The series is cut into buckets of consecutive steps and each bucket keeps its minimum and
    maximum (in step order), plus the first non-finite point if it has one, so a spike or a
    collapse is never averaged away; the first and last points are always kept.
    """
    if len(points) <= max_points:
        return list(points), False
    first, inner, last = points[0], points[1:-1], points[-1]
    buckets = max(1, (max_points - 2) // 2)
    size = math.ceil(len(inner) / buckets)
    kept = [first]
    for start in range(0, len(inner), size):
        bucket = inner[start : start + size]
        finite = [p for p in bucket if p[1] is not None]
        chosen = set()
        if finite:
            chosen.add(min(finite, key=lambda p: p[1]))  # type: ignore[arg-type,return-value]
            chosen.add(max(finite, key=lambda p: p[1]))  # type: ignore[arg-type,return-value]
        chosen.update(
            p for p in bucket[:] if p[1] is None and not any(c[1] is None for c in chosen)
        )
        kept.extend(sorted(chosen))
    kept.append(last)
    return kept, True


def series_names(session: Session, *, run_id: uuid.UUID) -> list[str]:
    return list(
        session.scalars(
            select(MetricPoint.name)
            .where(MetricPoint.run_id == run_id)
            .distinct()
            .order_by(MetricPoint.name)
        )
    )
