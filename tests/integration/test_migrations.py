"""Alembic on empty Postgres and SQLite databases, and the `erpd-hub` commands over them."""

from __future__ import annotations

import os
import subprocess
import sys
import uuid
from datetime import UTC, datetime
from pathlib import Path

import pytest
from alembic.autogenerate import compare_metadata
from alembic.runtime.migration import MigrationContext
from sqlalchemy import inspect, text

from server.db import Base, make_engine, migrate, session_factory
from server.services import authenticate
from tests.integration.conftest import BACKENDS, Databases

TABLES = {t.name for t in Base.metadata.sorted_tables}


def _diff(url: str) -> list[object]:
    engine = make_engine(url)
    with engine.connect() as conn:
        ctx = MigrationContext.configure(conn, opts={"compare_type": True})
        diff = compare_metadata(ctx, Base.metadata)
    engine.dispose()
    return diff


@pytest.mark.parametrize("backend", BACKENDS)
def test_upgrade_downgrade_upgrade_and_no_autogenerate_diff(databases: Databases, backend) -> None:
    engine = make_engine(databases.new_url(backend))
    migrate.upgrade(engine)
    assert set(inspect(engine).get_table_names()) == TABLES | {"alembic_version"}
    assert migrate.current(engine) == migrate.head()
    assert _diff(engine.url.render_as_string(False)) == []  # the models and migrations agree
    migrate.downgrade(engine, "base")
    assert set(inspect(engine).get_table_names()) == {"alembic_version"}
    assert migrate.current(engine) is None
    migrate.upgrade(engine)
    assert migrate.current(engine) == migrate.head()
    engine.dispose()


def erpd_hub(*args: str, url: str, home: Path) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "ERPD_DATABASE_URL": url, "ERPD_HOME": str(home)}
    exe = Path(sys.executable).with_name("erpd-hub")
    return subprocess.run([str(exe), *args], env=env, capture_output=True, text=True, timeout=120)


@pytest.mark.parametrize("backend", BACKENDS)
def test_erpd_hub_migrate_and_create_key(databases: Databases, tmp_path: Path, backend) -> None:
    url = databases.new_url(backend)
    early = erpd_hub("create-key", "ci", url=url, home=tmp_path)
    assert early.returncode == 1 and "run `erpd-hub migrate`" in early.stderr
    assert "Traceback" not in early.stderr
    first = erpd_hub("migrate", url=url, home=tmp_path)
    assert first.returncode == 0, first.stderr
    assert f"revision empty -> {migrate.head()}" in first.stdout
    again = erpd_hub("migrate", url=url, home=tmp_path)  # idempotent
    assert again.returncode == 0 and f"{migrate.head()} -> {migrate.head()}" in again.stdout
    made = erpd_hub("create-key", "ci", url=url, home=tmp_path)
    assert made.returncode == 0, made.stderr
    secret = made.stdout.strip()
    engine = make_engine(url)
    with session_factory(engine)() as s:
        key = authenticate(s, secret=secret)
        assert key is not None and key.name == "ci"
    engine.dispose()
    prefix = secret[:12]
    assert erpd_hub("revoke-key", "erpd_nomatch", url=url, home=tmp_path).returncode == 2
    revoked = erpd_hub("revoke-key", prefix, url=url, home=tmp_path)
    assert revoked.returncode == 0 and "revoked key" in revoked.stdout, revoked.stderr
    engine = make_engine(url)
    with session_factory(engine)() as s:
        assert authenticate(s, secret=secret) is None
    engine.dispose()
    down = erpd_hub("migrate", "--downgrade", "base", url=url, home=tmp_path)
    assert down.returncode == 0 and "-> empty" in down.stdout


def test_the_default_store_is_a_sqlite_file_under_erpd_home(tmp_path: Path) -> None:
    env = {k: v for k, v in os.environ.items() if k != "ERPD_DATABASE_URL"}
    env["ERPD_HOME"] = str(tmp_path / "home")
    exe = Path(sys.executable).with_name("erpd-hub")
    done = subprocess.run(
        [str(exe), "migrate"], env=env, capture_output=True, text=True, cwd=tmp_path, timeout=120
    )
    assert done.returncode == 0, done.stderr
    assert (tmp_path / "home" / "erpd.db").is_file()


@pytest.mark.parametrize(
    ("url", "code", "message"),
    [
        ("mysql://x/y", 2, "ERPD_DATABASE_URL: Value error, must be a sqlite"),
        ("postgresql+psycopg://postgres@127.0.0.1:1/none", 1, "database unreachable"),
        ("postgresql+nodriver://x/y", 2, "ERPD_DATABASE_URL: Can't load plugin"),
    ],
)
def test_bad_database_urls_give_one_line(tmp_path: Path, url: str, code: int, message: str) -> None:
    done = erpd_hub("migrate", url=url, home=tmp_path)
    assert done.returncode == code and message in done.stderr, done.stderr
    assert "Traceback" not in done.stderr and len(done.stderr.strip().splitlines()) <= 2


