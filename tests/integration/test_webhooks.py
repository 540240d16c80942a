"""Webhooks: the allow-list, the notify message on the housekeeping queue, and delivery with
retries against a real local HTTP server."""

from __future__ import annotations

import json
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, HTTPServer
from pathlib import Path

import pytest

from server.services.webhooks import NOTIFY_TASK, deliver
from tests.integration.conftest import Api, Databases, make_api


class Receiver:
    """A local HTTP endpoint answering with the scripted status codes, recording bodies."""

    def __init__(self, statuses: list[int]) -> None:
        self.statuses, self.bodies = list(statuses), []
        self.arrived = threading.Condition()
        receiver = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                length = int(self.headers["Content-Length"])
                with receiver.arrived:
                    receiver.bodies.append(json.loads(self.rfile.read(length)))
                    receiver.arrived.notify_all()
                self.send_response(receiver.statuses.pop(0) if receiver.statuses else 200)
                self.end_headers()

            def log_message(self, *args: object) -> None:
                pass

        self.server = HTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_port}/hook"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()

    def wait_for(self, count: int, timeout: float = 120) -> list[dict]:
        """The first `count` bodies, once that many have arrived."""
        with self.arrived:
            if not self.arrived.wait_for(lambda: len(self.bodies) >= count, timeout):
                raise AssertionError(f"{len(self.bodies)} of {count} webhooks arrived")
            return list(self.bodies[:count])

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture
def receiver(request: pytest.FixtureRequest) -> Iterator[Receiver]:
    r = Receiver(getattr(request, "param", []))
    yield r
    r.close()


@pytest.mark.parametrize("receiver", [[503, 502]], indirect=True)
def test_delivery_retries_server_errors_with_backoff(receiver: Receiver) -> None:
    waits: list[float] = []
    assert deliver(receiver.url, {"run": "x"}, backoff_s=0.5, sleep=waits.append)
    assert receiver.bodies == [{"run": "x"}] * 3 and waits == [0.5, 1.0]


@pytest.mark.parametrize("receiver", [[410]], indirect=True)
def test_a_refusal_is_final(receiver: Receiver) -> None:
    waits: list[float] = []
    assert not deliver(receiver.url, {"run": "x"}, sleep=waits.append)
    assert len(receiver.bodies) == 1 and waits == []


def test_an_unreachable_receiver_is_retried_then_given_up() -> None:
    waits: list[float] = []
    assert not deliver("http://127.0.0.1:1/hook", {}, attempts=3, sleep=waits.append)
    assert waits == [1.0, 2.0]


def test_notify_url_must_be_allowed_and_cancel_queues_the_webhook(
    databases: Databases, tmp_path: Path
) -> None:
    apis = make_api(databases, tmp_path, webhook_hosts=["127.0.0.1"])
    api: Api = next(apis)
    try:
        refused = api.post("/runs", json={"kind": "sample", "notify_url": "http://10.0.0.1/h"})
        assert refused.status_code == 422 and refused.json()["error"]["field"] == "notify_url"
        run = api.post("/runs", json={"kind": "sample", "notify_url": "http://127.0.0.1:9/h"})
        assert run.status_code == 201
        api.post(f"/runs/{run.json()['id']}/cancel")
        queue = api.settings.housekeeping_queue
        assert api.published(queue) == [(NOTIFY_TASK, [run.json()["id"]])]
    finally:
        next(apis, None)


def test_a_cancelled_input_fails_the_whole_pipeline_and_queues_its_one_webhook(
    databases: Databases, tmp_path: Path
) -> None:
    apis = make_api(databases, tmp_path, webhook_hosts=["127.0.0.1"])
    api: Api = next(apis)
    try:
        made = api.post("/pipelines", json={"rounds": 2, "notify_url": "http://127.0.0.1:9/h"})
        assert made.status_code == 201, made.text
        runs = made.json()["runs"]
        assert len(runs) == 2 * 3  # sample, one teacher, student per round
        assert api.post(f"/runs/{runs[0]}/cancel").json()["status"] == "cancelled"
        statuses = [api.get(f"/runs/{r}").json()["status"] for r in runs]
        assert statuses == ["cancelled"] + ["failed"] * 5
        last = api.get(f"/runs/{runs[-1]}").json()
        assert "failed" in last["error"] and f"{runs[0]} cancelled" in last["error"]
        # only the pipeline's last student carries the webhook: one message, queued at once
        assert api.published(api.settings.housekeeping_queue) == [(NOTIFY_TASK, [runs[-1]])]
    finally:
        next(apis, None)
