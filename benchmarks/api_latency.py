"""API latency under load: GET /runs and GET /runs/{id}/metrics on 1,000 runs and 1M points.

    python benchmarks/api_latency.py [--runs 1000] [--points 1000000]
        [--rps 25 50 100 200] [--seconds 20] [--workers 1] [--postgres-url URL]

Fills a fresh Postgres database: --runs runs (through the service layer, as the API creates
them), of which 1% hold long series (10 metrics x ~5,000 steps, read downsampled to 1,000
points) and the rest short ones (10 x ~50), --points metric points in all (COPY). Starts the
real `erpd-hub serve` on it (--workers processes) and drives it with locust on 127.0.0.1 at
each offered rate (--rps) for --seconds (benchmarks/locustfile.py): where p99 leaves the goal
is the API's capacity on this machine. /healthz runs in the same mix as the baseline: no
database, no key, the framework's own floor. Prints requests, failures, req/s and
p50/p95/p99 per endpoint and rate, and p99 against the baseline's; writes JSON (--json).
"""

from __future__ import annotations

import argparse
import csv
import os
import random
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx
import psycopg
from common import (
    POSTGRES_URL,
    REDIS_URL,
    await_line,
    free_port,
    machine,
    postgres_database,
    write_json,
)
from sqlalchemy.engine import make_url

from erpd import metrics as M
from server.db import Dataset, Model, RunKind, make_engine, migrate, session_factory
from server.services import create_api_key, create_run, ensure_builtins

EXE = Path(sys.executable).with_name("erpd-hub")
LOCUST = Path(sys.executable).with_name("locust")
NAMES = sorted(M.CATALOGUE)[:10]
HERE = Path(__file__).resolve().parent


