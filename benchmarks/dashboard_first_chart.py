"""Time to first chart: how long the run page takes to draw its charts in a real browser, for a
run with 100k metric points against one with 1k (the baseline, measured in the same run).

    python benchmarks/dashboard_first_chart.py [--points 100000] [--repeats 3]

Starts `erpd-hub serve` (on a throwaway Postgres database) and `erpd-hub dashboard`, writes the
two runs' points through the service layer (10 series, points/10 steps each), then opens each
run's page in Debian's chromium (scripts/test-tools.sh) and times navigation -> three plotly charts
drawn. Prints the median per run and the ratio big / small.
"""

from __future__ import annotations

import argparse
import os
import signal
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path

from common import await_line, free_port, postgres_database
from playwright.sync_api import sync_playwright

from erpd import metrics as M
from server.db import Dataset, Model, RunKind, make_engine, migrate, session_factory
from server.services import (
    Point,
    claim_run,
    complete_run,
    create_api_key,
    create_run,
    ensure_builtins,
    record_metrics,
)

EXE = Path(sys.executable).with_name("erpd-hub")
NAMES = [
    M.KL_EXACT,
    M.KL_K3,
    M.KL_K1,
    M.ENTROPY_TOKEN,
    M.ACC_TRAIN_BATCH,
    M.LOSS,
    M.RATIO_P01,
    M.RATIO_P99,
    M.RATIO_CLIP_FRAC,
    M.GRAD_NORM,
]
CHROMIUM_ARGS = [
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--no-first-run",
]


def seed(db_url: str, sizes: list[int]) -> tuple[str, list[str]]:
    """A key and one finished run per size (total points)."""
    engine = make_engine(db_url)
    migrate.upgrade(engine)
    factory = session_factory(engine)
    runs = []
    with factory.begin() as s:
        ensure_builtins(s)
        owner, key = create_api_key(s, name="bench")
        owner_id = owner.id
        model = s.query(Model).one().id
        dataset = s.query(Dataset).one().id
    for size in sizes:
        steps = size // len(NAMES)
        with factory.begin() as s:
            run = create_run(
                s,
                kind=RunKind.SAMPLE,  # no checkpoint needed to complete it
                model_id=model,
                dataset_id=dataset,
                config={},
                name=f"points-{size}",
                owner_id=owner_id,
            )
            claim_run(s, run_id=run.id, worker="bench", device="cpu")
        for start in range(0, steps, 2_000):
            batch = [
                Point(i, name, 1.0 / (1 + i) + 0.001 * k, 0.0)
                for i in range(start, min(steps, start + 2_000))
                for k, name in enumerate(NAMES)
            ]
            with factory.begin() as s:
                record_metrics(s, run_id=run.id, points=batch, attempt=1)
        with factory.begin() as s:
            complete_run(s, run_id=run.id, attempt=1, summary={}, actor="bench")
        runs.append(run.id.hex)
    engine.dispose()
    return key, [str(uuid.UUID(r)) for r in runs]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--points", type=int, default=100_000)
    ap.add_argument("--baseline-points", type=int, default=1_000)
    ap.add_argument("--repeats", type=int, default=3)
    args = ap.parse_args()
    if not Path("/usr/bin/chromium").exists():
        raise SystemExit("needs Debian's chromium: run scripts/test-tools.sh")
    with postgres_database() as db_url, tempfile.TemporaryDirectory() as home:
        key, (small, big) = seed(db_url, [args.baseline_points, args.points])
        api_port, dash_port = free_port(), free_port()
        env = os.environ | {
            "ERPD_HOME": home,
            "ERPD_DATABASE_URL": db_url,
            "ERPD_DASHBOARD_API_URL": f"http://127.0.0.1:{api_port}/api/v1",
            "ERPD_DASHBOARD_API_KEY": key,
        }
        api = subprocess.Popen(
            [str(EXE), "serve", "--port", str(api_port)],
            env=env,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            text=True,
        )
        dash = subprocess.Popen(
            [str(EXE), "dashboard", "--port", str(dash_port)],
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            start_new_session=True,
        )
        try:
            await_line(api, "Uvicorn running")
            await_line(dash, "URL:", "stdout")
            times: dict[str, list[float]] = {small: [], big: []}
            Path("test-artifacts").mkdir(exist_ok=True)
            with sync_playwright() as p:
                browser = p.chromium.launch(
                    executable_path="/usr/bin/chromium", headless=True, args=CHROMIUM_ARGS
                )
                for attempt in range(args.repeats + 1):  # the first round warms both up
                    for run_id in (small, big):
                        page = browser.new_page(viewport={"width": 1600, "height": 1200})
                        started = time.perf_counter()
                        page.goto(f"http://127.0.0.1:{dash_port}/run?run={run_id}")
                        try:
                            page.wait_for_function(
                                "document.querySelectorAll('.js-plotly-plot .main-svg').length"
                                " >= 3",
                                timeout=120_000,
                            )
                        except Exception:
                            page.screenshot(path="test-artifacts/first-chart-timeout.png")
                            raise
                        if attempt:
                            times[run_id].append(time.perf_counter() - started)
                        page.close()
                browser.close()
        finally:
            os.killpg(dash.pid, signal.SIGTERM)  # erpd-hub dashboard and its streamlit child
            api.terminate()
            dash.wait(timeout=30)
            api.wait(timeout=30)
    s, b = statistics.median(times[small]), statistics.median(times[big])
    print(f"run page -> three charts drawn, median of {args.repeats} (chromium, headless)")
    print(f"{args.baseline_points:>9,} points  {s:6.2f} s")
    print(f"{args.points:>9,} points  {b:6.2f} s")
    print(f"ratio               {b / s:6.2f}")


if __name__ == "__main__":
    main()
