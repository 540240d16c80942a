"""Real Celery worker processes running ERPD stages submitted through the real API (Postgres,
Redis, uvicorn), awaited through the run's own event stream."""

from __future__ import annotations

import io
import json
import os
import signal
import socket
import subprocess
import sys
import tarfile
import threading
import time
import uuid
from collections.abc import Iterator
from datetime import datetime
from pathlib import Path
from typing import Any

import httpx
import pytest
from sqlalchemy import text
from transformers import AutoModelForCausalLM

from server.db import Model, RegistryKind, make_engine, session_factory
from server.services import create_api_key, register
from tests.integration.conftest import Databases, Live, free_port, start_live
from tests.integration.private_postgres import PrivatePostgres
from tests.integration.test_api_stream import sse_events
from tests.integration.test_webhooks import Receiver

# a small but real pipeline: the base is pretrained to 30% on the arithmetic task first
BASE = {"target_acc": 0.3, "eval_size": 100}
PIPELINE = {  # plumbing, not learning: the demo test runs the full-size pipeline
    "model": "tiny-test",
    "sample": {"num_prompts": 32, "group_size": 8},
    "teachers": [
        {"objective": "sapo", "epochs": 2, "eval_every_epochs": 2},
        {"objective": "ce", "epochs": 2, "eval_every_epochs": 2},
    ],
    "stage2": {"epochs": 1},
    "eval": {"size": 50},
    "runtime": {"device": "cpu"},
}


class WorkerLog:
    """A worker process's stderr, drained by a thread (a full pipe would block the worker) into
    lines that a test can wait on."""

    def __init__(self, process: subprocess.Popen[str], *, stdout: bool = False) -> None:
        self.lines: list[str] = []
        self.changed = threading.Condition()
        stream = process.stdout if stdout else process.stderr
        assert stream is not None
        self.stream = stream
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


def start_worker(
    env: dict[str, str],
    *args: str,
    names: tuple[str, ...] = ("erpd-cpu", "erpd-housekeeping"),
) -> tuple[subprocess.Popen[str], WorkerLog]:
    exe = Path(sys.executable).with_name("erpd-hub")
    worker = subprocess.Popen(
        [str(exe), "worker", *args],
        env=env,
        stderr=subprocess.PIPE,
        stdout=subprocess.DEVNULL,
        text=True,
        start_new_session=True,  # its own process group: SIGKILL takes all of it
    )
    log = WorkerLog(worker)
    host = socket.gethostname()
    for name in names:  # celery's own "ready." lines, not a timer
        log.wait_for(f"{name}@{host} ready.", timeout=120)
    return worker, log


def register_model(db_url: str, name: str, base: dict[str, float]) -> None:
    """The built-in tiny model under another name, pretrained only as far as `base` says."""
    engine = make_engine(db_url)
    with session_factory(engine).begin() as s:
        register(
            s, Model, name=name, kind=RegistryKind.BUILTIN, location="tiny", meta={"base": base}
        )
    engine.dispose()


# a base pretrained in seconds, for tests about the plumbing rather than learning
QUICK_BASE = {"target_acc": 0.05, "min_steps": 1, "max_steps": 30, "eval_size": 10}


