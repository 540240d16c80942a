"""A standing fault test: a pipeline on the production path (Postgres + Redis, a real Celery
worker, the reaper) while workers are SIGKILLed and SIGTERMed at random steps, the broker is
frozen and restarted and Postgres is restarted. At the end every run has succeeded with the
weights and metric points of an undisturbed run of the same pipeline, nothing is left half
written, and no fault lost more than one resume interval of work.

Slow (several minutes): `make test-all` runs it. `pytest -s` prints the figures.
"""

from __future__ import annotations

import json
import random
import signal
import subprocess
import sys
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import pytest
import torch
from safetensors.torch import load_file
from sqlalchemy import text

from erpd.resume import SAVE_SHARE
from server.db import make_engine
from tests.integration.conftest import Databases, start_live
from tests.integration.private_postgres import PrivatePostgres
from tests.integration.test_bounded_waits import PrivateRedis
from tests.integration.test_worker import QUICK_BASE, Stack, register_model

pytestmark = pytest.mark.slow

INTERVAL_S = 1.0  # the stages' resume interval (checkpoint_every_s): work a SIGKILL may lose
ENDS_IN_S = 3.0  # an interval ends with the step (or the 20-prompt eval) in flight, and a save
FAULTS = 24  # worker faults (SIGKILL / SIGTERM); the three service faults come on top
SEED = 20
TEACHER = {"epochs": 40, "minibatch_size": 64, "eval_every_epochs": 20}
PIPELINE: dict[str, Any] = {
    "model": "chaos-base",
    "sample": {"num_prompts": 32, "group_size": 8},
    "teachers": [
        {"objective": "sapo", **TEACHER, "checkpoint_every_s": INTERVAL_S},
        {"objective": "ce", **TEACHER, "checkpoint_every_s": INTERVAL_S},
    ],
    "stage2": {"epochs": 20, "minibatch_size": 64, "checkpoint_every_s": INTERVAL_S},
    "eval": {"size": 20, "pass_k": 0},
    "runtime": {"device": "cpu"},
    "max_attempts": 10,
}


class Broker(PrivateRedis):
    """The private Redis, restartable on its port (it keeps nothing: its queues are lost)."""

    def restart(self) -> None:
        self.proc.terminate()
        self.proc.wait(timeout=10)
        self.proc = subprocess.Popen(
            [
                *("redis-server", "--port", str(self.port), "--bind", "127.0.0.1"),
                *("--save", "", "--appendonly", "no", "--dir", self.dir),
            ],
            stdout=subprocess.DEVNULL,
        )
        deadline = time.monotonic() + 10
        while not self._up():
            assert time.monotonic() < deadline, "redis-server did not come back"
            time.sleep(0.05)


@dataclass
class Fault:
    kind: str
    run: str
    at: float  # time.time() of the fault
    lost_s: float = 0.0  # training time since the resume point the next attempt starts from
    interval_s: float = 0.0  # the resume interval in effect: every_s, or 20x the last save
    recovered_s: float | None = None  # until the run's next step past that point


