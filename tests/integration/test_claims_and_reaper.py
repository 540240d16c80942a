"""Claims under real concurrency, and the reaper, on real Postgres and SQLite."""

from __future__ import annotations

import threading
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from datetime import timedelta

import pytest
from sqlalchemy import Engine, text
from sqlalchemy.exc import DBAPIError
from sqlalchemy.orm import Session, sessionmaker

from server.db import (
    EventKind,
    Run,
    RunKind,
    RunStatus,
    make_engine,
    read_session_factory,
    session_factory,
)
from server.db.base import utcnow
from server.services import (
    StaleAttemptError,
    claim_run,
    create_run,
    get_run,
    heartbeat,
    request_cancel,
    requeue_stale,
    run_events,
)
from server.services.reaper import WORKER_LOST

TIMEOUT = timedelta(minutes=5)


def queued(
    factory: sessionmaker[Session],
    ids: tuple[uuid.UUID, uuid.UUID],
    n: int = 1,
    max_attempts: int = 3,
) -> list[uuid.UUID]:
    with factory.begin() as s:
        return [
            create_run(
                s,
                kind=RunKind.SAMPLE,
                model_id=ids[0],
                dataset_id=ids[1],
                config={},
                max_attempts=max_attempts,
            ).id
            for _ in range(n)
        ]


def test_two_concurrent_claims_exactly_one_wins(store_engine: Engine, builtins) -> None:
    """Two workers, each with its own engine (own connections), race for each of 20 runs."""
    factory = session_factory(store_engine)
    run_ids = queued(factory, builtins, n=20)
    workers = [
        session_factory(make_engine(store_engine.url.render_as_string(False))) for _ in range(2)
    ]
    start = threading.Barrier(2)

    def race(worker: int, run_id: uuid.UUID) -> bool:
        start.wait()
        with workers[worker].begin() as s:
            return claim_run(s, run_id=run_id, worker=f"w{worker}", device="cpu") is not None

    with ThreadPoolExecutor(2) as pool:
        for run_id in run_ids:
            won = list(pool.map(race, [0, 1], [run_id, run_id]))
            assert sum(won) == 1, won
            with factory() as s:
                run = get_run(s, run_id=run_id)
                assert run.attempt == 1 and run.status is RunStatus.RUNNING
                claims = [e for e in run_events(s, run_id=run_id) if e.event is EventKind.CLAIMED]
                assert len(claims) == 1 and claims[0].actor == f"worker:{run.worker}"
    for w in workers:
        assert w.kw["bind"] is not None
        w.kw["bind"].dispose()


def test_a_blocked_claim_loses_once_the_winner_commits(store_engine: Engine, builtins) -> None:
    """Deterministic interleaving on Postgres: A claims and holds its transaction open; B's claim
    is seen waiting on A's row lock (pg_stat_activity), then A commits and B gets nothing."""
    if store_engine.dialect.name != "postgresql":
        pytest.skip("row-lock waits are a Postgres notion (SQLite serialises whole transactions)")
    factory = session_factory(store_engine)
    [run_id] = queued(factory, builtins)
    a = factory()
    a.begin()
    assert claim_run(a, run_id=run_id, worker="a", device="cpu") is not None
    b_pid: dict[str, int] = {}
    b_result: dict[str, Run | None] = {}

    def claim_b() -> None:
        with factory.begin() as s:
            b_pid["pid"] = s.execute(text("select pg_backend_pid()")).scalar_one()
            b_result["run"] = claim_run(s, run_id=run_id, worker="b", device="cpu")

    thread = threading.Thread(target=claim_b)
    thread.start()
    try:
        assert _waits_on_a_lock(store_engine, b_pid), "B never blocked on A's row lock"
        a.commit()
    finally:
        a.close()  # on any failure, A's rollback releases B
        thread.join(timeout=30)
    assert not thread.is_alive() and b_result["run"] is None


def _waits_on_a_lock(engine: Engine, pid_box: dict[str, int], deadline_s: float = 20) -> bool:
    """Poll the server's own view of B's backend until it waits on a lock (or the deadline)."""
    end = time.monotonic() + deadline_s
    with engine.connect() as watcher:
        while time.monotonic() < end:
            pid = pid_box.get("pid")
            if pid is not None:
                state = watcher.execute(
                    text("select wait_event_type from pg_stat_activity where pid = :p"),
                    {"p": pid},
                ).scalar_one_or_none()
                if state == "Lock":
                    return True
            watcher.rollback()
    return False


def test_stale_heartbeat_is_requeued_and_the_old_worker_fenced(factory, builtins) -> None:
    [run_id] = queued(factory, builtins)
    t0 = utcnow()
    with factory.begin() as s:
        claim_run(s, run_id=run_id, worker="w1", device="cpu", now=t0)
        heartbeat(s, run_id=run_id, attempt=1, now=t0 + timedelta(minutes=1))
    with factory.begin() as s:  # 5 min after the heartbeat: not yet stale
        assert requeue_stale(s, timeout=TIMEOUT, now=t0 + timedelta(minutes=5)) == []
    with factory.begin() as s:
        [reaped] = requeue_stale(s, timeout=TIMEOUT, now=t0 + timedelta(minutes=7))
    assert reaped.status is RunStatus.QUEUED and "w1" in reaped.reason
    with factory.begin() as s:
        claim_run(s, run_id=run_id, worker="w2", device="cpu", now=t0 + timedelta(minutes=8))
    with pytest.raises(StaleAttemptError), factory.begin() as s:
        # the lost worker comes back: its attempt is no longer the run's
        heartbeat(s, run_id=run_id, attempt=1, now=t0 + timedelta(minutes=8))
    with factory() as s:
        events = run_events(s, run_id=run_id)
        assert get_run(s, run_id=run_id).worker == "w2"
    kinds = [e.event for e in events]
    assert kinds == [EventKind.CREATED, EventKind.CLAIMED, EventKind.REQUEUED, EventKind.CLAIMED]
    assert any(e.event is EventKind.REQUEUED and e.actor == "reaper" for e in events)


