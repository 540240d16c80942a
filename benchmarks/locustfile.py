"""The load benchmarks/api_latency.py puts on the API: run listings and metric series.

Reads the API key and the run ids from the environment (ERPD_BENCH_KEY, ERPD_BENCH_RUNS: a
file of run ids, the first ERPD_BENCH_BIG of them holding long series). Each user sends a
constant request rate (ERPD_BENCH_USER_RPS) so the total is users x rate, whatever the
latency.
"""

from __future__ import annotations

import os
import random
from pathlib import Path

from locust import FastHttpUser, constant_throughput, task

RUNS = Path(os.environ["ERPD_BENCH_RUNS"]).read_text().split()
BIG = int(os.environ.get("ERPD_BENCH_BIG", "0"))


AUTH = {"Authorization": f"Bearer {os.environ.get('ERPD_BENCH_KEY', '')}"}


class Dashboard(FastHttpUser):
    """What a dashboard tab does: list runs, open one run's charts (downsampled). /healthz (no
    database, no key) is the baseline: the framework's own floor under the same load."""

    wait_time = constant_throughput(float(os.environ.get("ERPD_BENCH_USER_RPS", "4")))

    @task(2)
    def list_runs(self) -> None:
        self.client.get("/api/v1/runs?limit=50", headers=AUTH, name="GET /runs")

    @task(5)
    def small_run_metrics(self) -> None:
        run = random.choice(RUNS[BIG:])
        self.client.get(f"/api/v1/runs/{run}/metrics", headers=AUTH, name="GET /runs/{id}/metrics")

    @task(1)
    def big_run_metrics(self) -> None:
        run = random.choice(RUNS[:BIG])
        self.client.get(
            f"/api/v1/runs/{run}/metrics?max_points=1000",
            headers=AUTH,
            name="GET /runs/{id}/metrics (long)",
        )

    @task(1)
    def health(self) -> None:
        self.client.get("/api/v1/healthz", name="GET /healthz (baseline)")