@dataclass
class Chaos:
    stack: Stack
    broker: Broker
    pg: PrivatePostgres
    rng: random.Random = field(default_factory=lambda: random.Random(SEED))
    faults: list[Fault] = field(default_factory=list)

    def get(self, path: str, **params: Any) -> Any:
        """A GET that rides out the faults it causes (503s, refused connections)."""
        deadline = time.monotonic() + 120
        while True:
            try:
                response = self.stack.live.http.get(path, params=params)
                if response.status_code == 200:
                    return response.json()
            except httpx.HTTPError:
                pass
            assert time.monotonic() < deadline, f"GET {path} kept failing"
            time.sleep(0.1)

    def until(self, condition: Callable[[], bool], what: str, timeout: float = 300) -> None:
        deadline = time.monotonic() + timeout
        while not condition():
            assert time.monotonic() < deadline, f"not within {timeout} s: {what}"
            time.sleep(0.1)

    def running_stage(self, runs: list[str]) -> dict[str, Any] | None:
        for run_id in runs:
            run = self.get(f"/runs/{run_id}")
            progress = run.get("progress") or {}
            if run["kind"] != "sample" and run["status"] == "running" and progress.get("step"):
                return dict(run)
        return None

    def directory(self, run_id: str) -> Path:
        return self.stack.live.settings.artifacts / "runs" / uuid.UUID(run_id).hex

    def saved_at(self, run_id: str) -> tuple[int, float] | None:
        """(step, write time) of the run's newest complete resume point."""
        points = sorted((self.directory(run_id) / "resume").glob("step-*/manifest.json"))
        if not points:
            return None
        return int(points[-1].parent.name.removeprefix("step-")), points[-1].stat().st_mtime

    def trained_from(self, run: dict[str, Any]) -> tuple[float, float]:
        """When the work a SIGKILL now loses began: the attempt's newest resume point, or its
        first step if it wrote none (its first point's time; its claim if none is stored); and
        the resume interval after it (every_s, or 20x that point's save if longer)."""
        claimed = datetime_ts(run["started_at"])
        point = self.saved_at(run["id"])
        if point is not None and point[1] > claimed:
            newest = sorted((self.directory(run["id"]) / "resume").glob("step-*/state.json"))[-1]
            took = point[1] - json.loads(newest.read_text())["began"]
            return point[1], max(INTERVAL_S, SAVE_SHARE * took)
        engine = make_engine(self.stack.live.settings.db_url)
        with engine.connect() as conn:
            first = conn.execute(
                text(
                    "select min(wall_time) from metric_points where run_id = :r and wall_time > :t"
                ),
                {"r": uuid.UUID(run["id"]), "t": claimed},
            ).scalar_one()
        engine.dispose()
        return (float(first) if first is not None else claimed), INTERVAL_S

    def worker_fault(self, run: dict[str, Any]) -> Fault:
        # a run killed max_attempts times fails by design: the last attempt only gets SIGTERMs
        spare = run["attempt"] < run["max_attempts"] - 1
        kind = "SIGKILL" if self.rng.random() < 0.6 and spare else "SIGTERM"
        assert self.stack.worker is not None
        fault = Fault(kind, run["id"], time.time())
        if kind == "SIGKILL":
            self.stack.kill_worker()
            since, fault.interval_s = self.trained_from(run)
            fault.lost_s = fault.at - since
        else:
            self.stack.worker.terminate()
            self.stack.worker.wait(timeout=60)
        self.stack.start_worker()
        return fault

    def service_fault(self, kind: str) -> None:
        if kind == "broker freeze":
            self.broker.freeze()
            time.sleep(5)  # the fault is the duration itself
            self.broker.thaw()
        elif kind == "broker restart":
            self.broker.restart()
        else:
            self.pg.stop()
            time.sleep(3)
            self.pg.start()

    def recovered(self, fault: Fault) -> None:
        """Wait until the run trains past where it was resumed from; record how long."""
        point = self.saved_at(fault.run)
        resumed_from = point[0] if point else 0

        def moved_on() -> bool:
            run = self.get(f"/runs/{fault.run}")
            step = (run.get("progress") or {}).get("step") or 0
            return run["status"] == "succeeded" or (
                run["status"] == "running" and step > resumed_from
            )

        try:
            self.until(moved_on, f"{fault.kind} of {fault.run} recovered")
        except AssertionError:
            run = self.get(f"/runs/{fault.run}")
            events = self.get(f"/runs/{fault.run}/events")
            log = "".join(self.stack.log.lines[-30:]) if self.stack.log else ""
            raise AssertionError(
                f"fault {len(self.faults)} ({fault.kind}) never recovered: {run}\n{events}\n{log}"
            ) from None
        fault.recovered_s = time.time() - fault.at


def datetime_ts(value: str) -> float:
    from datetime import datetime

    return datetime.fromisoformat(value).timestamp()


