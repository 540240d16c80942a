"""The run store under test: a real Postgres (a database of its own per test session, created on
the machine's server and dropped afterwards) and a real SQLite file, both migrated by Alembic."""

from __future__ import annotations

import base64
import json
import os
import socket
import threading
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import uvicorn
from fastapi.testclient import TestClient
from sqlalchemy import Engine, create_engine, text
from sqlalchemy.engine import make_url
from sqlalchemy.orm import Session, sessionmaker

from server.db import Base, Dataset, Model, make_engine, migrate, session_factory
from server.main import create_app
from server.services import create_api_key, ensure_builtins
from server.settings import Settings

# the machine's Postgres (scripts/services.sh starts it); override to point at another server
POSTGRES_URL = os.environ.get(
    "ERPD_TEST_POSTGRES_URL", "postgresql+psycopg://postgres@127.0.0.1:5432/test"
)
BACKENDS = ["sqlite", "postgres"]


class Databases:
    """Creates empty databases on demand and drops them at the end of the session."""

    def __init__(self, tmp: Path, server_url: str = POSTGRES_URL) -> None:
        self.tmp, self.server_url = tmp, server_url
        self.admin = create_engine(server_url, isolation_level="AUTOCOMMIT")
        self.created: list[str] = []

    def new_url(self, backend: str) -> str:
        name = f"erpd_test_{uuid.uuid4().hex[:12]}"
        if backend == "sqlite":
            return f"sqlite:///{self.tmp / name}.db"
        with self.admin.connect() as conn:
            conn.execute(text(f'CREATE DATABASE "{name}"'))
        self.created.append(name)
        return make_url(self.server_url).set(database=name).render_as_string(hide_password=False)

    def drop_all(self) -> None:
        with self.admin.connect() as conn:
            for name in self.created:
                conn.execute(text(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))
        self.admin.dispose()


@pytest.fixture(scope="session")
def databases(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Databases]:
    dbs = Databases(tmp_path_factory.mktemp("db"))
    yield dbs
    dbs.drop_all()


@pytest.fixture(scope="session", params=BACKENDS)
def store_engine(request: pytest.FixtureRequest, databases: Databases) -> Iterator[Engine]:
    """One migrated database per backend, shared by the tests (emptied after each)."""
    engine = make_engine(databases.new_url(request.param))
    migrate.upgrade(engine)
    yield engine
    engine.dispose()


@pytest.fixture
def factory(store_engine: Engine) -> Iterator[sessionmaker[Session]]:
    yield session_factory(store_engine)
    with store_engine.begin() as conn:
        for table in reversed(Base.metadata.sorted_tables):
            conn.execute(table.delete())


@pytest.fixture
def builtins(factory: sessionmaker[Session]) -> tuple[uuid.UUID, uuid.UUID]:
    """(model id, dataset id) of the built-in tiny model and arithmetic task."""
    with factory.begin() as s:
        ensure_builtins(s)
        model = s.query(Model).filter_by(name="tiny").one()
        dataset = s.query(Dataset).filter_by(name="arithmetic").one()
        return model.id, dataset.id


# --- the REST API against real Postgres and Redis ---------------------------------------------
REDIS_URL = os.environ.get("ERPD_TEST_REDIS_URL", "redis://127.0.0.1:6379/0")


