"""Webhooks: the allow-list, the notify message on the housekeeping queue, and delivery by a real
Celery worker process to a real local HTTP server that fails the first attempts: retried through
the task queue with backoff, signed as Standard Webhooks specifies (checked here with an
independent HMAC)."""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import os
import random
import secrets
import subprocess
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, HTTPServer
from pathlib import Path

import pytest

from server.services.webhooks import NOTIFY_TASK, backoff_s
from tests.integration.conftest import Api, Databases, Live, make_api, start_live


class Receiver:
    """A local HTTP endpoint answering with the scripted status codes, recording each request's
    headers and raw body."""

    def __init__(self, statuses: list[int]) -> None:
        self.statuses = list(statuses)
        self.bodies: list[dict] = []
        self.requests: list[tuple[dict[str, str], bytes]] = []
        self.arrived = threading.Condition()
        receiver = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                length = int(self.headers["Content-Length"])
                raw = self.rfile.read(length)
                with receiver.arrived:
                    receiver.requests.append(({k.lower(): v for k, v in self.headers.items()}, raw))
                    receiver.bodies.append(json.loads(raw))
                    receiver.arrived.notify_all()
                    status = receiver.statuses.pop(0) if receiver.statuses else 200
                self.send_response(status)
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


def test_backoff_doubles_with_jitter_up_to_the_cap() -> None:
    rng = random.Random(0)
    waits = [backoff_s(n, base_s=1.0, cap_s=30.0, rng=rng) for n in range(8)]
    for n, wait in enumerate(waits):
        ceiling = min(30.0, 2.0**n)
        assert ceiling / 2 <= wait <= ceiling
    assert len(set(waits)) == len(waits)  # jittered: never the same schedule twice
    assert backoff_s(0, base_s=1.0, cap_s=30.0, asked_s=20.0) == 20.0  # Retry-After wins
    assert backoff_s(0, base_s=1.0, cap_s=30.0, asked_s=3600.0) == 30.0  # within the cap


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


def test_a_cancelled_input_cancels_the_whole_pipeline_and_queues_its_one_webhook(
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
        assert statuses == ["cancelled"] * 6  # cancelled like their input, not 'failed'
        last = api.get(f"/runs/{runs[-1]}").json()
        assert "failed" not in last["error"] and "cancelled" in last["error"]
        # round 0's student names the chain back to the cancelled batch, through its teacher or not
        student = api.get(f"/runs/{runs[2]}").json()
        assert student["error"].endswith(f"batch run {runs[0]} cancelled")
        # only the pipeline's last student carries the webhook: one message, queued at once
        assert api.published(api.settings.housekeeping_queue) == [(NOTIFY_TASK, [runs[-1]])]
    finally:
        next(apis, None)


SECRET = "whsec_" + base64.b64encode(secrets.token_bytes(32)).decode()


def verify(secret: str, headers: dict[str, str], raw: bytes) -> bool:
    """The Standard Webhooks check, written from the spec (not the library that signed it)."""
    key = base64.b64decode(secret.removeprefix("whsec_"))
    signed = f"{headers['webhook-id']}.{headers['webhook-timestamp']}.".encode() + raw
    expected = base64.b64encode(hmac.new(key, signed, hashlib.sha256).digest()).decode()
    offered = [s.partition(",")[2] for s in headers["webhook-signature"].split()]
    return any(hmac.compare_digest(expected, sig) for sig in offered)


@pytest.fixture(scope="module")
def hooks(databases: Databases, tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple]:
    """An API server and a real worker process whose housekeeping worker delivers webhooks,
    retrying quickly (3 attempts, 50 ms backoff) under a known secret."""
    from tests.integration.test_worker import start_worker

    servers = start_live(databases, tmp_path_factory.mktemp("hooks"), webhook_hosts=["127.0.0.1"])
    live: Live = next(servers)
    s = live.settings
    env = {
        **os.environ,
        "ERPD_HOME": str(s.home),
        "ERPD_DATABASE_URL": s.db_url,
        "ERPD_BROKER_URL": s.broker,
        "ERPD_QUEUE": s.queue,
        "ERPD_HOUSEKEEPING_QUEUE": s.housekeeping_queue,
        "ERPD_WEBHOOK_SECRET": SECRET,
        "ERPD_WEBHOOK_ATTEMPTS": "3",
        "ERPD_WEBHOOK_BACKOFF_S": "0.05",
    }
    worker, log = start_worker(env)
    yield live, log
    worker.terminate()
    try:
        worker.wait(timeout=60)
    except subprocess.TimeoutExpired:
        os.killpg(worker.pid, 9)
    next(servers, None)


def _cancelled_run(live: Live, url: str) -> str:
    # pinned to a GPU no worker serves: it stays queued, so the cancel ends it at once
    body = {"kind": "sample", "notify_url": url, "gpu": 63}
    made = live.http.post("/runs", json=body)
    assert made.status_code == 201, made.text
    assert live.http.post(f"/runs/{made.json()['id']}/cancel").json()["status"] == "cancelled"
    return str(made.json()["id"])


@pytest.mark.parametrize("receiver", [[503, 502]], indirect=True)
def test_a_failing_receiver_gets_the_same_signed_message_until_it_takes_it(
    hooks: tuple, receiver: Receiver
) -> None:
    live, _ = hooks
    run_id = _cancelled_run(live, receiver.url)
    bodies = receiver.wait_for(3)
    assert [b["run"] for b in bodies] == [run_id] * 3 and bodies[0]["event"] == "run.cancelled"
    ids = {headers["webhook-id"] for headers, _ in receiver.requests}
    assert len(ids) == 1  # one message, retried: the receiver can drop repeats by its id
    for headers, raw in receiver.requests:
        assert verify(SECRET, headers, raw), headers
        assert not verify("whsec_" + base64.b64encode(b"x" * 32).decode(), headers, raw)
    stamps = [int(h["webhook-timestamp"]) for h, _ in receiver.requests]
    assert stamps == sorted(stamps)


@pytest.mark.parametrize("receiver", [[410]], indirect=True)
def test_a_refusal_is_final(hooks: tuple, receiver: Receiver) -> None:
    live, log = hooks
    run_id = _cancelled_run(live, receiver.url)
    log.wait_for(f"webhook of run {run_id} to {receiver.url} given up after 1 attempts")
    assert len(receiver.requests) == 1


@pytest.mark.parametrize("receiver", [[500] * 5], indirect=True)
def test_delivery_is_given_up_after_the_attempts(hooks: tuple, receiver: Receiver) -> None:
    live, log = hooks
    run_id = _cancelled_run(live, receiver.url)
    log.wait_for(f"webhook of run {run_id} to {receiver.url} given up after 3 attempts")
    assert len(receiver.requests) == 3


def test_an_unset_secret_is_generated_once_and_kept(tmp_path: Path) -> None:
    from server.services.webhooks import signing_secret
    from server.settings import Settings

    settings = Settings(home=tmp_path)
    first = signing_secret(settings)
    assert first.startswith("whsec_") and len(base64.b64decode(first[6:])) == 32
    assert signing_secret(settings) == first
    assert (tmp_path / "webhook-secret").stat().st_mode & 0o777 == 0o600
