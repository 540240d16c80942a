"""`erpd-hub up`: the embedded stack as child processes, supervised.

Migrations run first, in this process. Then the API, one worker command (CPU, or one per GPU with
`--gpus`), the reaper and the dashboard start as the same `erpd-hub` commands a production
deployment runs one by one. If one of them dies, the others are stopped and `up` exits non-zero,
naming it. Ctrl-C or SIGTERM stops them all (SIGTERM first, SIGKILL after a grace period).

The first API key is created once and kept in `<ERPD_HOME>/api-key` (mode 0600), so the dashboard
and `make demo` can use it and a second `up` prints the same key.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

import httpx

from server.settings import Settings

EXE = Path(sys.executable).with_name("erpd-hub")
GRACE_S = 30.0


def ensure_key(settings: Settings) -> str:
    """The local stack's API key: the saved one while it is valid, else a new one."""
    from server.db import make_engine, session_factory
    from server.services import authenticate, create_api_key

    path = settings.home / "api-key"
    engine = make_engine(settings.db_url)
    try:
        with session_factory(engine).begin() as session:
            if path.is_file():
                saved = path.read_text().strip()
                if saved and authenticate(session, secret=saved) is not None:
                    return saved
            _, secret = create_api_key(session, name="local")
    finally:
        engine.dispose()
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write(secret + "\n")
    return secret


@dataclass
class Supervisor:
    env: dict[str, str]
    children: dict[str, subprocess.Popen[bytes]] = field(default_factory=dict)
    stopping: threading.Event = field(default_factory=threading.Event)

    def start(self, name: str, *args: str, env: dict[str, str] | None = None) -> None:
        self.children[name] = subprocess.Popen([str(EXE), *args], env=env or self.env)

    def handle_signals(self) -> None:
        for sig in (signal.SIGINT, signal.SIGTERM):
            signal.signal(sig, lambda *_: self.stopping.set())

    def watch(self) -> str | None:
        """Until a signal (None) or a child's death (its name)."""
        while not self.stopping.wait(0.5):
            for name, child in self.children.items():
                if child.poll() is not None:
                    return name
        return None

    def stop(self) -> None:
        for child in self.children.values():
            if child.poll() is None:
                child.send_signal(signal.SIGTERM)
        deadline = time.monotonic() + GRACE_S
        for child in self.children.values():
            try:
                child.wait(timeout=max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                child.kill()
                child.wait()


def wait_until_serving(url: str, child: subprocess.Popen[bytes], timeout_s: float = 90) -> bool:
    """Poll the API's liveness endpoint while it starts (its child may die instead)."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline and child.poll() is None:
        try:
            if httpx.get(f"{url}/healthz", timeout=2).status_code == 200:
                return True
        except httpx.HTTPError:
            pass
        time.sleep(0.2)
    return False