def fill(url: str, runs: int, points: int) -> tuple[str, list[str], int]:
    """Create the key, the runs and their points; returns (key, run ids, how many are long)."""
    engine = make_engine(url)
    migrate.upgrade(engine)
    with session_factory(engine).begin() as s:
        ensure_builtins(s)
        key, token = create_api_key(s, name="bench")
        model = s.query(Model).one().id
        dataset = s.query(Dataset).one().id
        ids = [
            create_run(
                s,
                kind=RunKind.STAGE1,
                model_id=model,
                dataset_id=dataset,
                config={},
                owner_id=key.id,
                name=f"bench-{i}",
            ).id
            for i in range(runs)
        ]
    engine.dispose()
    big = max(1, runs // 100)
    per_series = points // len(NAMES)  # points per metric name over all runs
    long_steps = per_series // 2 // big  # half the points sit in the long runs
    short_steps = (per_series - long_steps * big) // (runs - big)
    written = 0
    rng = random.Random(0)
    now = time.time()
    plain = make_url(url).set(drivername="postgresql").render_as_string(hide_password=False)
    with psycopg.connect(plain) as conn, conn.cursor() as cur:
        copy_sql = "COPY metric_points (run_id, name, step, value, wall_time) FROM STDIN"
        with cur.copy(copy_sql) as copy:
            for i, run in enumerate(ids):
                steps = long_steps if i < big else short_steps
                for name in NAMES:
                    for step in range(steps):
                        copy.write_row((run, name, step, rng.random(), now))
                        written += 1
    print(f"filled {runs:,} runs ({big} long: {long_steps:,} steps/metric), {written:,} points")
    return token, [str(r) for r in ids], big


def locust_stats(prefix: Path) -> list[dict[str, float | str]]:
    rows = []
    with open(f"{prefix}_stats.csv", newline="") as fh:
        for r in csv.DictReader(fh):
            rows.append(
                {
                    "endpoint": r["Name"],
                    "requests": int(r["Request Count"]),
                    "failures": int(r["Failure Count"]),
                    "rps": float(r["Requests/s"]),
                    "p50_ms": float(r["50%"]),
                    "p95_ms": float(r["95%"]),
                    "p99_ms": float(r["99%"]),
                }
            )
    return rows


def load(host: str, env: dict[str, str], rps: float, args: argparse.Namespace, tmp: str) -> list:
    """One locust run at a constant offered rate; its per-endpoint rows."""
    prefix = Path(tmp) / f"locust-{rps:g}"
    subprocess.run(
        [
            str(LOCUST),
            "-f",
            str(HERE / "locustfile.py"),
            "--headless",
            "--users",
            str(args.users),
            # users start one cycle apart in total (spawn rate = offered rate), so requests
            # arrive spread out rather than in synchronised waves; stats restart once all run
            "--spawn-rate",
            f"{rps:g}",
            "--reset-stats",
            "--run-time",
            f"{args.seconds}s",
            "--host",
            host,
            "--csv",
            str(prefix),
            "--only-summary",
            "--loglevel",
            "WARNING",
        ],
        env=env | {"ERPD_BENCH_USER_RPS": str(rps / args.users)},
        check=True,
        stdout=subprocess.DEVNULL,
    )
    return [{"offered_rps": rps, **row} for row in locust_stats(prefix)]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--runs", type=int, default=1000)
    ap.add_argument("--points", type=int, default=1_000_000)
    ap.add_argument("--rps", type=float, nargs="+", default=[25.0, 50.0, 100.0, 200.0])
    ap.add_argument("--users", type=int, default=50)
    ap.add_argument("--seconds", type=int, default=20)
    ap.add_argument("--workers", type=int, default=1, help="API processes (serve --workers)")
    ap.add_argument("--postgres-url", default=POSTGRES_URL)
    ap.add_argument("--json", default="runs/bench/api_latency.json")
    args = ap.parse_args()
    rows: list[dict] = []
    with postgres_database(args.postgres_url) as url, tempfile.TemporaryDirectory() as tmp:
        started = time.perf_counter()
        token, ids, big = fill(url, args.runs, args.points)
        print(f"fill took {time.perf_counter() - started:.0f} s")
        (Path(tmp) / "runs.txt").write_text("\n".join(ids))
        port = free_port()
        env = os.environ | {
            "ERPD_HOME": tmp,
            "ERPD_DATABASE_URL": url,
            "ERPD_BROKER_URL": REDIS_URL,
            "ERPD_BENCH_KEY": token,
            "ERPD_BENCH_RUNS": str(Path(tmp) / "runs.txt"),
            "ERPD_BENCH_BIG": str(big),
        }
        api = subprocess.Popen(
            [str(EXE), "serve", "--port", str(port), "--workers", str(args.workers)],
            env=env,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            text=True,
        )
        try:
            await_line(api, "Application startup complete")
            host = f"http://127.0.0.1:{port}"
            with httpx.Client(base_url=host, headers={"Authorization": f"Bearer {token}"}) as c:
                for run in ids[:big] + ids[-5:]:  # warm connections and caches
                    c.get(f"/api/v1/runs/{run}/metrics").raise_for_status()
            for rps in args.rps:
                rows.extend(load(host, env, rps, args, tmp))
        finally:
            api.terminate()
            api.wait(timeout=30)
    print(
        f"{args.workers} API process(es), {args.users} users, {args.seconds} s per offered rate "
        f"on {machine()}"
    )
    print(
        f"{'offered':>7} {'endpoint':<32}{'requests':>9}{'fail':>6}{'req/s':>8}"
        f"{'p50 ms':>8}{'p95 ms':>8}{'p99 ms':>8}{'p99/base':>9}"
    )
    for row in rows:
        base = next(
            r
            for r in rows
            if r["offered_rps"] == row["offered_rps"] and "baseline" in str(r["endpoint"])
        )
        print(
            f"{row['offered_rps']:>7.0f} {row['endpoint']:<32}{row['requests']:>9}"
            f"{row['failures']:>6}{row['rps']:>8.1f}{row['p50_ms']:>8.0f}{row['p95_ms']:>8.0f}"
            f"{row['p99_ms']:>8.0f}{float(row['p99_ms']) / max(float(base['p99_ms']), 1):>8.1f}x"
        )
    write_json(args.json, {"machine": machine(), "args": vars(args), "rows": rows})


if __name__ == "__main__":
    main()
