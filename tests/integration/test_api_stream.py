"""Server-sent events through a real uvicorn server: a client connected to /stream receives the
points written after it connected, the status changes, and the end of the run."""

from __future__ import annotations

import threading
import uuid
from collections.abc import Iterator

import httpx

from erpd import metrics as M
from erpd_hub.client import server_sent_events
from server.db import make_engine, session_factory
from server.services import Point, claim_run, complete_run, record_metrics
from tests.integration.conftest import Live


def sse_events(response: httpx.Response) -> Iterator[tuple[str, dict]]:
    return server_sent_events(response.iter_lines())


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


def test_parallel_submissions_cannot_beat_the_quota(databases, tmp_path) -> None:  # type: ignore[no-untyped-def]
    from concurrent.futures import ThreadPoolExecutor

    from tests.integration.conftest import start_live

    servers = start_live(databases, tmp_path, max_active_runs=3)
    live = next(servers)
    try:
        barrier = threading.Barrier(12)

        def submit(_: int) -> int:
            with httpx.Client(base_url=f"{live.base}/api/v1", timeout=60) as client:
                barrier.wait()
                headers = {"Authorization": f"Bearer {live.secret}"}
                return client.post("/runs", json={"kind": "sample"}, headers=headers).status_code

        with ThreadPoolExecutor(12) as pool:
            statuses = sorted(pool.map(submit, range(12)))
        assert statuses == [201] * 3 + [429] * 9
        assert len(live.http.get("/runs").json()["items"]) == 3
    finally:
        next(servers, None)


def test_a_stream_ends_when_its_key_is_revoked(live: Live) -> None:
    from server.services import authenticate, revoke_api_key

    run = live.http.post("/runs", json={"kind": "sample"}).json()
    factory = session_factory(make_engine(live.settings.db_url))
    with live.http.stream("GET", f"/runs/{run['id']}/stream") as response:
        events = sse_events(response)
        assert next(events)[0] == "status"
        with factory.begin() as s:
            key = authenticate(s, secret=live.secret)
            assert key is not None
            revoke_api_key(s, key_id=key.id)
        assert list(events) == [("end", {})]


def test_a_backlog_larger_than_one_event_arrives_whole(live: Live) -> None:
    """A client joining a long run gets every point, in events of at most 5,000."""
    from server.api.stream import MAX_POINTS_PER_EVENT

    run_id = uuid.UUID(live.http.post("/runs", json={"kind": "sample"}).json()["id"])
    factory = session_factory(make_engine(live.settings.db_url))
    steps = range(3 * MAX_POINTS_PER_EVENT)  # two series: six of the largest events
    with factory.begin() as s:
        claim_run(s, run_id=run_id, worker="w", device="cpu")
        points = [Point(i, name, float(i), 0.0) for i in steps for name in (M.LOSS, M.KL_K3)]
        record_metrics(s, run_id=run_id, points=points)
        complete_run(s, run_id=run_id, attempt=1, summary={}, actor="w")
    with live.http.stream("GET", f"/runs/{run_id}/stream") as response:
        got = [body["points"] for kind, body in sse_events(response) if kind == "metrics"]
    assert all(len(event) <= MAX_POINTS_PER_EVENT for event in got) and len(got) >= 2
    seen = sorted((p["name"], p["step"]) for event in got for p in event)
    assert seen == sorted((name, i) for i in steps for name in (M.LOSS, M.KL_K3))