class Api:
    """The app in-process (real ASGI stack, real Postgres, real Redis), with two users' keys."""

    def __init__(self, client: TestClient, settings: Settings, alice: str, bob: str) -> None:
        self.client, self.settings = client, settings
        self.alice, self.bob = alice, bob

    def headers(self, secret: str | None = None) -> dict[str, str]:
        return {"Authorization": f"Bearer {secret or self.alice}"}

    def get(self, path: str, key: str | None = None, **kw: Any) -> httpx.Response:
        return self.client.get(f"/api/v1{path}", headers=self.headers(key), **kw)

    def post(self, path: str, key: str | None = None, **kw: Any) -> httpx.Response:
        headers = self.headers(key) | kw.pop("headers", {})
        return self.client.post(f"/api/v1{path}", headers=headers, **kw)

    def patch(self, path: str, key: str | None = None, **kw: Any) -> httpx.Response:
        return self.client.patch(f"/api/v1{path}", headers=self.headers(key), **kw)

    def published(self, queue: str | None = None) -> list[tuple[str, list[str]]]:
        """(task name, args) of every message waiting on the run queue, oldest first."""
        import redis

        conn = redis.Redis.from_url(REDIS_URL)
        raw = conn.lrange(queue or self.settings.queue, 0, -1)
        conn.close()
        messages = []
        for item in reversed(raw):  # kombu LPUSHes; consumers BRPOP the oldest
            msg = json.loads(item)
            args = json.loads(base64.b64decode(msg["body"]))[0]
            messages.append((msg["headers"]["task"], args))
        return messages


def drop_queues(settings: Settings) -> None:
    """The test's queues, its GPU-pinned ones (`<queue>.N`) included."""
    import redis

    conn = redis.Redis.from_url(REDIS_URL)
    pinned = list(conn.scan_iter(f"{settings.queue}.*"))
    conn.delete(settings.queue, settings.housekeeping_queue, *pinned)
    conn.close()


def api_settings(databases: Databases, tmp: Path, **overrides: Any) -> tuple[Settings, str, str]:
    """A migrated Postgres database with alice's and bob's keys, and settings for an app on it
    (its own Redis queues, so tests never see each other's messages)."""
    url = databases.new_url("postgres")
    engine = make_engine(url)
    migrate.upgrade(engine)
    with session_factory(engine).begin() as s:
        _, alice = create_api_key(s, name="alice")
        _, bob = create_api_key(s, name="bob")
    engine.dispose()
    values: dict[str, Any] = {
        "home": tmp,
        "database_url": url,
        "broker_url": REDIS_URL,
        "queue": f"test-{uuid.uuid4().hex[:10]}",
        "housekeeping_queue": f"test-cpu-{uuid.uuid4().hex[:10]}",
    }
    return Settings(**(values | overrides)), alice, bob


def make_api(databases: Databases, tmp: Path, **overrides: Any) -> Iterator[Api]:
    settings, alice, bob = api_settings(databases, tmp, **overrides)
    with TestClient(create_app(settings)) as client:
        yield Api(client, settings, alice, bob)
    drop_queues(settings)


@pytest.fixture
def api(databases: Databases, tmp_path: Path) -> Iterator[Api]:
    yield from make_api(databases, tmp_path)


class Live:
    def __init__(self, base: str, secret: str, settings: Settings) -> None:
        self.base, self.secret, self.settings = base, secret, settings
        self.http = httpx.Client(
            base_url=f"{base}/api/v1", headers={"Authorization": f"Bearer {secret}"}, timeout=30
        )


def free_port() -> int:
    """A port nothing listens on now (for a server a test starts as a process)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def start_live(databases: Databases, tmp_path: Path, **overrides: Any) -> Iterator[Live]:
    """The app under a real uvicorn server on a free port, with alice's key."""
    settings, secret, _ = api_settings(databases, tmp_path, stream_poll_s=0.05, **overrides)
    # bind first: connections wait in the backlog until uvicorn accepts them (no start-up race)
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    sock.listen(16)
    port = sock.getsockname()[1]
    server = uvicorn.Server(uvicorn.Config(create_app(settings), log_level="warning"))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    live = Live(f"http://127.0.0.1:{port}", secret, settings)
    yield live
    live.http.close()
    server.should_exit = True
    thread.join(timeout=30)
    sock.close()
    drop_queues(settings)


@pytest.fixture
def live(databases: Databases, tmp_path: Path) -> Iterator[Live]:
    yield from start_live(databases, tmp_path)
