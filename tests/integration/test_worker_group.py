"""A worker that owns two "GPUs" (`--gpus 0,1 --group`) runs `runtime.gpus: 2` stages under
torchrun: two gloo ranks on this CPU, the real API, Postgres, Redis and Celery around them."""

from __future__ import annotations

import io
import os
import signal
import tarfile
import uuid
from collections.abc import Iterator
from datetime import datetime
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import text
from transformers import AutoModelForCausalLM

from server.db import make_engine
from tests.integration.conftest import Databases, start_live
from tests.integration.test_worker import (
    QUICK_BASE,
    Stack,
    register_model,
    start_worker,
    with_reaper,
)

RUNTIME = {"device": "cpu", "gpus": 2}
PIPELINE = {
    "model": "quick",
    "sample": {"num_prompts": 16, "group_size": 4},
    "teachers": [{"objective": "sapo", "epochs": 2, "minibatch_size": 32}],
    "stage2": {"epochs": 1, "minibatch_size": 32},
    "eval": {"size": 20},
    "runtime": RUNTIME,
}


def stage1(epochs: int) -> dict[str, Any]:
    """`epochs` x 2 steps on two ranks, a sharded resume point every 2 steps."""
    return {
        "kind": "stage1",
        "model": "quick",
        "config": {
            "sample": {"num_prompts": 16, "group_size": 4},
            "stage": {
                "epochs": epochs,
                "minibatch_size": 32,
                "eval_every_epochs": epochs,
                "checkpoint_every_steps": 2,
            },
            "eval": {"size": 20},
            "runtime": RUNTIME,
        },
    }


class GroupStack(Stack):
    def start_worker(self) -> None:
        self.worker, self.log = start_worker(
            self.env(), "--gpus", "0,1", "--group", names=("erpd-gpu0-1",)
        )


@pytest.fixture(scope="module")
def stack(databases: Databases, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    servers = start_live(
        databases, tmp_path_factory.mktemp("group"), heartbeat_s=1, heartbeat_timeout_s=30
    )
    live = next(servers)
    register_model(live.settings.db_url, "quick", QUICK_BASE)
    yield from with_reaper(GroupStack(live))
    next(servers, None)


def events(stack: Stack, run_id: str) -> list[str]:
    return [e["event"] for e in stack.live.http.get(f"/runs/{run_id}/events").json()]


def test_a_two_rank_pipeline_runs_to_a_merged_student(stack: Stack, tmp_path: Path) -> None:
    made = stack.live.http.post("/pipelines", json=PIPELINE)
    assert made.status_code == 201, made.text
    _, teacher, student = made.json()["runs"]
    assert stack.wait_until_finished(student) == "succeeded"
    for run_id in (teacher, student):
        run = stack.live.http.get(f"/runs/{run_id}").json()
        assert run["status"] == "succeeded" and run["attempt"] == 1, run
        assert run["progress"]["step"] == run["progress"]["total"] > 0, run["progress"]
        series = stack.live.http.get(f"/runs/{run_id}/metrics").json()["series"]
        assert {"loss", "kl/exact", "acc/eval"} <= {s["name"] for s in series}
        loss = next(s for s in series if s["name"] == "loss")
        assert loss["steps"] == list(range(run["progress"]["total"]))  # rank 0's, once each
    [ckpt] = stack.live.http.get(f"/runs/{student}/checkpoints").json()
    tar = stack.live.http.get(f"/checkpoints/{ckpt['id']}/download")
    with tarfile.open(fileobj=io.BytesIO(tar.content)) as archive:
        archive.extractall(tmp_path / "student", filter="data")
    [folder] = list((tmp_path / "student").iterdir())
    assert (folder / "model.safetensors").is_file()  # one merged file, not shards
    assert AutoModelForCausalLM.from_pretrained(folder) is not None


def ranks_of(run_id: str) -> dict[int, int]:
    """{local rank: pid} of the processes running the run (found by their spec's path)."""
    found = {}
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit():
            continue
        try:
            cmdline = (proc / "cmdline").read_bytes().split(b"\0")
            environ = (proc / "environ").read_bytes().split(b"\0")
        except OSError:
            continue
        spec = [a for a in cmdline if uuid.UUID(run_id).hex.encode() in a]
        rank = [e for e in environ if e.startswith(b"LOCAL_RANK=")]
        if spec and rank and b"torchrun" not in cmdline:
            found[int(rank[0].split(b"=")[1])] = int(proc.name)
    return found


def test_a_killed_rank_requeues_the_run_which_resumes_from_its_shards(stack: Stack) -> None:
    run = stack.live.http.post("/runs", json=stage1(8)).json()
    stack.wait_for_step(run["id"], 5)  # sharded resume points exist at steps 2 and 4
    ranks = ranks_of(run["id"])
    assert sorted(ranks) == [0, 1], ranks
    os.kill(ranks[1], signal.SIGKILL)
    assert stack.wait_until_finished(run["id"]) == "succeeded"
    detail = stack.live.http.get(f"/runs/{run['id']}").json()
    assert detail["attempt"] == 2
    assert events(stack, run["id"]) == ["created", "claimed", "requeued", "claimed", "succeeded"]
    directory = stack.live.settings.artifacts / "runs" / uuid.UUID(run["id"]).hex
    loss = next(
        s
        for s in stack.live.http.get(
            f"/runs/{run['id']}/metrics", params={"names": "loss", "max_points": 100_000}
        ).json()["series"]
    )
    assert loss["steps"] == list(range(16))  # one row per step, before and after the kill
    # resumed from its shards, not restarted: the first steps' points are the first attempt's
    claims = [
        e["at"]
        for e in stack.live.http.get(f"/runs/{run['id']}/events").json()
        if e["event"] == "claimed"
    ]
    engine = make_engine(stack.live.settings.db_url)
    with engine.connect() as conn:
        first_step_written = conn.execute(
            text("select wall_time from metric_points where run_id = :r and step = 1 limit 1"),
            {"r": uuid.UUID(run["id"])},
        ).scalar_one()
    engine.dispose()
    assert first_step_written < datetime.fromisoformat(claims[1]).timestamp()
    assert not (directory / "resume").exists()  # dropped once the run succeeded


def test_cancel_stops_every_rank(stack: Stack) -> None:
    run = stack.live.http.post("/runs", json=stage1(40)).json()
    stack.wait_for_step(run["id"], 2)
    ranks = ranks_of(run["id"])
    assert stack.live.http.post(f"/runs/{run['id']}/cancel").json()["cancel_requested"]
    assert stack.wait_until_finished(run["id"]) == "cancelled"
    assert events(stack, run["id"])[-2:] == ["cancel_requested", "cancelled"]
    assert ranks and not ranks_of(run["id"])  # every rank has exited, none left behind
    detail = stack.live.http.get(f"/runs/{run['id']}").json()
    assert detail["progress"]["step"] < 80


def test_a_run_asking_for_more_gpus_than_its_worker_owns_fails_saying_so(stack: Stack) -> None:
    body = stage1(1)
    body["config"]["runtime"] = {**RUNTIME, "gpus": 4}
    run = stack.live.http.post("/runs", json=body).json()
    assert stack.wait_until_finished(run["id"]) == "failed"
    error = stack.live.http.get(f"/runs/{run['id']}").json()["error"]
    assert error.startswith("ConfigError: runtime.gpus: the run asks for 4 GPUs"), error
