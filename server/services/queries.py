"""Reads that serve a view rather than a state change: run counts for Prometheus, the runs
`erpd-hub status` lists, and what a run's live stream polls. Each works in a read-only session
(server/db/session.py), so a scrape or a slow stream never holds the write lock.
"""

from __future__ import annotations

import uuid

from sqlalchemy import func, select
from sqlalchemy.orm import Session

from server.db import ApiKey, MetricPoint, Run, RunStatus


def runs_by_status(session: Session) -> dict[RunStatus, int]:
    """Every key's runs, counted per status (a status with none is absent)."""
    rows = session.execute(select(Run.status, func.count()).group_by(Run.status))
    return {status: count for status, count in rows}


def running_runs(session: Session) -> list[Run]:
    """The runs a worker holds now, the longest-running first."""
    return list(
        session.scalars(select(Run).where(Run.status == RunStatus.RUNNING).order_by(Run.started_at))
    )


def live_run(session: Session, *, run_id: uuid.UUID, key_id: uuid.UUID) -> Run | None:
    """The run while the key that follows it is still valid: None once the key is revoked (a
    stream opened before the revocation must stop) or the run is gone."""
    key = session.get(ApiKey, key_id)
    if key is None or key.revoked_at is not None:
        return None
    return session.get(Run, run_id)


def points_from(
    session: Session, *, run_id: uuid.UUID, step: int, limit: int
) -> list[tuple[str, int, float | None]]:
    """The run's metric points at `step` and after, as (name, step, value) in (step, name) order:
    one index range scan, however long the run."""
    rows = session.execute(
        select(MetricPoint.name, MetricPoint.step, MetricPoint.value)
        .where(MetricPoint.run_id == run_id, MetricPoint.step >= step)
        .order_by(MetricPoint.step, MetricPoint.name)
        .limit(limit)
    )
    return [(name, at, value) for name, at, value in rows]
