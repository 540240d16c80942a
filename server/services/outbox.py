"""The outbox: which queued runs still need a message on the broker, and which finished runs
still need their webhook queued.

A run's message is published after the commit that created it, so a crash or a broker hiccup in
between can leave a queued run without one. `enqueued_at` is set, by a conditional UPDATE, by
whoever is about to publish the run (and cleared if the publish fails), so of the reconcilers
that race (API, workers, reaper) one sends it. The reconciler publishes every queued, ready run
that lacks it; a run marked but never sent (a crash in between) is found by the reaper
(`forget_lost_messages`). Workers claim runs in the database, so a run published twice still
runs once. Webhooks work the same way with `notify_enqueued_at`:
whoever ends a run (worker, API, a failing input's cascade) leaves the flag unset, and the next
reconcile queues the `notify` message (at least once: a receiver may see a repeat after a crash).
"""

from __future__ import annotations

import logging
import uuid
from collections.abc import Callable, Sequence
from datetime import datetime, timedelta
from typing import Protocol

import anyio
from sqlalchemy import select, update
from sqlalchemy.orm import Session, sessionmaker

from server.db import FINISHED, Run, RunStatus, utcnow
from server.services.transitions import inputs_ready

log = logging.getLogger("erpd.outbox")


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
    session: Session, *, run_ids: Sequence[uuid.UUID], now: datetime
) -> dict[uuid.UUID, int | None]:
    """Mark the given runs published, if they are queued, ready and still unmarked, in one
    conditional UPDATE; returns the runs this caller marked (with their GPU pin). Two reconcilers
    racing (the API and the reaper) thus never both publish a run."""
    if not run_ids:
        return {}
    marked = session.execute(
        update(Run)
        .where(
            Run.id.in_(run_ids),
            Run.status == RunStatus.QUEUED,
            Run.enqueued_at.is_(None),
            Run.cancel_requested.is_(False),
            inputs_ready(),
        )
        .values(enqueued_at=now)
        .returning(Run.id, Run.gpu)
        .execution_options(synchronize_session=False)
    ).all()
    return {run_id: gpu for run_id, gpu in marked}


def unmark_enqueued(session: Session, *, run_ids: Sequence[uuid.UUID], marked_at: datetime) -> None:
    """Undo `mark_enqueued` for runs whose publish failed (unless someone re-marked them since)."""
    if run_ids:
        session.execute(
            update(Run)
            .where(Run.id.in_(run_ids), Run.enqueued_at == marked_at)
            .values(enqueued_at=None)
            .execution_options(synchronize_session=False)
        )


def forget_lost_messages(
    session: Session,
    *,
    older_than: timedelta,
    depth: Callable[[int | None], int | None],
    now: datetime | None = None,
) -> list[uuid.UUID]:
    """Queued, ready runs published more than `older_than` ago whose queue is empty: the message
    is gone (a worker takes one message at a time and claims its run at once, so an empty queue
    and an unclaimed run mean it died in between, or the broker lost it). Their `enqueued_at` is
    cleared for the reconciler to publish them again; a queue whose depth the broker cannot tell
    is left alone. At worst a message is duplicated, and the claim makes that harmless."""
    cutoff = (now or utcnow()) - older_than
    stale = session.execute(
        select(Run.id, Run.gpu).where(
            Run.status == RunStatus.QUEUED,
            Run.enqueued_at < cutoff,
            Run.cancel_requested.is_(False),
            inputs_ready(),
        )
    ).all()
    empty: dict[int | None, bool] = {}
    lost = []
    for run_id, gpu in stale:
        if gpu not in empty:
            empty[gpu] = depth(gpu) == 0
        if empty[gpu]:
            lost.append(run_id)
    if lost:
        session.execute(
            update(Run)
            .where(Run.id.in_(lost), Run.status == RunStatus.QUEUED)
            .values(enqueued_at=None)
            .execution_options(synchronize_session=False)
        )
    return lost


class Publisher(Protocol):
    def publish(self, run_id: uuid.UUID, gpu: int | None = None) -> None: ...

    def notify(self, run_id: uuid.UUID) -> None: ...

    def run_queue_depth(self, gpu: int | None = None) -> int | None: ...


def publish_ready(
    writes: sessionmaker[Session], broker: Publisher, run_ids: Sequence[uuid.UUID]
) -> None:
    """Publish the runs whose inputs are ready; the others wait for their inputs (published when
    those finish). Each run is marked before it is sent, so of several reconcilers only one
    publishes it. A failed publish is unmarked for the reconciler to retry; a process that dies
    between the mark and the send leaves a marked run with no message, which the reaper finds
    (`forget_lost_messages`) and publishes again."""
    now = utcnow()
    with writes.begin() as session:
        pins = mark_enqueued(session, run_ids=run_ids, now=now)
    mine = [r for r in run_ids if r in pins]  # in the caller's order
    failed = []
    for i, run_id in enumerate(mine):
        try:
            broker.publish(run_id, pins[run_id])
        except Exception:
            # the broker is away: the rest would each wait out its timeout too, so they wait
            # for the next round instead
            log.warning("publishing run %s failed; the outbox will retry", run_id)
            failed = mine[i:]
            break
    if failed:
        with writes.begin() as session:
            unmark_enqueued(session, run_ids=failed, marked_at=now)


