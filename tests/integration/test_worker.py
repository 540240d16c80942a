"""Real Celery worker processes running ERPD stages submitted through the real API (Postgres,
Redis, uvicorn), awaited through the run's own event stream."""

from __future__ import annotations

import io
import os
import subprocess
import sys
import tarfile
import threading
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from transformers import AutoModelForCausalLM

from server.db import Model, RegistryKind, make_engine, session_factory
from server.services import register
from tests.integration.conftest import Databases, Live, start_live
from tests.integration.test_api_stream import sse_events

# a small but real pipeline: the base is pretrained to 30% on the arithmetic task first
BASE = {"target_acc": 0.3, "eval_size": 100}
PIPELINE = {
    "model": "tiny-test",
    "sample": {"num_prompts": 64, "group_size": 8},
    "teachers": [
        {"objective": "sapo", "epochs": 6, "eval_every_epochs": 3},
        {"objective": "ce", "epochs": 6, "eval_every_epochs": 3},
    ],
    "stage2": {"epochs": 2},
    "eval": {"size": 200},
    "runtime": {"device": "cpu"},
}


class WorkerLog:
    """A worker process's stderr, drained by a thread (a full pipe would block the worker) into
    lines that a test can wait on."""

    def __init__(self, process: subprocess.Popen[str]) -> None:
        self.lines: list[str] = []
        self.changed = threading.Condition()
        assert process.stderr is not None
        self.stream = process.stderr
        self.thread = threading.Thread(target=self._drain, daemon=True)
        self.thread.start()

    def _drain(self) -> None:
        for line in self.stream:
            with self.changed:
                self.lines.append(line)
                self.changed.notify_all()
        with self.changed:
            self.lines.append("<exited>")
            self.changed.notify_all()

    def wait_for(self, text: str, timeout: float = 300) -> str:
        with self.changed:
            self.changed.wait_for(
                lambda: any(text in line or line == "<exited>" for line in self.lines), timeout
            )
            match = next((line for line in self.lines if text in line), None)
        if match is None:
            raise AssertionError(f"worker never logged {text!r}:\n" + "".join(self.lines[-40:]))
        return match


def start_worker(env: dict[str, str]) -> tuple[subprocess.Popen[str], WorkerLog]:
    exe = Path(sys.executable).with_name("erpd-hub")
    worker = subprocess.Popen(
        [str(exe), "worker"], env=env, stderr=subprocess.PIPE, stdout=subprocess.DEVNULL, text=True
    )
    log = WorkerLog(worker)
    log.wait_for(" ready.", timeout=120)  # celery's own "ready." line, not a timer
    return worker, log


class Stack:
    def __init__(self, live: Live) -> None:
        self.live = live
        self.worker: subprocess.Popen[str] | None = None
        self.log: WorkerLog | None = None

    def env(self) -> dict[str, str]:
        s = self.live.settings
        return {
            **os.environ,
            "ERPD_HOME": str(s.home),
            "ERPD_DATABASE_URL": s.db_url,
            "ERPD_BROKER_URL": s.broker,
            "ERPD_QUEUE": s.queue,
            "ERPD_HOUSEKEEPING_QUEUE": s.housekeeping_queue,
            "ERPD_HEARTBEAT_S": "1",
        }

    def start_worker(self) -> None:
        self.worker, self.log = start_worker(self.env())

    def stop_worker(self) -> None:
        if self.worker is not None and self.worker.poll() is None:
            self.worker.terminate()
            self.worker.wait(timeout=60)

    def wait_until_finished(self, run_id: str) -> str:
        """The run's final status, awaited on its server-sent event stream."""
        status = "unknown"
        timeout = httpx.Timeout(30, read=600)
        with self.live.http.stream("GET", f"/runs/{run_id}/stream", timeout=timeout) as response:
            for kind, body in sse_events(response):
                if kind == "status":
                    status = body["status"]
                if kind == "end":
                    return status
        return status


@pytest.fixture
def stack(databases: Databases, tmp_path: Path) -> Iterator[Stack]:
    servers = start_live(databases, tmp_path)
    live = next(servers)
    engine = make_engine(live.settings.db_url)
    with session_factory(engine).begin() as s:
        register(
            s,
            Model,
            name="tiny-test",
            kind=RegistryKind.BUILTIN,
            location="tiny",
            meta={"base": BASE},
        )
    engine.dispose()
    stack = Stack(live)
    stack.start_worker()
    yield stack
    stack.stop_worker()
    next(servers, None)


def test_a_pipeline_runs_to_a_student_that_loads(stack: Stack, tmp_path: Path) -> None:
    made = stack.live.http.post("/pipelines", json=PIPELINE)
    assert made.status_code == 201, made.text
    sample, t1, t2, student = made.json()["runs"]
    assert stack.wait_until_finished(student) == "succeeded"
    for run_id in (sample, t1, t2, student):
        run = stack.live.http.get(f"/runs/{run_id}").json()
        assert run["status"] == "succeeded" and run["attempt"] == 1, run
    detail = stack.live.http.get(f"/runs/{student}").json()
    assert all(t["sha256"] for t in detail["teachers"])
    assert detail["kl_spent"] is not None and detail["final_accuracy"] is not None
    metrics = stack.live.http.get(f"/runs/{t1}/metrics").json()
    names = {s["name"] for s in metrics["series"]}
    assert {"kl/exact", "loss"} <= names
    [ckpt] = stack.live.http.get(f"/runs/{student}/checkpoints").json()
    assert ckpt["role"] == "student"
    tar = stack.live.http.get(f"/checkpoints/{ckpt['id']}/download")
    with tarfile.open(fileobj=io.BytesIO(tar.content)) as archive:
        archive.extractall(tmp_path / "student", filter="data")
    [folder] = list((tmp_path / "student").iterdir())
    assert AutoModelForCausalLM.from_pretrained(folder) is not None


def test_a_second_delivery_of_the_same_message_does_nothing(stack: Stack) -> None:
    from celery import Celery

    run = stack.live.http.post(
        "/runs",
        json={"kind": "sample", "model": "tiny-test", "config": {"sample": {"num_prompts": 8}}},
    ).json()
    app = Celery(broker=stack.live.settings.broker, set_as_current=False)
    app.send_task("erpd.run_stage", args=[run["id"]], queue=stack.live.settings.queue)
    assert stack.wait_until_finished(run["id"]) == "succeeded"
    # a third copy after it finished: claim refuses it, nothing changes
    app.send_task("erpd.run_stage", args=[run["id"]], queue=stack.live.settings.queue)
    assert stack.log is not None
    stack.log.wait_for(f"run {run['id']}: not claimable")  # the copy was delivered and refused
    events = stack.live.http.get(f"/runs/{run['id']}/events").json()
    assert [e["event"] for e in events] == ["created", "claimed", "succeeded"]