def run_quick_sample(http: httpx.Client, model: str = "quick") -> str:
    """Submit a small sample run (by default on the `quick` model); its final status, from its
    event stream."""
    made = http.post(
        "/runs",
        json={"kind": "sample", "model": model, "config": {"sample": {"num_prompts": 4}}},
    )
    assert made.status_code == 201, made.text
    status = "unknown"
    with http.stream("GET", f"/runs/{made.json()['id']}/stream") as response:
        for kind, body in sse_events(response):
            status = body.get("status", status)
            if kind == "end":
                break
    return status


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
            "ERPD_HEARTBEAT_S": str(s.heartbeat_s),
            "ERPD_HEARTBEAT_TIMEOUT_S": str(s.heartbeat_timeout_s),
        }

    def start_worker(self) -> None:
        self.worker, self.log = start_worker(self.env())

    def stop_worker(self) -> None:
        if self.worker is not None and self.worker.poll() is None:
            self.worker.terminate()  # a warm shutdown waits for the stage it runs
            try:
                self.worker.wait(timeout=60)
            except subprocess.TimeoutExpired:
                self.kill_worker()

    def kill_worker(self) -> None:
        """SIGKILL the worker and its Celery child at once: no cleanup, no goodbye."""
        assert self.worker is not None
        os.killpg(self.worker.pid, signal.SIGKILL)
        self.worker.wait(timeout=60)

    def wait_for_step(self, run_id: str, step: int, since: int = -1) -> int:
        """Until the run's stream shows the stage's loss at `step` or later, counting only points
        after `since` (a resumed attempt's new steps); returns the step seen."""
        with self.live.http.stream(
            "GET",
            f"/runs/{run_id}/stream",
            params={"since_step": since},
            timeout=httpx.Timeout(30, read=600),
        ) as response:
            for kind, body in sse_events(response):
                if kind == "metrics":
                    steps = [p["step"] for p in body["points"] if p["name"] == "loss"]
                    if steps and max(steps) >= step:
                        return max(steps)
                if kind == "end":
                    raise AssertionError(f"run {run_id} ended before step {step}")
        raise AssertionError(f"stream of {run_id} closed")

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


