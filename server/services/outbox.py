"""The outbox: which queued runs still need a message on the broker.

A run's message is published after the commit that created it, so a crash or a broker hiccup in
between can leave a queued run without one. `enqueued_at` records a successful publish; the
reconciler republishes every queued, ready run that lacks it. Workers claim runs in the database,
so a run published twice still runs once.
"""

from __future__ import annotations

import uuid
from collections.abc import Sequence
from datetime import datetime

from sqlalchemy import select, update
from sqlalchemy.orm import Session

from server.db import Run, RunStatus, utcnow
from server.services.transitions import inputs_ready


def pending_publication(session: Session, *, limit: int = 100) -> list[uuid.UUID]:
    """Queued runs whose inputs are ready and whose message was never (or not yet) published."""
    return list(
        session.scalars(
            select(Run.id)
            .where(
                Run.status == RunStatus.QUEUED,
                Run.enqueued_at.is_(None),
                Run.cancel_requested.is_(False),
                inputs_ready(),
            )
            .order_by(Run.created_at)
            .limit(limit)
        )
    )


def mark_enqueued(
    session: Session, *, run_ids: Sequence[uuid.UUID], now: datetime | None = None
) -> None:
    if run_ids:
        session.execute(
            update(Run)
            .where(Run.id.in_(run_ids), Run.status == RunStatus.QUEUED)
            .values(enqueued_at=now or utcnow())
            .execution_options(synchronize_session=False)
        )


def is_ready(session: Session, *, run_id: uuid.UUID) -> bool:
    return session.scalar(select(Run.id).where(Run.id == run_id, inputs_ready())) is not None
