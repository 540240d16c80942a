"""Dispatch latency: how long a submitted run waits before a worker claims it, per broker.

    python benchmarks/dispatch.py [--runs 20] [--postgres-url URL] [--redis-url URL]

For each stack - production (Postgres + Redis) and embedded (SQLite + Celery's SQLAlchemy
transport on SQLite) - starts the real `erpd-hub serve` and `erpd-hub worker` processes, warms
them with one run (which pretrains a very small base once), then submits `--runs` small sample
runs one after another and waits for each to end on its event stream. The latency of a run is
its `started_at - created_at`, both stamped by the server (the API's commit and the worker's
claim), so the client's own timing does not enter it. Prints median and p90 per stack and the
ratio embedded / production.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import uuid
from collections.abc import Iterator
from datetime import datetime
from pathlib import Path

import httpx
from common import POSTGRES_URL, REDIS_URL, await_line, free_port, postgres_database

from server.db import Model, RegistryKind, make_engine, migrate, session_factory
from server.services import create_api_key, register

EXE = Path(sys.executable).with_name("erpd-hub")
# a base that is pretrained in seconds: the benchmark is about queues, not learning
BASE = {"target_acc": 0.05, "min_steps": 1, "max_steps": 30, "eval_size": 10, "eval_every": 10}
RUN = {
    "kind": "sample",
    "model": "bench-tiny",
    "config": {"sample": {"num_prompts": 2, "group_size": 2}, "runtime": {"device": "cpu"}},
}


def events(response: httpx.Response) -> Iterator[str]:
    for line in response.iter_lines():
        if line.startswith("event:"):
            yield line.split(":", 1)[1].strip()


class Stack:
    def __init__(self, name: str, home: Path, db_url: str, broker: str) -> None:
        self.name, self.home = name, home
        engine = make_engine(db_url)
        migrate.upgrade(engine)
        with session_factory(engine).begin() as s:
            _, self.key = create_api_key(s, name="bench")
            register(
                s,
                Model,
                name="bench-tiny",
                kind=RegistryKind.BUILTIN,
                location="tiny",
                meta={"base": BASE},
            )
        engine.dispose()
        port = free_port()
        tag = uuid.uuid4().hex[:8]
        self.env = os.environ | {
            "ERPD_HOME": str(home),
            "ERPD_DATABASE_URL": db_url,
            "ERPD_BROKER_URL": broker,
            "ERPD_QUEUE": f"bench-{tag}",
            "ERPD_HOUSEKEEPING_QUEUE": f"bench-cpu-{tag}",
        }
        self.api = subprocess.Popen(
            [str(EXE), "serve", "--port", str(port)],
            env=self.env,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            text=True,
        )
        self.worker = subprocess.Popen(
            [str(EXE), "worker", "--no-housekeeping", "--loglevel", "INFO"],
            env=self.env,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            text=True,
            start_new_session=True,
        )
        self.http = httpx.Client(
            base_url=f"http://127.0.0.1:{port}/api/v1",
            headers={"Authorization": f"Bearer {self.key}"},
            timeout=httpx.Timeout(30, read=600),
        )
        try:
            await_line(self.api, "Uvicorn running")
            await_line(self.worker, " ready.")
        except BaseException:
            self.close()  # never leave a server or a worker behind
            raise

    def one_run(self) -> float:
        """Submit one run, wait for its end on the event stream; its queue wait in seconds."""
        made = self.http.post("/runs", json=RUN)
        made.raise_for_status()
        run_id = made.json()["id"]
        with self.http.stream("GET", f"/runs/{run_id}/stream") as response:
            for kind in events(response):
                if kind == "end":
                    break
        run = self.http.get(f"/runs/{run_id}").json()
        if run["status"] != "succeeded":
            raise SystemExit(f"{self.name}: run {run_id} ended {run['status']}: {run['error']}")
        created = datetime.fromisoformat(run["created_at"])
        started = datetime.fromisoformat(run["started_at"])
        return (started - created).total_seconds()

    def close(self) -> None:
        self.http.close()
        self.api.terminate()
        os.killpg(self.worker.pid, 15)
        self.api.wait(timeout=30)
        self.worker.wait(timeout=60)


def measure(stack: Stack, runs: int) -> list[float]:
    stack.one_run()  # warm-up: pretrains the base, opens every connection
    return [stack.one_run() for _ in range(runs)]


def summary(waits: list[float]) -> tuple[float, float]:
    ordered = sorted(waits)
    p90 = ordered[min(len(ordered) - 1, round(0.9 * (len(ordered) - 1)))]
    return statistics.median(ordered) * 1000, p90 * 1000


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--runs", type=int, default=20)
    ap.add_argument("--postgres-url", default=POSTGRES_URL)
    ap.add_argument("--redis-url", default=REDIS_URL)
    ap.add_argument("--json", type=Path, help="Also write the results here.")
    args = ap.parse_args()
    tmp = Path(tempfile.mkdtemp(prefix="erpd-dispatch-"))
    results: dict[str, list[float]] = {}
    try:
        with postgres_database(args.postgres_url) as pg_url:
            for name, db_url, broker in (
                ("production (Postgres + Redis)", pg_url, args.redis_url),
                (
                    "embedded (SQLite + SQLite broker)",
                    f"sqlite:///{tmp}/embedded/erpd.db",
                    f"sqla+sqlite:///{tmp}/embedded/broker.db",
                ),
            ):
                home = tmp / ("embedded" if "embedded" in name else "production")
                home.mkdir(parents=True, exist_ok=True)
                stack = Stack(name, home, db_url, broker)
                try:
                    results[name] = measure(stack, args.runs)
                finally:
                    stack.close()
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    print(f"submit -> claimed by an idle worker, {args.runs} runs each (server timestamps)")
    medians = {}
    for name, waits in results.items():
        median, p90 = summary(waits)
        medians[name] = median
        print(f"{name:36s} median {median:7.1f} ms   p90 {p90:7.1f} ms")
    prod, emb = medians.values()
    print(f"{'ratio embedded / production':36s} {emb / prod:7.2f}")
    if args.json:
        args.json.write_text(json.dumps({k: summary(v) for k, v in results.items()}, indent=2))


if __name__ == "__main__":
    main()
