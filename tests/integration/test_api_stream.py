"""Server-sent events through a real uvicorn server: a client connected to /stream receives the
points written after it connected, the status changes, and the end of the run."""

from __future__ import annotations

import json
import socket
import threading
import uuid
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
import uvicorn

from erpd import metrics as M
from server.db import make_engine, migrate, session_factory
from server.main import create_app
from server.services import Point, claim_run, complete_run, create_api_key, record_metrics
from server.settings import Settings
from tests.integration.conftest import REDIS_URL, Databases


class Live:
    def __init__(self, base: str, secret: str, settings: Settings) -> None:
        self.base, self.secret, self.settings = base, secret, settings
        self.http = httpx.Client(
            base_url=f"{base}/api/v1", headers={"Authorization": f"Bearer {secret}"}, timeout=30
        )


@pytest.fixture
def live(databases: Databases, tmp_path: Path) -> Iterator[Live]:
    url = databases.new_url("postgres")
    engine = make_engine(url)
    migrate.upgrade(engine)
    with session_factory(engine).begin() as s:
        _, secret = create_api_key(s, name="alice")
    engine.dispose()
    settings = Settings(
        home=tmp_path,
        database_url=url,
        broker_url=REDIS_URL,
        queue=f"test-{uuid.uuid4().hex[:10]}",
        stream_poll_s=0.05,
    )
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


def sse_events(response: httpx.Response) -> Iterator[tuple[str, dict]]:
    event, data = "message", []
    for line in response.iter_lines():
        if line.startswith("event:"):
            event = line.split(":", 1)[1].strip()
        elif line.startswith("data:"):
            data.append(line.split(":", 1)[1].strip())
        elif line == "" and data:
            yield event, json.loads("\n".join(data))
            event, data = "message", []


def test_stream_delivers_points_written_after_connecting(live: Live) -> None:
    run = live.http.post("/runs", json={"kind": "sample"}).json()
    run_id = uuid.UUID(run["id"])
    factory = session_factory(make_engine(live.settings.db_url))
    with live.http.stream("GET", f"/runs/{run_id}/stream") as response:
        assert response.status_code == 200
        assert response.headers["content-type"].startswith("text/event-stream")
        events = sse_events(response)
        assert next(events) == (
            "status",
            {"status": "queued", "attempt": 0, "step": None, "total": None},
        )
        with factory.begin() as s:
            claim_run(s, run_id=run_id, worker="w", device="cpu")
        assert next(events)[1]["status"] == "running"
        with factory.begin() as s:
            record_metrics(
                s,
                run_id=run_id,
                points=[
                    Point(1, M.LOSS, 0.5, 0.0),
                    Point(1, M.KL_K3, 0.01, 0.0),
                    Point(2, M.LOSS, 0.4, 0.0),
                ],
            )
        kind, body = next(events)
        assert kind == "metrics"
        assert sorted((p["step"], p["name"], p["value"]) for p in body["points"]) == [
            (1, M.KL_K3, 0.01),
            (1, M.LOSS, 0.5),
            (2, M.LOSS, 0.4),
        ]
        with factory.begin() as s:
            record_metrics(s, run_id=run_id, points=[Point(3, M.LOSS, 0.3, 0.0)])
            complete_run(s, run_id=run_id, attempt=1, summary={}, actor="w")
        rest = list(events)
    kinds = [k for k, _ in rest]
    assert ("metrics", {"points": [{"name": M.LOSS, "step": 3, "value": 0.3}]}) in rest
    assert ("status", {"status": "succeeded", "attempt": 1, "step": None, "total": None}) in rest
    assert kinds[-1] == "end"


def test_stream_of_another_keys_run_is_not_found(live: Live) -> None:
    missing = live.http.get(f"/runs/{uuid.uuid4()}/stream")
    assert missing.status_code == 404 and missing.json()["error"]["code"] == "not_found"
