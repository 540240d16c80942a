"""docker-compose.yml: validated by Debian's docker-compose (there is no Docker engine here), and
its service commands run natively, as written, against this machine's Postgres and Redis."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import uuid
from pathlib import Path
from typing import Any

import httpx
import pytest
import yaml
from transformers import AutoModelForCausalLM

from tests.conftest import random_qwen3_dir
from tests.integration.conftest import REDIS_URL, Databases, drop_queues, free_port
from tests.integration.test_worker import QUICK_BASE, WorkerLog, register_model, run_quick_sample

ROOT = Path(__file__).resolve().parents[2]
pytestmark = pytest.mark.skipif(
    shutil.which("docker-compose") is None,
    reason="no docker-compose (scripts/test-tools.sh installs it)",
)


# small enough for a plumbing test, on the quickly pretrained model
PIPELINE = {
    "name": "prod",
    "model": "quick",
    "sample": {"num_prompts": 16, "group_size": 4},
    "teachers": [{"objective": "sapo", "epochs": 2}],
    "stage2": {"epochs": 1},
    "eval": {"size": 20},
}


def compose_config() -> dict[str, Any]:
    done = subprocess.run(
        ["docker-compose", "--env-file", ".env.example", "config"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 0, done.stderr
    return yaml.safe_load(done.stdout)  # type: ignore[no-any-return]


def test_the_compose_file_is_valid_and_complete() -> None:
    services = compose_config()["services"]
    assert set(services) == {"postgres", "redis", "migrate", "api", "worker", "reaper", "dashboard"}
    [gpu] = services["worker"]["deploy"]["resources"]["reservations"]["devices"]
    assert gpu["driver"] == "nvidia" and gpu["capabilities"] == ["gpu"]
    assert services["api"]["depends_on"]["migrate"]["condition"] == "service_completed_successfully"
    assert all("healthcheck" in services[s] for s in ("postgres", "redis", "api"))
    for name in ("api", "dashboard"):  # published on the loopback only
        for published in services[name]["ports"]:  # "127.0.0.1:8000:8000/tcp" (compose 1.x)
            host = published["host_ip"] if isinstance(published, dict) else published.split(":")[0]
            assert host == "127.0.0.1", published
    env = services["api"]["environment"]
    assert env["ERPD_DATABASE_URL"].startswith("postgresql+psycopg://erpd:change-me@postgres")
    # SIGTERM: the worker finishes its step, saves and requeues; compose's 10 s default is short
    grace = str(services["worker"]["stop_grace_period"])  # "2m" or "2m0s", by compose version
    assert grace.startswith("2m"), grace


def test_the_compose_commands_run_natively_as_a_production_stack(
    databases: Databases, tmp_path: Path
) -> None:
    """migrate, api, worker and reaper with the compose file's own argv, on Postgres + Redis."""
    services = compose_config()["services"]
    db_url = databases.new_url("postgres")
    port = free_port()
    queue = f"test-{uuid.uuid4().hex[:10]}"
    env = {k: v for k, v in os.environ.items() if not k.startswith("ERPD_")} | {
        "ERPD_DATABASE_URL": db_url,
        "ERPD_BROKER_URL": REDIS_URL,
        "ERPD_HOME": str(tmp_path),
        "ERPD_QUEUE": queue,
        "ERPD_HOUSEKEEPING_QUEUE": f"{queue}-cpu",
    }
    bin_dir = Path(sys.executable).parent

    def argv(service: str) -> list[str]:
        words = list(services[service]["command"])
        words[0] = str(bin_dir / words[0])  # the image's erpd-hub is this venv's
        if "--host" in words:  # natively, on the loopback and a free port
            words[words.index("--host") + 1] = "127.0.0.1"
            words[words.index("--port") + 1] = str(port)
        return words

    assert subprocess.run(argv("migrate"), env=env, capture_output=True).returncode == 0
    exe = str(bin_dir / "erpd-hub")
    key = subprocess.run(
        [exe, "create-key", "prod"], env=env, capture_output=True, text=True
    ).stdout.split()[-1]
    register_model(db_url, "quick", QUICK_BASE)
    # an operator adds a local Hugging Face directory; a second time, the name is taken
    hf_dir = random_qwen3_dir(tmp_path / "qwen3-tiny")
    for expected in (0, 2):
        added = subprocess.run(
            [exe, "register-model", "qwen3-tiny", str(hf_dir)], env=env, capture_output=True
        )
        assert added.returncode == expected, added.stderr
    assert b"is taken" in added.stderr and b"Traceback" not in added.stderr
    procs = [
        subprocess.Popen(
            argv(s),
            env=env,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE if s == "api" else subprocess.DEVNULL,
            text=True,
            start_new_session=True,
        )
        for s in ("api", "worker", "reaper")
    ]
    try:
        WorkerLog(procs[0]).wait_for("Uvicorn running", timeout=60)  # drains the pipe after
        http = httpx.Client(
            base_url=f"http://127.0.0.1:{port}/api/v1",
            headers={"Authorization": f"Bearer {key}"},
            timeout=httpx.Timeout(30, read=300),
        )
        # what a user of the deployment does: a pipeline to its student, downloaded, verified
        # (the `worker --gpus 0` service runs it, on the CPU here)
        spec = tmp_path / "pipeline.yaml"
        spec.write_text(yaml.safe_dump(PIPELINE))
        demo = subprocess.run(
            [
                *(exe, "demo", "--no-wait", "--api-url", str(http.base_url).rstrip("/")),
                *("--key", key, "--pipeline", str(spec), "--out", str(tmp_path / "downloads")),
            ],
            env=env,
            capture_output=True,
            text=True,
            timeout=600,
        )
        assert demo.returncode == 0, demo.stdout[-3000:] + demo.stderr[-3000:]
        assert "[student] succeeded" in demo.stdout, demo.stdout
        assert "student downloaded to" in demo.stdout, demo.stdout  # the quick base learns
        # nothing in 2 epochs, so no headline here: the demo test checks it on the real one
        [student] = (tmp_path / "downloads").iterdir()
        assert AutoModelForCausalLM.from_pretrained(student).num_parameters() > 0
        assert run_quick_sample(http, model="qwen3-tiny") == "succeeded"  # the registered dir
        http.close()
    finally:
        for p in procs:
            os.killpg(p.pid, signal.SIGTERM)
        for p in procs:
            try:
                p.wait(timeout=60)
            except subprocess.TimeoutExpired:
                os.killpg(p.pid, signal.SIGKILL)
                p.wait()
        from server.settings import Settings

        drop_queues(Settings(queue=queue, housekeeping_queue=f"{queue}-cpu"))
