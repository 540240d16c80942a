"""The API never hangs on a dependency, and every request ends with a status.

Each test injects the fault for real: a Redis server of the test's own frozen with SIGSTOP, a
table locked by another connection, a Postgres server of the test's own restarted under load, a
run with 240,000 metric points read by 20 clients at once.
"""

from __future__ import annotations

import os
import signal
import statistics
import subprocess
import tempfile
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import httpx
import pytest
import redis
from sqlalchemy import text

from erpd import metrics as M
from server.db import make_engine, migrate, session_factory
from server.services import Point, create_api_key, record_metrics
from tests.integration.conftest import Api, Databases, Live, free_port, make_api, start_live
from tests.integration.private_postgres import PrivatePostgres

STAGE1 = {"kind": "stage1", "config": {"stage": {"epochs": 4}}}


def until(condition: Callable[[], bool], timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"not within {timeout} s: {what}")
        time.sleep(0.05)


def timed(call: Callable[[], httpx.Response]) -> tuple[httpx.Response, float]:
    started = time.monotonic()
    response = call()
    return response, time.monotonic() - started


class PrivateRedis:
    """A redis-server of the test's own on a free port, so the test can freeze it."""

    def __init__(self) -> None:
        self.port = free_port()
        self.dir = tempfile.mkdtemp(prefix="erpd-redis-")
        self.proc = subprocess.Popen(
            [
                *("redis-server", "--port", str(self.port), "--bind", "127.0.0.1"),
                *("--save", "", "--appendonly", "no", "--dir", self.dir),
            ],
            stdout=subprocess.DEVNULL,
        )
        self.url = f"redis://127.0.0.1:{self.port}/0"
        self.client = redis.Redis(port=self.port, socket_timeout=5)
        until(self._up, 10, "redis-server answers")

    def _up(self) -> bool:
        try:
            return bool(self.client.ping())
        except redis.ConnectionError:
            return False

    def freeze(self) -> None:
        os.kill(self.proc.pid, signal.SIGSTOP)  # accepts connections, never answers

    def thaw(self) -> None:
        os.kill(self.proc.pid, signal.SIGCONT)

    def close(self) -> None:
        self.thaw()
        self.client.close()
        self.proc.terminate()
        self.proc.wait(timeout=10)


@pytest.fixture
def frozen_redis() -> Iterator[PrivateRedis]:
    if subprocess.run(["which", "redis-server"], capture_output=True).returncode != 0:
        pytest.skip("no redis-server binary")
    server = PrivateRedis()
    yield server
    server.close()


def published_ids(server: PrivateRedis, queue: str) -> set[str]:
    import base64
    import json

    raw = server.client.lrange(queue, 0, -1)
    return {json.loads(base64.b64decode(json.loads(m)["body"]))[0][0] for m in raw}


def test_a_frozen_broker_delays_no_request_and_its_runs_go_out_after_the_thaw(
    databases: Databases, tmp_path: Path, frozen_redis: PrivateRedis
) -> None:
    live = next(
        gen := start_live(
            databases,
            tmp_path,
            broker_url=frozen_redis.url,
            broker_timeout_s=0.5,
            readyz_timeout_s=1.0,
            outbox_interval_s=0.2,
        )
    )
    try:
        assert live.http.get("/readyz").status_code == 200
        frozen_redis.freeze()
        posts = 45
        with ThreadPoolExecutor(posts) as pool:
            submitted = [pool.submit(timed, lambda: live.http.post("/runs", json=STAGE1))]
            submitted += [
                pool.submit(timed, lambda: live.http.post("/runs", json=STAGE1))
                for _ in range(posts - 1)
            ]
            # while the POSTs are in flight: liveness from the event loop, readiness bounded
            health = [timed(lambda: httpx.get(f"{live.base}/api/v1/healthz")) for _ in range(5)]
            ready, ready_s = timed(lambda: live.http.get("/readyz"))
            made = [f.result() for f in submitted]
        assert all(r.status_code == 200 for r, _ in health)
        assert max(s for _, s in health) < 1.0, [s for _, s in health]
        assert ready.status_code == 503 and ready.json()["checks"]["broker"] != "ok"
        assert ready_s < 3.0
        assert all(r.status_code == 201 for r, _ in made), {r.status_code for r, _ in made}
        # no POST waits on the broker (before: each blocked for the whole freeze)
        assert max(s for _, s in made) < 5.0, sorted(s for _, s in made)[-5:]
        ids = {r.json()["id"] for r, _ in made}
        assert len(ids) == posts
        frozen_redis.thaw()
        queue = live.settings.queue
        until(lambda: published_ids(frozen_redis, queue) >= ids, 20, "every run is published")
        assert live.http.get("/readyz").status_code == 200
    finally:
        frozen_redis.thaw()
        next(gen, None)


