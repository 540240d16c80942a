"""`erpd-hub up`: the embedded stack from nothing but ERPD_HOME, used over REST, then stopped with
SIGTERM leaving no process behind."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

import httpx

from tests.integration.conftest import free_port
from tests.integration.test_worker import QUICK_BASE, register_model, run_quick_sample


def test_up_serves_a_run_end_to_end_and_stops_everything(tmp_path: Path) -> None:
    exe = str(Path(sys.executable).with_name("erpd-hub"))
    env = {k: v for k, v in os.environ.items() if not k.startswith("ERPD_")}
    env["ERPD_HOME"] = str(tmp_path / "home")
    api_port, dash_port = free_port(), free_port()
    up = subprocess.Popen(
        [exe, "up", "--api-port", str(api_port), "--dashboard-port", str(dash_port)],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
        text=True,
        start_new_session=True,  # its own process group: whatever it leaves behind is findable
    )
    try:
        assert up.stdout is not None
        printed = []
        for line in up.stdout:  # it prints its URLs and key once everything is started
            printed.append(line)
            if "Ctrl-C stops everything." in line:
                break
        text = "".join(printed)
        assert f"http://127.0.0.1:{api_port}/api/v1" in text, text
        assert f"http://127.0.0.1:{dash_port}" in text
        key = next(line.split()[2] for line in printed if line.strip().startswith("API key"))
        saved = tmp_path / "home" / "api-key"
        assert saved.read_text().strip() == key and saved.stat().st_mode & 0o777 == 0o600
        register_model(f"sqlite:///{tmp_path}/home/erpd.db", "quick", QUICK_BASE)
        http = httpx.Client(
            base_url=f"http://127.0.0.1:{api_port}/api/v1",
            headers={"Authorization": f"Bearer {key}"},
            timeout=httpx.Timeout(30, read=300),
        )
        assert run_quick_sample(http) == "succeeded"
        assert httpx.get(f"http://127.0.0.1:{dash_port}/_stcore/health", timeout=10).text == "ok"
        http.close()
    finally:
        up.send_signal(signal.SIGTERM)
        code = up.wait(timeout=90)
    assert code == 0
    try:
        os.killpg(up.pid, 0)  # anything left in its process group?
        leftover = True
    except ProcessLookupError:
        leftover = False
    assert not leftover, "a child of erpd-hub up outlived it"