def test_a_run_that_never_heartbeated_is_caught_by_its_start_time(factory, builtins) -> None:
    fresh, silent = queued(factory, builtins, n=2)
    t0 = utcnow()
    with factory.begin() as s:
        claim_run(s, run_id=silent, worker="w1", device="cpu", now=t0)
        claim_run(s, run_id=fresh, worker="w1", device="cpu", now=t0 + timedelta(minutes=4))
    with factory.begin() as s:
        reaped = requeue_stale(s, timeout=TIMEOUT, now=t0 + timedelta(minutes=6))
    assert [r.run_id for r in reaped] == [silent]
    with factory() as s:
        assert get_run(s, run_id=fresh).status is RunStatus.RUNNING


def test_max_attempts_reached_fails_with_worker_lost(factory, builtins) -> None:
    [run_id] = queued(factory, builtins, max_attempts=2)
    t = utcnow()
    for attempt in (1, 2):
        with factory.begin() as s:
            assert claim_run(s, run_id=run_id, worker=f"w{attempt}", device="cpu", now=t)
        t += TIMEOUT + timedelta(seconds=1)
        with factory.begin() as s:
            [reaped] = requeue_stale(s, timeout=TIMEOUT, now=t)
    assert reaped.status is RunStatus.FAILED
    with factory() as s:
        run = get_run(s, run_id=run_id)
    assert run.status is RunStatus.FAILED and run.attempt == 2
    assert run.error is not None and run.error.startswith(WORKER_LOST) and "w2" in run.error


def test_cancelled_runs_are_never_requeued(factory, builtins) -> None:
    cancelling, cancelled = queued(factory, builtins, n=2)
    t0 = utcnow()
    with factory.begin() as s:
        claim_run(s, run_id=cancelling, worker="w1", device="cpu", now=t0)
        request_cancel(s, run_id=cancelling, actor="api:k", now=t0)
        request_cancel(s, run_id=cancelled, actor="api:k", now=t0)
    with factory.begin() as s:
        [reaped] = requeue_stale(s, timeout=TIMEOUT, now=t0 + timedelta(hours=1))
    assert reaped.run_id == cancelling and reaped.status is RunStatus.CANCELLED
    with factory.begin() as s:
        assert requeue_stale(s, timeout=TIMEOUT, now=t0 + timedelta(hours=2)) == []
        assert get_run(s, run_id=cancelled).status is RunStatus.CANCELLED
        assert claim_run(s, run_id=cancelling, worker="w2", device="cpu") is None


def test_readers_see_a_snapshot_and_never_wait_on_a_writer(store_engine: Engine, builtins) -> None:
    """A read session during an open write transaction answers at once with the committed state
    (on SQLite a reader taking the write lock would wait busy_timeout, 30 s, and then fail)."""
    factory = session_factory(store_engine)
    [run_id] = queued(factory, builtins)
    writer = factory()
    writer.begin()
    assert claim_run(writer, run_id=run_id, worker="w1", device="cpu") is not None
    try:
        with read_session_factory(store_engine)() as reader:
            assert get_run(reader, run_id=run_id).status is RunStatus.QUEUED
    finally:
        writer.commit()
        writer.close()
    with read_session_factory(store_engine)() as reader:
        assert get_run(reader, run_id=run_id).status is RunStatus.RUNNING
        if store_engine.dialect.name == "postgresql":
            with pytest.raises(DBAPIError, match="read-only"):
                request_cancel(reader, run_id=run_id, actor="api")


def test_a_student_created_while_its_teacher_fails_sees_the_failure(
    store_engine: Engine, builtins
) -> None:
    """Postgres: A fails the teacher and holds its transaction; B's create of a student waits on
    the teacher's row, then sees it failed, instead of leaving a student queued forever."""
    if store_engine.dialect.name != "postgresql":
        pytest.skip("row-lock waits are a Postgres notion (SQLite serialises whole transactions)")
    from server.services import InvalidInputError, fail_run

    factory = session_factory(store_engine)
    with factory.begin() as s:
        teacher = create_run(
            s, kind=RunKind.STAGE1, model_id=builtins[0], dataset_id=builtins[1], config={}
        )
        claim_run(s, run_id=teacher.id, worker="w", device="cpu")
    a = factory()
    a.begin()
    fail_run(a, run_id=teacher.id, attempt=1, reason="diverged", actor="worker:w")
    box: dict[str, int] = {}
    outcome: dict[str, object] = {}

    def create_student() -> None:
        try:
            with factory.begin() as s:
                box["pid"] = s.execute(text("select pg_backend_pid()")).scalar_one()
                create_run(
                    s,
                    kind=RunKind.STAGE2,
                    model_id=builtins[0],
                    dataset_id=builtins[1],
                    config={},
                    teacher_ids=[teacher.id],
                )
            outcome["result"] = "created"
        except InvalidInputError as exc:
            outcome["result"] = exc

    thread = threading.Thread(target=create_student)
    thread.start()
    try:
        assert _waits_on_a_lock(store_engine, box), "the student's create never waited"
        a.commit()
    finally:
        a.close()
        thread.join(timeout=30)
    assert isinstance(outcome["result"], InvalidInputError)
    assert "failed" in str(outcome["result"])