@pytest.fixture(scope="module")
def chaos(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Chaos]:
    home = tmp_path_factory.mktemp("chaos")
    pg, broker = PrivatePostgres(), Broker()
    pg.start()
    dbs = Databases(home / "pg", pg.url)
    servers = start_live(
        dbs,
        home,
        broker_url=broker.url,
        heartbeat_s=1,
        heartbeat_timeout_s=4,
        republish_after_s=2,
    )
    stack = Stack(next(servers))
    register_model(stack.live.settings.db_url, "chaos-base", QUICK_BASE)
    stack.start_worker()
    env = stack.env() | {"ERPD_REPUBLISH_AFTER_S": "2"}
    exe = Path(sys.executable).with_name("erpd-hub")
    reaper = subprocess.Popen(
        [str(exe), "reaper", "--every", "0.5"],
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        yield Chaos(stack, broker, pg)
    finally:
        reaper.send_signal(signal.SIGTERM)
        reaper.wait(timeout=30)
        stack.stop_worker()
        next(servers, None)
        dbs.admin.dispose()
        broker.close()
        pg.close()


def submit(chaos: Chaos) -> list[str]:
    made = chaos.stack.live.http.post("/pipelines", json=PIPELINE)
    assert made.status_code == 201, made.text
    return list(made.json()["runs"])


def finished(chaos: Chaos, runs: list[str]) -> bool:
    statuses = [chaos.get(f"/runs/{r}")["status"] for r in runs]
    assert not {"failed", "cancelled"} & set(statuses), statuses
    return all(s == "succeeded" for s in statuses)


def inject(chaos: Chaos, runs: list[str]) -> None:
    """Worker faults at random steps of whatever stage runs, the service faults among them."""
    service = {6: "broker freeze", 12: "broker restart", 18: "postgres restart"}
    last: dict[str, int] = {}
    while len(chaos.faults) < FAULTS and not finished(chaos, runs):
        gap = chaos.rng.randint(2, 6)  # steps between two faults on one run

        def ready(gap: int = gap) -> bool:
            run = chaos.running_stage(runs)
            step = ((run or {}).get("progress") or {}).get("step") or 0
            return finished(chaos, runs) or (
                run is not None and step >= last.get(run["id"], 0) + gap
            )

        chaos.until(ready, "a stage to make progress")
        run = chaos.running_stage(runs)
        if run is None:
            continue
        last[run["id"]] = run["progress"]["step"]
        if len(chaos.faults) in service:
            chaos.service_fault(service.pop(len(chaos.faults)))
            # the stage stalls while Postgres is down (a resume point is written only after the
            # points before it are stored): let it train two steps on, past a fresh point, so
            # the worker fault after it measures lost training, not the outage (a SIGKILL right
            # after a restart once counted 6.3 s of stalled time as lost work)
            chaos.until(lambda: ready(2), "a stage to train on after a service fault")
            run = chaos.running_stage(runs)
            if run is None:
                continue
            last[run["id"]] = run["progress"]["step"]
        fault = chaos.worker_fault(run)
        chaos.faults.append(fault)
        chaos.recovered(fault)


def points(chaos: Chaos, run_id: str) -> dict[tuple[str, int], float]:
    """Every stored metric point of the run, by (name, step)."""
    engine = make_engine(chaos.stack.live.settings.db_url)
    with engine.connect() as conn:
        rows = conn.execute(
            text(
                "select name, step, value, count(*) over (partition by name, step) "
                "from metric_points where run_id = :r"
            ),
            {"r": uuid.UUID(run_id)},
        ).all()
    engine.dispose()
    assert all(row[3] == 1 for row in rows), "a metric point is stored twice"
    return {(row[0], row[1]): row[2] for row in rows}


def weights(chaos: Chaos, run_id: str) -> dict[str, torch.Tensor]:
    return load_file(str(chaos.directory(run_id) / "checkpoint" / "model.safetensors"))


TIMED = {"perf/tokens_per_s"}  # wall-clock rates: the only values two runs may differ in


def test_a_pipeline_survives_workers_killed_and_services_restarted(chaos: Chaos) -> None:
    reference = submit(chaos)
    chaos.until(lambda: finished(chaos, reference), "the undisturbed pipeline", timeout=900)
    started = time.monotonic()
    runs = submit(chaos)
    inject(chaos, runs)
    chaos.until(lambda: finished(chaos, runs), "the pipeline under faults", timeout=900)
    took = time.monotonic() - started
    for ref, run in zip(reference, runs, strict=True):
        expected, got = points(chaos, ref), points(chaos, run)
        missing, extra = sorted(set(expected) - set(got)), sorted(set(got) - set(expected))
        assert not missing and not extra, (run, missing[:20], extra[:20], chaos.faults)
        for key, value in expected.items():
            if key[0] not in TIMED and value is not None:
                assert got[key] == pytest.approx(value, rel=1e-5, abs=1e-6), key
        if chaos.get(f"/runs/{run}")["kind"] != "sample":
            a, b = weights(chaos, ref), weights(chaos, run)
            for name in a:
                torch.testing.assert_close(b[name], a[name], rtol=0, atol=0, msg=name)
            assert not (chaos.directory(run) / "resume").exists()
    home = chaos.stack.live.settings.home
    leftovers = [p for p in home.rglob("*") if ".tmp-" in p.name or ".old-" in p.name]
    assert leftovers == []
    directories = {p.name for p in (home / "artifacts" / "runs").iterdir()}
    assert directories == {uuid.UUID(r).hex for r in reference + runs}  # no orphan
    killed = [f for f in chaos.faults if f.kind == "SIGKILL"]
    assert len(chaos.faults) >= 20 and killed
    # at most one resume interval, plus what ends it: a step or an eval (20 prompts), the save
    over = [f for f in killed if f.lost_s > f.interval_s + ENDS_IN_S]
    assert not over, over
    recoveries = [f.recovered_s for f in chaos.faults if f.recovered_s is not None]
    print(
        f"\nchaos: {len(chaos.faults)} worker faults ({len(killed)} SIGKILL, "
        f"{len(chaos.faults) - len(killed)} SIGTERM) + broker freeze, broker restart, "
        f"postgres restart; runs succeeded {len(runs)}/{len(runs)}; points lost 0; "
        f"work lost per SIGKILL mean {sum(f.lost_s for f in killed) / len(killed):.2f} s "
        f"(max {max(f.lost_s for f in killed):.2f} s; resume interval {INTERVAL_S} s, "
        f"{max(f.interval_s for f in killed):.2f} s at most with the 20x-save rule), "
        "per SIGTERM 0; "
        f"recovery mean {sum(recoveries) / len(recoveries):.1f} s "
        f"(max {max(recoveries):.1f} s); pipeline under faults {took:.0f} s"
    )