@pytest.fixture
def slow_db_api(databases: Databases, tmp_path: Path) -> Iterator[Api]:
    yield from make_api(databases, tmp_path, db_statement_timeout_s=0.5)


def test_a_statement_over_the_timeout_is_a_503_with_retry_after(slow_db_api: Api) -> None:
    api = slow_db_api
    assert api.post("/runs", json=STAGE1).status_code == 201
    engine = make_engine(api.settings.db_url)
    try:
        with engine.connect() as locker:  # another client holds the table: reads queue on it
            locker.execute(text("LOCK TABLE runs IN ACCESS EXCLUSIVE MODE"))
            for call in (lambda: api.get("/runs"), lambda: api.post("/runs", json=STAGE1)):
                response, took = timed(call)
                assert response.status_code == 503, response.text
                assert response.json()["error"]["code"] == "unavailable"
                assert "in time" in response.json()["error"]["message"]
                assert response.headers["Retry-After"].isdigit() and took < 5.0
            locker.rollback()
    finally:
        engine.dispose()
    assert len(api.get("/runs").json()["items"]) == 1  # the refused POST stored nothing


def test_405_names_the_allowed_methods_and_401_the_scheme(api: Api) -> None:
    refused = api.client.delete("/api/v1/healthz")
    assert refused.status_code == 405 and refused.headers["Allow"] == "GET"
    assert refused.json()["error"]["code"] == "method_not_allowed"
    for headers in ({}, {"Authorization": "Bearer erpd_nope"}):
        missing = api.client.get("/api/v1/runs", headers=headers)
        assert missing.status_code == 401 and missing.headers["WWW-Authenticate"] == "Bearer"


@pytest.fixture
def private_pg(databases: Databases) -> Iterator[PrivatePostgres]:
    pg = PrivatePostgres()
    pg.start()
    yield pg
    pg.close()


def test_a_postgres_restart_under_load_answers_every_request_with_a_status(
    private_pg: PrivatePostgres, tmp_path: Path
) -> None:
    gen = _serve(private_pg.url, tmp_path)
    live = next(gen)
    run = live.http.post("/runs", json=STAGE1).json()["id"]
    outcomes: list[int | str] = []
    stop = threading.Event()

    def reader(path: str) -> None:
        with httpx.Client(base_url=live.http.base_url, headers=live.http.headers, timeout=30) as c:
            while not stop.is_set():  # one keep-alive connection, as a load tool would
                try:
                    r = c.get(path)
                    outcomes.append(r.status_code)
                    if r.status_code == 503:
                        assert r.headers["Retry-After"] and r.json()["error"]["code"]
                except httpx.TransportError as exc:  # a response cut off without a status
                    outcomes.append(type(exc).__name__)

    paths = ["/runs?limit=50", f"/runs/{run}", f"/runs/{run}/events", f"/runs/{run}/metrics"]
    threads = [threading.Thread(target=reader, args=(p,)) for p in paths * 3]
    try:
        for t in threads:
            t.start()
        until(lambda: len(outcomes) > 20, 20, "the readers are under way")
        for _ in range(3):
            private_pg.stop()
            down = len(outcomes)
            until(lambda n=down: len(outcomes) > n + 20, 20, "requests while it is down")
            private_pg.start()
            up = len(outcomes)
            until(lambda n=up: outcomes[-1] == 200 and len(outcomes) > n + 20, 30, "it is back")
    finally:
        stop.set()
        for t in threads:
            t.join(timeout=30)
        next(gen, None)
    cut_off = [o for o in outcomes if not isinstance(o, int)]
    assert not cut_off, f"{len(cut_off)} of {len(outcomes)} requests got no status: {cut_off[:5]}"
    assert set(outcomes) <= {200, 503}, set(outcomes)
    assert 503 in outcomes and outcomes.count(200) > 40