def publish_pending(
    writes: sessionmaker[Session], reads: sessionmaker[Session], broker: Publisher
) -> int:
    """The reconciler: publish every queued, ready run that has no message yet (its publish
    failed after the commit, the reaper requeued it, or its inputs just finished), then queue the
    webhooks of finished runs. Returns how many messages went out."""
    return _publish_runs(writes, reads, broker) + publish_notifications(writes, reads, broker)


def _publish_runs(
    writes: sessionmaker[Session], reads: sessionmaker[Session], broker: Publisher
) -> int:
    sent = 0
    while True:
        with reads() as session:
            pending = pending_publication(session, limit=100)
        if not pending:
            return sent
        publish_ready(writes, broker, pending)
        with reads() as session:
            left = set(pending_publication(session, limit=100))
        sent += len(set(pending) - left)
        if left & set(pending):  # the broker refused some: the next round tries again
            return sent


def pending_notifications(session: Session, *, limit: int = 100) -> list[uuid.UUID]:
    """Finished runs with a webhook whose `notify` message is not on the broker yet."""
    return list(
        session.scalars(
            select(Run.id)
            .where(
                Run.status.in_(FINISHED),
                Run.notify_url.is_not(None),
                Run.notify_enqueued_at.is_(None),
            )
            .order_by(Run.finished_at)
            .limit(limit)
        )
    )


def publish_notifications(
    writes: sessionmaker[Session], reads: sessionmaker[Session], broker: Publisher
) -> int:
    """Queue the webhooks of finished runs. Each is marked before it is sent (a conditional
    UPDATE), so the worker, the API and the reaper reconciling at once send it once; a send
    that fails is unmarked for the next reconcile."""
    sent = 0
    while True:
        with reads() as session:
            pending = pending_notifications(session, limit=100)
        if not pending:
            return sent
        with writes.begin() as session:
            mine = list(
                session.scalars(
                    update(Run)
                    .where(Run.id.in_(pending), Run.notify_enqueued_at.is_(None))
                    .values(notify_enqueued_at=utcnow())
                    .returning(Run.id)
                    .execution_options(synchronize_session=False)
                )
            )
        failed = []
        for i, run_id in enumerate(mine):
            try:
                broker.notify(run_id)
            except Exception:  # as in publish_ready: the rest wait for the next round
                log.warning("queuing the webhook of run %s failed; the outbox will retry", run_id)
                failed = mine[i:]
                break
        if failed:
            with writes.begin() as session:
                session.execute(
                    update(Run)
                    .where(Run.id.in_(failed))
                    .values(notify_enqueued_at=None)
                    .execution_options(synchronize_session=False)
                )
            return sent + len(mine) - len(failed)
        sent += len(mine)


class Dispatcher:
    """The API process's publisher: one background task that runs the reconciler (`work`) in a
    worker thread, when a request asks for it (`kick`, after its commit) and every `interval_s`
    (runs accepted while the broker was away go out once it is back). Requests never wait on the
    broker: a frozen one holds this one thread, for a bounded time (the broker's timeouts),
    and kicks that arrive meanwhile share the next round. Several API processes each run one;
    `mark_enqueued` keeps them from publishing a run twice.

    Create, kick and run it on the event loop (anyio.Event is not thread-safe).
    """

    def __init__(self, work: Callable[[], object], *, interval_s: float) -> None:
        self._work, self._interval = work, interval_s
        self._kicked = anyio.Event()
        self._next: anyio.Event | None = None  # set when the next round ends
        self._stopping = False

    def kick(self) -> anyio.Event:
        """Ask for a round now; the event is set when a round that starts after this call ends
        (whether or not the broker took the messages)."""
        if self._next is None:
            self._next = anyio.Event()
        self._kicked.set()
        return self._next

    def stop(self) -> None:
        """`run` returns after the round in progress, if any."""
        self._stopping = True
        self._kicked.set()

    async def run(self) -> None:
        while not self._stopping:
            with anyio.move_on_after(self._interval):
                await self._kicked.wait()
            if self._stopping:
                break
            self._kicked = anyio.Event()
            done, self._next = self._next, None
            try:
                # abandon_on_cancel: a shutdown does not wait out a frozen broker's timeout
                await anyio.to_thread.run_sync(self._round, abandon_on_cancel=True)
            finally:
                if done is not None:
                    done.set()
        if self._next is not None:
            self._next.set()

    def _round(self) -> None:
        try:
            self._work()
        except Exception:  # the database or the broker is away: the next round tries again
            log.warning("outbox: publishing failed; retrying in %.0f s", self._interval)