def test_the_server_never_imports_torch() -> None:
    code = (
        "import sys, server.cli, server.db, server.services, server.db.migrate;"
        "assert 'torch' not in sys.modules, 'torch imported'"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr


@pytest.mark.parametrize("backend", BACKENDS)
def test_upgrades_keep_existing_rows(databases: Databases, backend) -> None:
    """SQLite batch migrations rebuild tables; with foreign keys on, the rebuild's DROP TABLE
    would cascade-delete (or refuse) every child row. Rows written at 0001 survive to head."""
    engine = make_engine(databases.new_url(backend))
    migrate.upgrade(engine, "0001")
    model, dataset, run = (uuid.uuid4().hex for _ in range(3))
    now = datetime.now(UTC).replace(tzinfo=None)
    with engine.begin() as conn:
        for table, ident, name in (("models", model, "tiny"), ("datasets", dataset, "arith")):
            conn.execute(
                text(
                    f"insert into {table} (id, name, kind, location, metadata, created_at) "
                    "values (:i, :n, 'builtin', :n, '{}', :t)"
                ),
                {"i": ident, "n": name, "t": now},
            )
        conn.execute(
            text(
                "insert into runs (id, name, kind, round, status, attempt, max_attempts, config,"
                " model_id, dataset_id, cancel_requested, created_at, summary) values (:i, 'r',"
                " 'stage1', 0, 'queued', 0, 3, '{}', :m, :d, false, :t, '{}')"
            ),
            {"i": run, "m": model, "d": dataset, "t": now},
        )
        conn.execute(
            text(
                "insert into run_events (run_id, at, event, to_status, attempt, actor) "
                "values (:i, :t, 'created', 'queued', 0, 'x')"
            ),
            {"i": run, "t": now},
        )
        conn.execute(
            text(
                "insert into metric_points (run_id, name, step, value, wall_time) "
                "values (:i, 'loss', 1, 0.5, 1.0)"
            ),
            {"i": run},
        )

    def counts() -> dict[str, int]:
        with engine.connect() as conn:
            tables = ("models", "datasets", "runs", "run_events", "metric_points")
            return {t: conn.execute(text(f"select count(*) from {t}")).scalar_one() for t in tables}

    kept = dict.fromkeys(("models", "datasets", "runs", "run_events", "metric_points"), 1)
    migrate.upgrade(engine)
    assert counts() == kept
    if backend == "sqlite":  # the connection the migration used is back in the pool, as it was
        with engine.connect() as conn:
            assert conn.exec_driver_sql("PRAGMA foreign_keys").scalar_one() == 1
    migrate.downgrade(engine, "0001")
    assert counts() == kept
    engine.dispose()


@pytest.mark.parametrize("workers", [1, 2])
def test_erpd_hub_serve_binds_loopback_and_answers(
    databases: Databases, tmp_path: Path, workers: int
) -> None:
    import signal
    import socket

    import httpx

    url = databases.new_url("sqlite")
    refused = erpd_hub("serve", url=url, home=tmp_path)
    assert refused.returncode == 1 and "run `erpd-hub migrate`" in refused.stderr
    assert erpd_hub("migrate", url=url, home=tmp_path).returncode == 0
    with socket.socket() as probe:  # a free port (released for the server to bind)
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    env = {
        **os.environ,
        "ERPD_DATABASE_URL": url,
        "ERPD_HOME": str(tmp_path),
        "ERPD_PORT": str(port),
        "ERPD_BROKER_URL": "redis://127.0.0.1:6379/0",
        "ERPD_API_WORKERS": str(workers),
    }
    exe = Path(sys.executable).with_name("erpd-hub")
    server = subprocess.Popen([str(exe), "serve"], env=env, stderr=subprocess.PIPE, text=True)
    try:
        assert server.stderr is not None
        lines: list[str] = []
        for line in server.stderr:  # wait until every API process says it started, not a timer
            lines.append(line)
            started = sum("Application startup complete" in x for x in lines)
            if started == workers and any("Uvicorn running on" in x for x in lines):
                break
        assert any(f"http://127.0.0.1:{port}" in line for line in lines), lines
        assert sum("Started server process" in x for x in lines) == workers, lines
        assert httpx.get(f"http://127.0.0.1:{port}/api/v1/healthz").json() == {"status": "ok"}
        assert httpx.get(f"http://127.0.0.1:{port}/api/v1/runs").status_code == 401
    finally:
        server.send_signal(signal.SIGTERM)
        rest = server.communicate(timeout=30)[1]
    # uvicorn shuts down gracefully, then re-raises the signal it caught (exit status -15)
    assert server.returncode in (0, -signal.SIGTERM) and "Finished server process" in rest