def _serve(url: str, tmp: Path) -> Iterator[Live]:
    """start_live on a database the test made (the conftest's helper makes its own)."""
    import socket

    import uvicorn

    from server.main import create_app
    from server.settings import Settings

    engine = make_engine(url)
    migrate.upgrade(engine)
    with session_factory(engine).begin() as s:
        _, secret = create_api_key(s, name="alice")
    engine.dispose()
    settings = Settings(
        home=tmp,
        database_url=url,
        broker_url=f"sqla+sqlite:///{tmp / 'broker.db'}",
        db_connect_timeout_s=1,
        db_pool_timeout_s=2,
    )
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    sock.listen(64)
    server = uvicorn.Server(uvicorn.Config(create_app(settings), log_level="warning"))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    live = Live(f"http://127.0.0.1:{sock.getsockname()[1]}", secret, settings)
    yield live
    live.http.close()
    server.should_exit = True
    thread.join(timeout=30)
    sock.close()


# --- heavy metric reads -----------------------------------------------------------------------
STEPS = 60_000  # two series: 120,000 points, over the 100,000 one response may read


@pytest.fixture(scope="module")
def long_run(
    databases: Databases, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[tuple[Live, str]]:
    """One API with one long run, shared by the tests below (writing it takes seconds)."""
    gen = start_live(databases, tmp_path_factory.mktemp("long"))
    live = next(gen)
    run = live.http.post("/runs", json=STAGE1).json()["id"]
    points = [Point(s, M.LOSS, float(s % 1000), 0.0) for s in range(STEPS)]
    points += [Point(s, M.ENTROPY_TOKEN, 1.0, 0.0) for s in range(STEPS)]
    points[STEPS + 47_777] = Point(47_777, M.ENTROPY_TOKEN, -5.0, 0.0)  # a collapse
    engine = make_engine(live.settings.db_url)
    with session_factory(engine).begin() as s:
        record_metrics(s, run_id=uuid.UUID(run), points=points)
    engine.dispose()
    yield live, run
    next(gen, None)


def test_a_long_series_is_read_in_bounded_pages(long_run: tuple[Live, str]) -> None:
    live, run = long_run
    first = live.http.get(f"/runs/{run}/metrics").json()
    assert {s["name"] for s in first["series"]} == {M.LOSS, M.ENTROPY_TOKEN}
    assert all(len(s["steps"]) <= 2_000 and s["downsampled"] for s in first["series"])
    assert first["next_since_step"] is not None and first["next_since_step"] < STEPS - 1
    seen: dict[str, list[int]] = {M.LOSS: [], M.ENTROPY_TOKEN: []}
    minimum = 0.0
    body: dict[str, Any] = first
    pages = 1
    while True:
        for s in body["series"]:
            seen[s["name"]] += s["steps"]
            if s["name"] == M.ENTROPY_TOKEN:
                minimum = min([minimum, *s["values"]])
        if body["next_since_step"] is None:
            break
        body = live.http.get(
            f"/runs/{run}/metrics", params={"since_step": body["next_since_step"]}
        ).json()
        pages += 1
    assert 2 <= pages <= 4 and minimum == -5.0  # the collapse survives the thinning
    for steps in seen.values():
        assert steps == sorted(set(steps)) and steps[0] == 0 and steps[-1] == STEPS - 1
    raw = live.http.get(
        f"/runs/{run}/metrics",
        params={"names": M.LOSS, "since_step": 99, "max_points": 500, "downsample": "false"},
    ).json()
    assert raw["series"][0]["steps"] == list(range(100, 600)) and raw["next_since_step"] == 599
    assert raw["series"][0]["downsampled"] is False
    window = live.http.get(
        f"/runs/{run}/metrics", params={"names": M.LOSS, "since_step": 9, "end_step": 19}
    ).json()
    assert window["series"][0]["steps"] == list(range(10, 20)) and window["next_since_step"] is None
    too_many = live.http.get(f"/runs/{run}/metrics", params={"max_points": 100_001})
    assert too_many.status_code == 422 and too_many.json()["error"]["field"] == "max_points"


def test_heavy_metric_reads_leave_the_rest_of_the_api_answering(
    long_run: tuple[Live, str],
) -> None:
    live, run = long_run

    def runs_page_s() -> float:
        return timed(lambda: live.http.get("/runs", params={"limit": 50}))[1]

    for _ in range(3):  # warm: connections, caches
        runs_page_s()
    unloaded = statistics.median(runs_page_s() for _ in range(7))
    stop = threading.Event()
    reads: list[float] = []

    def reader() -> None:
        with httpx.Client(base_url=live.http.base_url, headers=live.http.headers, timeout=60) as c:
            while not stop.is_set():
                response, took = timed(lambda: c.get(f"/runs/{run}/metrics"))
                assert response.status_code in (200, 503), response.text
                reads.append(took)

    readers = [threading.Thread(target=reader) for _ in range(20)]
    for t in readers:
        t.start()
    try:
        until(lambda: len(reads) >= 4, 60, "the heavy reads are under way")
        loaded = statistics.median(runs_page_s() for _ in range(7))
    finally:
        stop.set()
        for t in readers:
            t.join(timeout=60)
    # before: 217 ms -> 11.8 s (54x) with 20 readers of a 1M-point run. Generous: 2 cores, and
    # the readers' threads still share the interpreter with the page being timed
    print(f"/runs?limit=50: {unloaded:.3f} s alone, {loaded:.3f} s under 20 readers")
    assert loaded < 10 * unloaded + 0.5, f"/runs took {loaded:.3f} s loaded, {unloaded:.3f} s not"


def test_a_read_session_that_cannot_close_still_answers_with_a_status(api: Api) -> None:
    """The connection dies after the route's last read and before its session closes (the
    window a restart hits): the answer is whole, with its status (before, the close raised
    after the response had started, and the client's connection was cut)."""
    from sqlalchemy import event

    run = api.post("/runs", json=STAGE1).json()["id"]
    engine = api.client.app.state.erpd.engine  # type: ignore[attr-defined]
    killer = make_engine(api.settings.db_url)
    doomed: set[int] = set()

    def remember(conn: Any, _c: Any, statement: str, *_: Any) -> None:
        if "run_events" in statement:  # the route's own read (the key check reads api_keys)
            doomed.add(id(conn.connection.dbapi_connection))

    def kill(conn: Any) -> None:
        raw = conn.connection.dbapi_connection
        if id(raw) in doomed:
            doomed.discard(id(raw))
            with killer.connect() as k:
                pid = raw.info.backend_pid
                k.execute(text("select pg_terminate_backend(:pid)"), {"pid": pid})

    event.listen(engine, "after_cursor_execute", remember)
    event.listen(engine, "rollback", kill)
    try:
        events = api.get(f"/runs/{run}/events")
    finally:
        event.remove(engine, "after_cursor_execute", remember)
        event.remove(engine, "rollback", kill)
        killer.dispose()
    assert events.status_code == 200 and [e["event"] for e in events.json()] == ["created"]
    assert api.get(f"/runs/{run}").status_code == 200  # the pool dropped the dead connection
