"""Metric points: bulk writes that never duplicate a row, and reads by series.

The unique key is (run_id, name, step). A resumed or redelivered run re-reports the steps after
its checkpoint; the last write wins, so a series always shows the attempt that finished. Points
are written in multi-row INSERT ... ON CONFLICT DO UPDATE statements (both Postgres and SQLite
speak this dialect of upsert).
"""

from __future__ import annotations

import math
import time
import uuid
from collections.abc import Iterable, Sequence
from typing import NamedTuple

from sqlalchemy import select
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.orm import Session

from erpd import metrics as M
from server.db import MetricPoint
from server.services.errors import InvalidInputError

# rows per statement: 5 bound values per row stays under SQLite's 32,766 and Postgres's 65,535
CHUNK = 5000


class Point(NamedTuple):
    step: int
    name: str
    value: float | None
    wall_time: float


def record_metrics(session: Session, *, run_id: uuid.UUID, points: Iterable[Point]) -> int:
    """Upsert the points; returns how many distinct (name, step) keys were written.

    Within one call a repeated key keeps its last value: Postgres refuses a statement that
    would update the same row twice, so duplicates are folded here first.
    """
    latest: dict[tuple[str, int], dict[str, object]] = {}
    for step, name, value, wall_time in points:
        if name not in M.CATALOGUE:
            raise InvalidInputError("name", f"unknown metric name {name!r} (see erpd/metrics.py)")
        if step < 0:
            raise InvalidInputError("step", f"{name}: step {step} is negative")
        v = None if value is None or not math.isfinite(value) else float(value)
        latest[(name, step)] = {
            "run_id": run_id,
            "name": name,
            "step": int(step),
            "value": v,
            "wall_time": float(wall_time),
        }
    rows = list(latest.values())
    insert = postgresql.insert if session.get_bind().dialect.name == "postgresql" else sqlite.insert
    for start in range(0, len(rows), CHUNK):
        stmt = insert(MetricPoint).values(rows[start : start + CHUNK])
        stmt = stmt.on_conflict_do_update(
            index_elements=[MetricPoint.run_id, MetricPoint.name, MetricPoint.step],
            set_={"value": stmt.excluded.value, "wall_time": stmt.excluded.wall_time},
        )
        session.execute(stmt)
    return len(rows)


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
