"""Engines and sessions for both backends.

SQLite is the embedded default and is shared by the API, the worker and the reaper (separate
processes): WAL lets readers proceed during a write, `busy_timeout` makes a writer wait for the
lock instead of failing at once, and foreign keys must be switched on per connection.

SQLite transactions start with BEGIN IMMEDIATE: a deferred transaction that reads and then writes
fails with "database is locked" (no waiting) when another process committed in between, which is
exactly the read-check-write shape of every state transition. Taking the write lock up front makes
such transactions queue on `busy_timeout` instead. Postgres uses row locks (SELECT ... FOR UPDATE).
Sessions from `read_session_factory` are the exception: they only read, so they start a deferred
transaction, read a WAL snapshot and never hold the write lock (a slow reader, such as a stream of
metric points to a browser, must not stall a worker's writes). Keep write sessions short: on
SQLite a session holds the write lock from its first statement (autobegin, lazy loads included)
until it commits or closes, so use `with factory.begin():` blocks.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from sqlalchemy import Engine, create_engine, event, text
from sqlalchemy.engine import make_url
from sqlalchemy.orm import Session, sessionmaker

READ_ONLY = "erpd_read_only"  # execution option set by read_session_factory


@dataclass(frozen=True)
class Timeouts:
    """Bounds on every wait for the database (seconds), for a process that must never hang on it
    (the API). `statement` is Postgres's `statement_timeout` (the server cancels the statement)
    and SQLite's busy timeout (how long a writer waits for the lock); `connect` bounds opening a
    connection; `pool` the wait for a free one. Each surfaces as an error, never a wait."""

    statement: float
    connect: float
    pool: float


def make_engine(url: str, timeouts: Timeouts | None = None, **kwargs: Any) -> Engine:
    """An engine; without `timeouts`, the workers' and tools' defaults (a 30 s busy timeout on
    SQLite, no statement timeout: a long migration or a large metric write may take its time)."""
    parsed = make_url(url)
    if parsed.get_backend_name() != "sqlite":
        if timeouts is not None:
            kwargs["pool_timeout"] = timeouts.pool
            kwargs["connect_args"] = {
                "connect_timeout": max(1, math.ceil(timeouts.connect)),  # libpq: whole seconds
                "options": f"-c statement_timeout={int(timeouts.statement * 1000)}",
            } | kwargs.get("connect_args", {})
        return create_engine(url, pool_pre_ping=True, **kwargs)
    if parsed.database and parsed.database != ":memory:":
        Path(parsed.database).parent.mkdir(parents=True, exist_ok=True)
    busy = 30.0 if timeouts is None else timeouts.statement
    if timeouts is not None:
        kwargs["pool_timeout"] = timeouts.pool
    engine = create_engine(url, connect_args={"timeout": busy}, **kwargs)

    @event.listens_for(engine, "connect")
    def _pragmas(dbapi_conn: Any, _record: Any) -> None:
        dbapi_conn.isolation_level = None  # we emit BEGIN ourselves (below)
        cur = dbapi_conn.cursor()
        cur.execute("PRAGMA foreign_keys=ON")
        cur.execute("PRAGMA journal_mode=WAL")
        cur.execute(f"PRAGMA busy_timeout={int(busy * 1000)}")
        cur.execute("PRAGMA synchronous=NORMAL")
        cur.close()

    @event.listens_for(engine, "begin")
    def _begin(conn: Any) -> None:
        read_only = conn.get_execution_options().get(READ_ONLY, False)
        conn.exec_driver_sql("BEGIN" if read_only else "BEGIN IMMEDIATE")

    return engine


def session_factory(engine: Engine) -> sessionmaker[Session]:
    # expire_on_commit=False: services return rows that callers read after the commit
    return sessionmaker(engine, expire_on_commit=False)


def read_session_factory(engine: Engine) -> sessionmaker[Session]:
    """Sessions that only read: a snapshot on SQLite that never takes the write lock, a
    READ ONLY transaction on Postgres (a write through one is an error, not a surprise)."""
    options: dict[str, Any] = {READ_ONLY: True}
    if engine.dialect.name == "postgresql":
        options["postgresql_readonly"] = True
    return sessionmaker(engine.execution_options(**options), expire_on_commit=False)


@contextmanager
def transaction(factory: sessionmaker[Session]) -> Iterator[Session]:
    """One unit of work: commit on success, roll back on any error."""
    with factory() as session, session.begin():
        yield session


def ping(engine: Engine) -> None:
    """Raise unless the database answers a trivial query (the API's readiness probe)."""
    with engine.connect() as conn:
        conn.execute(text("select 1"))
