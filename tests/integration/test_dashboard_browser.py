"""The dashboard in a real browser: Debian's chromium (scripts/test-tools.sh installs it; never
`playwright install`) driven by Playwright, against `erpd-hub dashboard` and the real API."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
from sqlalchemy.orm import Session, sessionmaker

from erpd import metrics as M
from server.db import RunKind, make_engine, session_factory
from server.services import Point, claim_run, record_metrics
from tests.integration.conftest import Databases, Live, start_live
from tests.integration.test_dashboard import finish

CHROMIUM = Path("/usr/bin/chromium")
ARTIFACTS = Path(os.environ.get("ERPD_TEST_ARTIFACTS", "test-artifacts"))
ARGS = [
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--no-first-run",
    "--disable-quic",
]
pytestmark = pytest.mark.skipif(
    not CHROMIUM.exists(), reason="no /usr/bin/chromium (scripts/test-tools.sh installs it)"
)


class Dashboard:
    def __init__(self, live: Live) -> None:
        exe = Path(sys.executable).with_name("erpd-hub")
        import socket

        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            self.port = s.getsockname()[1]
        env = os.environ | {
            "ERPD_DASHBOARD_API_URL": f"{live.base}/api/v1",
            "ERPD_DASHBOARD_API_KEY": live.secret,
            "ERPD_DASHBOARD_REFRESH_S": "0.5",
        }
        self.process = subprocess.Popen(
            [str(exe), "dashboard", "--port", str(self.port)],
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            start_new_session=True,
        )
        assert self.process.stdout is not None
        for line in self.process.stdout:  # streamlit prints its URL once it serves
            if "URL:" in line:
                break
        else:
            raise AssertionError("the dashboard exited before serving")
        stream = self.process.stdout
        threading.Thread(target=stream.read, daemon=True).start()  # keep the pipe drained
        self.url = f"http://127.0.0.1:{self.port}"

    def close(self) -> None:
        os.killpg(self.process.pid, signal.SIGTERM)  # erpd-hub and its streamlit child
        try:
            self.process.wait(timeout=30)
        except subprocess.TimeoutExpired:
            os.killpg(self.process.pid, signal.SIGKILL)
            self.process.wait(timeout=30)


@pytest.fixture(scope="module")
def stack(
    databases: Databases, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[tuple[Live, Dashboard, sessionmaker[Session]]]:
    servers = start_live(databases, tmp_path_factory.mktemp("browser"))
    live = next(servers)
    dash = Dashboard(live)
    factory = session_factory(make_engine(live.settings.db_url))
    yield live, dash, factory
    dash.close()
    next(servers, None)


@pytest.fixture(scope="module")
def browser() -> Iterator[object]:
    from playwright.sync_api import sync_playwright

    with sync_playwright() as p:
        chromium = p.chromium.launch(executable_path=str(CHROMIUM), headless=True, args=ARGS)
        yield chromium
        chromium.close()


def charts(page: object, count: int) -> None:
    drawn = (
        "[...document.querySelectorAll('.js-plotly-plot')]"
        ".filter(p => p.querySelector('.main-svg'))"  # one per drawn chart (each has several)
    )
    page.wait_for_function(f"{drawn}.length >= {count}", timeout=90_000)  # type: ignore[attr-defined]


def test_a_finished_run_s_page_draws_its_charts(stack, browser) -> None:  # type: ignore[no-untyped-def]
    live, dash, factory = stack
    made = live.http.post("/runs", json={"kind": "stage1", "name": "browser-finished"}).json()
    finish(factory, uuid.UUID(made["id"]), RunKind.STAGE1, 5.0)
    page = browser.new_page(viewport={"width": 1600, "height": 1300})
    page.goto(f"{dash.url}/run?run={made['id']}")
    charts(page, 3)
    for title in ("KL budget", "Entropy collapse", "Accuracy"):
        page.get_by_text(title, exact=True).first.wait_for()
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    shot = ARTIFACTS / "dashboard-run-detail.png"
    page.screenshot(path=str(shot), full_page=True)
    assert shot.stat().st_size > 10_000
    page.close()


def test_new_points_appear_without_a_reload(stack, browser) -> None:  # type: ignore[no-untyped-def]
    live, dash, factory = stack
    made = live.http.post("/runs", json={"kind": "stage1", "name": "browser-live"}).json()
    run_id = uuid.UUID(made["id"])
    with factory.begin() as s:
        claim_run(s, run_id=run_id, worker="w", device="cpu")
        record_metrics(
            s,
            run_id=run_id,
            attempt=1,
            points=[Point(i, M.KL_EXACT, 0.001 * i, 0.0) for i in range(5)],
        )
    page = browser.new_page()
    page.goto(f"{dash.url}/run?run={made['id']}")
    page.get_by_text("last step 4").wait_for(timeout=90_000)
    charts(page, 3)
    page.evaluate("window.__stillTheSamePage = true")
    with factory.begin() as s:
        record_metrics(
            s,
            run_id=run_id,
            attempt=1,
            points=[Point(i, M.KL_EXACT, 0.001 * i, 0.0) for i in range(5, 12)],
        )
    page.get_by_text("last step 11").wait_for(timeout=30_000)  # the fragment polled them in
    assert page.evaluate("window.__stillTheSamePage === true")  # no reload happened
    page.close()
