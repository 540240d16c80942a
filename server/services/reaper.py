"""The reaper: finds running runs whose worker went silent and decides their fate.

A run is stale when its last heartbeat (or, if it never sent one, its start) is older than the
timeout. It is requeued while it has attempts left, failed with `worker_lost` when it has none,
and cancelled, never requeued, when a cancel was already requested. A requeued run loses its
`enqueued_at`, so the outbox (server/services/outbox.py) publishes it again.
"""

from __future__ import annotations

import logging
import uuid
from dataclasses import dataclass
from datetime import datetime, timedelta

from sqlalchemy import func, select
from sqlalchemy.orm import Session, sessionmaker

from server.db import EventKind, Run, RunStatus, utcnow
from server.services.outbox import Publisher, forget_lost_messages, publish_pending
from server.services.runs import add_event
from server.services.storage import Retention, reclaim
from server.services.transitions import end_run, running_attempt

WORKER_LOST = "worker_lost"
log = logging.getLogger("erpd.reaper")


@dataclass(frozen=True)
class Reaped:
    run_id: uuid.UUID
    status: RunStatus  # queued (requeued), failed or cancelled
    reason: str


def requeue_stale(
    session: Session,
    *,
    timeout: timedelta,
    now: datetime | None = None,
    actor: str = "reaper",
    limit: int = 100,
) -> list[Reaped]:
    now = now or utcnow()
    last_sign = func.coalesce(Run.heartbeat_at, Run.started_at)
    stale = session.scalars(
        select(Run)
        .where(Run.status == RunStatus.RUNNING, last_sign < now - timeout)
        .order_by(Run.started_at)
        .limit(limit)
        # a worker heartbeating right now holds the row: skip it rather than wait on it
        .with_for_update(skip_locked=True)
    ).all()
    reaped = []
    for run in stale:
        seen = run.heartbeat_at or run.started_at
        silent = f"no heartbeat from {run.worker} since {seen:%Y-%m-%dT%H:%M:%SZ}"
        reason = give_up(session, run, why=silent, actor=actor, now=now)
        reaped.append(Reaped(run.id, run.status, reason))
    session.flush()
    return reaped


def release_run(
    session: Session,
    *,
    run_id: uuid.UUID,
    attempt: int,
    why: str,
    actor: str,
    now: datetime | None = None,
) -> Run:
    """A worker lost part of its attempt (a torchrun rank died) but not itself: the run is
    requeued, or failed or cancelled, at once, as the reaper would after the heartbeat timeout."""
    run = running_attempt(session, run_id=run_id, attempt=attempt, action="release")
    give_up(session, run, why=why, actor=actor, now=now or utcnow())
    session.flush()
    return run


def yield_run(
    session: Session,
    *,
    run_id: uuid.UUID,
    attempt: int,
    step: int | None,
    actor: str,
    now: datetime | None = None,
) -> Run:
    """The worker is shutting down (SIGTERM) and saved a resume point at `step`: the run goes
    back to the queue at once. A shutdown is not the run's fault, so it does not use up one of
    its attempts (max_attempts grows with it); a cancel requested meanwhile wins."""
    run = running_attempt(session, run_id=run_id, attempt=attempt, action="release")
    run.max_attempts += 1
    where = "" if step is None else f"; resumes from step {step}"
    why = f"the worker shut down{where}; this attempt is not counted"
    give_up(session, run, why=why, actor=actor, now=now or utcnow())
    session.flush()
    return run


def give_up(session: Session, run: Run, *, why: str, actor: str, now: datetime) -> str:
    """End a running attempt that will not finish: cancelled if a cancel was requested, failed
    with `worker_lost` after max_attempts, else queued again for the outbox to publish.
    Returns the reason recorded."""
    if run.cancel_requested:
        reason = f"{why}; cancel was requested"
        end_run(
            session,
            run,
            RunStatus.CANCELLED,
            EventKind.CANCELLED,
            actor=actor,
            reason=reason,
            now=now,
        )
    elif run.attempt >= run.max_attempts:
        reason = f"{WORKER_LOST}: {why} (attempt {run.attempt} of {run.max_attempts})"
        end_run(
            session, run, RunStatus.FAILED, EventKind.FAILED, actor=actor, reason=reason, now=now
        )
    else:
        reason = f"{why} (attempt {run.attempt} of {run.max_attempts})"
        run.status = RunStatus.QUEUED
        run.heartbeat_at = None
        run.enqueued_at = None  # the outbox publishes it again
        add_event(
            session,
            run,
            event=EventKind.REQUEUED,
            from_status=RunStatus.RUNNING,
            actor=actor,
            reason=reason,
            now=now,
        )
    return reason


def reap(
    writes: sessionmaker[Session],
    reads: sessionmaker[Session],
    broker: Publisher,
    *,
    timeout: timedelta,
    republish_after: timedelta,
    retention: Retention | None = None,
) -> list[Reaped]:
    """One round of `erpd-hub reaper`: requeue or fail the silent runs, find the queued runs
    whose message was lost, publish what the outbox holds (runs and webhooks), then give back
    what the retention settings say is no longer kept (server/services/storage.py)."""
    with writes.begin() as session:
        reaped = requeue_stale(session, timeout=timeout)
        lost = forget_lost_messages(
            session, older_than=republish_after, depth=broker.run_queue_depth
        )
    for run_id in lost:
        log.warning("reaper: run %s was published but its message is gone; republishing", run_id)
    publish_pending(writes, reads, broker)
    if retention is not None:
        try:
            done = reclaim(writes, retention)
        except OSError as exc:  # a file it could not remove: the next round tries again
            log.warning("reaper: retention pass stopped: %s", exc)
        else:
            if done.run_dirs or done.resume_points or done.orphans:
                log.info("reaper: retention reclaimed %s", done)
    return reaped