@pytest.fixture(scope="module")
def stack(databases: Databases, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    """One API server, one worker and one reaper for the module (the base is pretrained once)."""
    servers = start_live(
        databases,
        tmp_path_factory.mktemp("stack"),
        heartbeat_s=1,
        heartbeat_timeout_s=4,
        webhook_hosts=["127.0.0.1"],
    )
    live = next(servers)
    register_model(live.settings.db_url, "tiny-test", BASE)
    yield from with_reaper(Stack(live))
    next(servers, None)


def with_reaper(stack: Stack) -> Iterator[Stack]:
    """Start the stack's worker and a reaper polling every 0.5 s; stop both after."""
    stack.start_worker()
    exe = Path(sys.executable).with_name("erpd-hub")
    reaper = subprocess.Popen(
        [str(exe), "reaper", "--every", "0.5"],
        env=stack.env(),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    yield stack
    reaper.terminate()
    reaper.wait(timeout=30)
    stack.stop_worker()


def test_a_pipeline_runs_to_a_student_that_loads(stack: Stack, tmp_path: Path) -> None:
    made = stack.live.http.post("/pipelines", json=PIPELINE)
    assert made.status_code == 201, made.text
    sample, t1, t2, student = made.json()["runs"]
    assert stack.wait_until_finished(student) == "succeeded"
    for run_id in (sample, t1, t2, student):
        run = stack.live.http.get(f"/runs/{run_id}").json()
        assert run["status"] == "succeeded" and run["attempt"] == 1, run
        if run["kind"] == "stage1":  # no budget: every step ran, and the progress says so
            assert run["progress"]["step"] == run["progress"]["total"], run["progress"]
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


def test_round_two_trains_from_round_one_s_student_and_the_webhook_fires_once(
    stack: Stack,
) -> None:
    receiver = Receiver([])
    try:
        made = stack.live.http.post(
            "/pipelines",
            json={
                "model": "tiny-test",
                "rounds": 2,
                "sample": {"num_prompts": 16, "group_size": 4},
                "teachers": [{"objective": "sapo", "epochs": 2, "eval_every_epochs": 2}],
                "stage2": {"epochs": 1},
                "eval": {"size": 50},
                "runtime": {"device": "cpu"},
                "notify_url": receiver.url,
            },
        )
        assert made.status_code == 201, made.text
        runs = made.json()["runs"]
        student0, student1 = runs[2], runs[5]
        [hook] = receiver.wait_for(1, timeout=600)  # sent when the last student ended
        assert hook["run"] == student1 and hook["event"] == "run.succeeded", hook
        shown = [stack.live.http.get(f"/runs/{r}").json() for r in runs]
        assert [r["status"] for r in shown] == ["succeeded"] * 6
        [ckpt0] = stack.live.http.get(f"/runs/{student0}/checkpoints").json()
        for later in shown[3:]:
            assert later["round"] == 1 and later["base_run"] == student0
            assert later["base_sha256"] == ckpt0["sha256"]
        [ckpt1] = stack.live.http.get(f"/runs/{student1}/checkpoints").json()
        manifest = stack.live.http.get(f"/checkpoints/{ckpt1['id']}").json()["manifest"]
        assert manifest["base"]["sha256"] == ckpt0["sha256"]  # pi_1 = round 0's student
        assert len(receiver.bodies) == 1  # one webhook per pipeline, not one per run
    finally:
        receiver.close()


def test_a_teacher_changed_on_disk_fails_its_student_with_the_reason(stack: Stack) -> None:
    small = {"sample": {"num_prompts": 8, "group_size": 4}, "runtime": {"device": "cpu"}}
    teacher = stack.live.http.post(
        "/runs",
        json={
            "kind": "stage1",
            "model": "tiny-test",
            "config": small | {"stage": {"epochs": 1}, "eval": {"size": 20}},
        },
    ).json()
    assert stack.wait_until_finished(teacher["id"]) == "succeeded"
    [ckpt] = stack.live.http.get(f"/runs/{teacher['id']}/checkpoints").json()
    folder = stack.live.settings.artifacts / "runs" / uuid.UUID(teacher["id"]).hex / "checkpoint"
    with (folder / "config.json").open("a") as f:  # after its sha256 was pinned
        f.write(" ")
    student = stack.live.http.post(
        "/runs",
        json={
            "kind": "stage2",
            "model": "tiny-test",
            "teachers": [teacher["id"]],
            "config": small | {"stage": {"epochs": 1}, "eval": {"size": 20}},
        },
    ).json()
    assert student["teachers"] == [{"run": teacher["id"], "sha256": ckpt["sha256"]}]
    assert stack.wait_until_finished(student["id"]) == "failed"
    error = stack.live.http.get(f"/runs/{student['id']}").json()["error"]
    assert error.startswith("CheckpointError: ") and "config.json" in error, error
    assert str(stack.live.settings.home) not in error  # no server paths in what users see


def test_a_broken_registered_model_fails_without_naming_server_paths(
    stack: Stack, tmp_path_factory: pytest.TempPathFactory
) -> None:
    folder = tmp_path_factory.mktemp("operator-models") / "broken-model"
    folder.mkdir()
    (folder / "config.json").write_text("{not json")
    engine = make_engine(stack.live.settings.db_url)
    with session_factory(engine).begin() as s:
        register(s, Model, name="broken", kind=RegistryKind.REGISTERED, location=str(folder))
    engine.dispose()
    made = stack.live.http.post(
        "/runs",
        json={"kind": "sample", "model": "broken", "config": {"sample": {"num_prompts": 4}}},
    )
    assert made.status_code == 201, made.text
    assert stack.wait_until_finished(made.json()["id"]) == "failed"
    error = stack.live.http.get(f"/runs/{made.json()['id']}").json()["error"]
    assert error and str(folder.parent) not in error and "operator-models" not in error, error
    assert not any(part in error for part in ("/tmp/", "/root/", "/usr/")), error


def test_cli_verbs_submit_list_follow_and_download_with_a_resume(
    stack: Stack, tmp_path: Path
) -> None:
    exe = str(Path(sys.executable).with_name("erpd-hub"))
    env = stack.env() | {
        "ERPD_API_URL": f"{stack.live.base}/api/v1",
        "ERPD_API_KEY": stack.live.secret,
    }

    def cli(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run([exe, *args], env=env, capture_output=True, text=True, timeout=300)

    spec = tmp_path / "pipeline.yaml"
    spec.write_text(
        "model: tiny-test\n"
        "sample: {num_prompts: 8, group_size: 4}\n"
        "teachers: [{objective: sapo, epochs: 1}]\n"
        "stage2: {epochs: 1}\n"
        "eval: {size: 20}\n"
        "runtime: {device: cpu}\n"
    )
    made = cli("submit", str(spec))
    assert made.returncode == 0, made.stderr
    pipeline = made.stdout.split()[1]
    sample, teacher, student = (line.split()[1] for line in made.stdout.splitlines()[1:])
    followed = cli("logs", student, "--follow")  # returns when the student ends
    assert followed.returncode == 0, followed.stderr
    assert "status succeeded" in followed.stdout and "step " in followed.stdout
    listed = cli("runs", "--pipeline", pipeline, "--json")
    rows = [json.loads(line) for line in listed.stdout.splitlines()]
    assert {r["id"] for r in rows} == {sample, teacher, student}
    assert {r["status"] for r in rows} == {"succeeded"}
    logged = cli("logs", teacher)
    assert "kl/exact=" in logged.stdout and logged.stdout.strip().endswith("status succeeded")
    # an interrupted download: the first 10 kB are already there; the rest is fetched by Range
    [ckpt] = stack.live.http.get(f"/runs/{student}/checkpoints").json()
    whole = stack.live.http.get(f"/checkpoints/{ckpt['id']}/download").content
    out = tmp_path / "models"
    out.mkdir()
    (out / f"{ckpt['id']}.tar.part").write_bytes(whole[:10_000])
    got = cli("download", student, "--out", str(out))
    assert got.returncode == 0, got.stderr
    folder = Path(got.stdout.split()[0])
    assert AutoModelForCausalLM.from_pretrained(folder) is not None
    assert [p.name for p in out.iterdir()] == [folder.name]  # no partial file left
    # a damaged partial download is refused in one line, and removed for the next try
    (out / f"{ckpt['id']}.tar.part").write_bytes(b"x" * 10_000)
    bad = cli("download", student, "--out", str(tmp_path / "models"))
    assert bad.returncode == 1 and "sha256 does not match" in bad.stderr
    assert len(bad.stderr.strip().splitlines()) == 1
    assert not (out / f"{ckpt['id']}.tar.part").exists()
    refused = cli("logs", str(uuid.uuid4()))
    assert refused.returncode == 2 and "not found" in refused.stderr


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


def stage1_run(epochs: int, **resume: float) -> dict[str, Any]:
    """A stage-1 run of `epochs` x 4 steps (32 x 8 responses, minibatches of 64), a resume
    checkpoint every 2 steps unless `resume` says otherwise: long enough to act on while it
    runs."""
    return {
        "kind": "stage1",
        "model": "tiny-test",
        "config": {
            "sample": {"num_prompts": 32, "group_size": 8},
            "stage": {
                "epochs": epochs,
                "minibatch_size": 64,
                "eval_every_epochs": epochs,
                **(resume or {"checkpoint_every_steps": 2}),
            },
            "eval": {"size": 50},
            "runtime": {"device": "cpu"},
        },
    }


LONG_STAGE1 = stage1_run(30)  # 120 steps: cancelled or killed long before its end
MEDIUM_STAGE1 = stage1_run(12)  # 48 steps: interrupted, then run to its end
MEDIUM_STEPS = 12 * 4


def test_cancel_stops_a_running_run_within_a_step(stack: Stack) -> None:
    run = stack.live.http.post("/runs", json=LONG_STAGE1).json()
    stack.wait_for_step(run["id"], 2)
    assert stack.live.http.post(f"/runs/{run['id']}/cancel").json()["cancel_requested"]
    assert stack.wait_until_finished(run["id"]) == "cancelled"
    detail = stack.live.http.get(f"/runs/{run['id']}").json()
    events = [e["event"] for e in stack.live.http.get(f"/runs/{run['id']}/events").json()]
    assert events[-2:] == ["cancel_requested", "cancelled"] and detail["attempt"] == 1
    total = 30 * (32 * 8 // 64)
    assert detail["progress"]["step"] is None or detail["progress"]["step"] < total


def run_dir_of(stack: Stack, run_id: str) -> Path:
    return stack.live.settings.artifacts / "runs" / uuid.UUID(run_id).hex


def resume_steps(stack: Stack, run_id: str) -> list[int]:
    points = (run_dir_of(stack, run_id) / "resume").glob("step-*/manifest.json")
    return sorted(int(p.parent.name.removeprefix("step-")) for p in points)


def test_a_killed_worker_is_replaced_and_the_run_resumes(stack: Stack) -> None:
    # resume points by time, as by default (120 s), only sooner: one kept on disk
    run = stack.live.http.post("/runs", json=stage1_run(12, checkpoint_every_s=0.5)).json()
    seen = stack.wait_for_step(run["id"], 5)
    stack.kill_worker()
    saved = resume_steps(stack, run["id"])  # one kept; two if killed while replacing it
    assert 1 <= len(saved) <= 2 and 0 < saved[-1] <= seen + 2, (saved, seen)
    stack.start_worker()  # the reaper requeues the silent run; the new worker resumes it
    assert stack.wait_until_finished(run["id"]) == "succeeded"
    detail = stack.live.http.get(f"/runs/{run['id']}").json()
    assert detail["attempt"] == 2
    events = [e["event"] for e in stack.live.http.get(f"/runs/{run['id']}/events").json()]
    assert events == ["created", "claimed", "requeued", "claimed", "succeeded"]
    loss = next(
        s
        for s in stack.live.http.get(
            f"/runs/{run['id']}/metrics", params={"names": "loss", "max_points": 100_000}
        ).json()["series"]
    )
    assert loss["steps"] == sorted(set(loss["steps"]))  # one row per step, before and after
    assert loss["steps"][-1] == MEDIUM_STEPS - 1
    # resumed, not restarted: every step before the resume point it loaded keeps the loss
    # the killed attempt wrote. (Step s's loss is measured before update s + 1, so a resume
    # from step r logs step r again; under load the only point may be at step 1, as a slow
    # save makes the next time-based one wait 20x as long.)
    claims = [
        e
        for e in stack.live.http.get(f"/runs/{run['id']}/events").json()
        if e["event"] == "claimed"
    ]
    second_claim = datetime.fromisoformat(claims[1]["at"]).timestamp()
    engine = make_engine(stack.live.settings.db_url)
    with engine.connect() as conn:
        before_point = conn.execute(
            text(
                "select step, wall_time from metric_points"
                " where run_id = :r and name = 'loss' and step < :s order by step"
            ),
            {"r": uuid.UUID(run["id"]), "s": saved[-1]},
        ).all()
    engine.dispose()
    assert [s for s, _ in before_point] == list(range(saved[-1])), (saved, before_point)
    rewritten = [s for s, at in before_point if at >= second_claim]
    assert not rewritten, (saved, rewritten, second_claim)
    directory = run_dir_of(stack, run["id"])
    assert [p for p in directory.rglob("*") if ".tmp-" in p.name or ".old-" in p.name] == []
    assert not (directory / "resume").exists()  # a succeeded run keeps no resume point


def test_sigterm_saves_requeues_at_once_and_the_next_worker_resumes(stack: Stack) -> None:
    # no resume point but the one the shutdown writes; a heartbeat timeout far away, so the
    # reaper cannot be what requeues it
    run = stack.live.http.post("/runs", json=stage1_run(12, checkpoint_every_s=3600)).json()
    seen = stack.wait_for_step(run["id"], 3)
    assert stack.worker is not None
    signalled = time.monotonic()
    stack.worker.terminate()  # `erpd-hub worker` passes it to its Celery worker
    stack.worker.wait(timeout=60)
    stopped_in = time.monotonic() - signalled
    detail = stack.live.http.get(f"/runs/{run['id']}").json()
    assert detail["status"] == "queued", detail  # at once, not after the reaper's timeout
    assert detail["max_attempts"] == 4  # the shutdown did not use up an attempt
    [saved] = resume_steps(stack, run["id"])
    assert seen <= saved < MEDIUM_STEPS
    events = stack.live.http.get(f"/runs/{run['id']}/events").json()
    assert events[-1]["event"] == "requeued" and f"step {saved}" in events[-1]["reason"]
    assert events[-1]["actor"].startswith("worker:")
    stack.start_worker()
    assert stack.wait_until_finished(run["id"]) == "succeeded"
    assert loss_steps(stack, run["id"]) == list(range(MEDIUM_STEPS))  # no step missing
    # the next attempt started from the saved step: it wrote nothing before it
    events = stack.live.http.get(f"/runs/{run['id']}/events").json()
    second_claim = [e["at"] for e in events if e["event"] == "claimed"][1]
    engine = make_engine(stack.live.settings.db_url)
    with engine.connect() as conn:
        first_resumed = conn.execute(
            text(
                "select min(step) from metric_points where run_id = :r and name = 'loss' "
                "and wall_time > :t"
            ),
            {"r": uuid.UUID(run["id"]), "t": datetime.fromisoformat(second_claim).timestamp()},
        ).scalar_one()
    engine.dispose()
    assert first_resumed == saved
    # it ended within one optimizer step + the save, far inside compose's stop_grace_period
    assert stopped_in < 30, stopped_in


def loss_steps(stack: Stack, run_id: str) -> list[int]:
    series = stack.live.http.get(
        f"/runs/{run_id}/metrics", params={"names": "loss", "max_points": 100_000}
    ).json()["series"]
    return list(series[0]["steps"])


def test_status_shows_workers_queues_and_running_runs(stack: Stack) -> None:
    run = stack.live.http.post("/runs", json=LONG_STAGE1).json()
    stack.wait_for_step(run["id"], 2)
    exe = Path(sys.executable).with_name("erpd-hub")
    shown = subprocess.run(
        [str(exe), "status"], env=stack.env(), capture_output=True, text=True, timeout=60
    )
    assert shown.returncode == 0, shown.stderr
    assert "busy workers (1)" in shown.stdout  # a busy solo worker cannot answer a ping
    assert f"queue {stack.live.settings.queue}: 0 waiting" in shown.stdout
    assert "running runs: 1" in shown.stdout and run["id"] in shown.stdout
    stack.live.http.post(f"/runs/{run['id']}/cancel")
    assert stack.wait_until_finished(run["id"]) == "cancelled"


def test_a_run_that_kills_its_worker_every_time_fails_after_max_attempts(stack: Stack) -> None:
    poison = stack.live.http.post("/runs", json=LONG_STAGE1 | {"max_attempts": 2}).json()
    seen = -1
    for _ in range(2):  # each attempt dies mid-run, as if the run crashed its process
        seen = stack.wait_for_step(poison["id"], seen + 2, since=seen)
        stack.kill_worker()
        stack.start_worker()
    assert stack.wait_until_finished(poison["id"]) == "failed"
    detail = stack.live.http.get(f"/runs/{poison['id']}").json()
    assert detail["attempt"] == 2 and detail["error"].startswith("worker_lost")
    healthy = stack.live.http.post(
        "/runs",
        json={"kind": "sample", "model": "tiny-test", "config": {"sample": {"num_prompts": 4}}},
    ).json()
    assert stack.wait_until_finished(healthy["id"]) == "succeeded"  # the worker still serves


def test_a_gpu_slot_on_a_machine_without_one_runs_on_the_cpu(stack: Stack) -> None:
    import torch

    if torch.cuda.is_available():
        pytest.skip("this machine has a GPU: the slot would use it")
    exe = Path(sys.executable).with_name("erpd-hub")
    bad = subprocess.run(
        [str(exe), "worker", "--gpus", "0,x"], env=stack.env(), capture_output=True, text=True
    )
    assert bad.returncode == 2 and bad.stderr.strip().splitlines() == [
        "error: --gpus: 'x' is not a GPU index"
    ]
    stack.stop_worker()  # the queue's only consumer is now the GPU slot's worker
    gpu, log = start_worker(stack.env(), "--gpus", "0", names=("erpd-gpu0",))
    try:
        run = stack.live.http.post(
            "/runs",
            json={
                "kind": "sample",
                "model": "tiny-test",
                "gpu": 0,  # through queue <queue>.0, which only this worker reads
                "config": {"sample": {"num_prompts": 4}},
            },
        ).json()
        assert stack.wait_until_finished(run["id"]) == "succeeded"
        assert stack.live.http.get(f"/runs/{run['id']}").json()["device"] == "cpu"
        log.wait_for("erpd.run_stage[")  # this worker took it
    finally:
        os.killpg(gpu.pid, signal.SIGTERM)
        gpu.wait(timeout=60)
        stack.start_worker()


def test_a_postgres_restart_mid_run_is_ridden_out(stack: Stack) -> None:
    """A server of the test's own is stopped while a stage writes metrics and heartbeats: the
    worker retries its writes, the run finishes in its first attempt and no point is lost."""
    pg = PrivatePostgres()
    pg.start()
    dbs = Databases(stack.live.settings.home / "private-pg", pg.url)
    # the same home as the module's stack: the pretrained base is cached there already
    servers = start_live(dbs, stack.live.settings.home, heartbeat_s=1, heartbeat_timeout_s=300)
    private = Stack(next(servers))
    try:
        register_model(private.live.settings.db_url, "tiny-test", BASE)
        private.start_worker()
        run = private.live.http.post("/runs", json=MEDIUM_STAGE1).json()
        private.wait_for_step(run["id"], 2)
        pg.stop()
        assert private.log is not None
        private.log.wait_for("store unreachable; retrying")  # the worker saw the outage
        pg.start()
        assert private.wait_until_finished(run["id"]) == "succeeded"
        detail = private.live.http.get(f"/runs/{run['id']}").json()
        assert detail["attempt"] == 1
        loss = private.live.http.get(
            f"/runs/{run['id']}/metrics", params={"names": "loss", "max_points": 100_000}
        ).json()["series"][0]
        assert loss["steps"] == list(range(MEDIUM_STEPS))  # every step, once
    finally:
        private.stop_worker()
        next(servers, None)
        dbs.admin.dispose()  # its databases go with the whole server
        pg.close()


@pytest.mark.slow  # test_demo.py runs the same embedded default through `make demo`
def test_the_embedded_default_runs_stages_with_no_services(tmp_path: Path) -> None:
    """ERPD_HOME alone: SQLite store, Celery's SQLAlchemy transport on SQLite as the broker."""
    exe = str(Path(sys.executable).with_name("erpd-hub"))
    env = {k: v for k, v in os.environ.items() if not k.startswith("ERPD_")}
    env["ERPD_HOME"] = str(tmp_path)
    subprocess.run([exe, "migrate"], env=env, check=True, capture_output=True)
    engine = make_engine(f"sqlite:///{tmp_path}/erpd.db")
    with session_factory(engine).begin() as s:
        _, key = create_api_key(s, name="me")
    engine.dispose()
    register_model(f"sqlite:///{tmp_path}/erpd.db", "quick", QUICK_BASE)
    port = free_port()
    api = subprocess.Popen(
        [exe, "serve", "--port", str(port)], env=env, stderr=subprocess.PIPE, text=True
    )
    worker = None
    try:
        WorkerLog(api).wait_for("Uvicorn running", timeout=60)
        worker, _ = start_worker(env)
        http = httpx.Client(
            base_url=f"http://127.0.0.1:{port}/api/v1",
            headers={"Authorization": f"Bearer {key}"},
            timeout=httpx.Timeout(30, read=300),
        )
        small = {"sample": {"num_prompts": 4, "group_size": 2}, "runtime": {"device": "cpu"}}
        made = http.post(
            "/runs",
            json={"kind": "stage1", "model": "quick", "config": small | {"stage": {"epochs": 1}}},
        )
        assert made.status_code == 201, made.text
        run_id, status = made.json()["id"], "unknown"
        with http.stream("GET", f"/runs/{run_id}/stream") as response:
            for kind, body in sse_events(response):
                status = body.get("status", status)
                if kind == "end":
                    break
        assert status == "succeeded", http.get(f"/runs/{run_id}").json()
        assert (tmp_path / "broker.db").is_file()  # the queue really was the SQLite one
        http.close()
    finally:
        if worker is not None:
            os.killpg(worker.pid, signal.SIGTERM)
            worker.wait(timeout=60)
        api.terminate()
        api.wait(timeout=30)
