"""`erpd-hub up`: the embedded stack as child processes, supervised; and the one supervisor that
`up`, `demo`, `worker` and `dashboard` all run their child processes under.

Migrations run first, in this process. Then the API, one worker command (CPU, or one per GPU with
`--gpus`), the reaper and the dashboard start as the same `erpd-hub` commands a production
deployment runs one by one. If one of them dies, the others are stopped and `up` exits non-zero,
naming it. Ctrl-C or SIGTERM stops them all (SIGTERM first, SIGKILL after a grace period).

The first API key is created once and kept in `<ERPD_HOME>/api-key` (mode 0600), so the dashboard
and `make demo` can use it and a second `up` prints the same key.
"""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

import httpx

from server.settings import Settings

EXE = Path(sys.executable).with_name("erpd-hub")


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
    os.fchmod(fd, 0o600)  # a file that existed keeps its old mode otherwise
    with os.fdopen(fd, "w") as f:
        f.write(secret + "\n")
    return secret


@dataclass
class Supervisor:
    """Child processes, watched until a signal stops them or one of them dies.

    Detached children (the stack's `erpd-hub` commands) each get a process group of their own:
    a Ctrl-C in the terminal reaches only this process, which stops them in order (SIGTERM, then
    SIGKILL to the whole group after a grace period, so a worker's Celery processes never outlive
    it). Attached children (`worker`'s Celery processes, `dashboard`'s Streamlit) share this
    process's group, so whoever stops the group stops them too: a signal this process gets is
    passed on to them, and they get as long as they need to stop (a warm Celery shutdown
    finishes the stage it runs)."""

    env: dict[str, str]
    log_dir: Path | None = None  # None: the children write to this terminal
    detached: bool = True
    grace_s: float = 120.0  # ERPD_STOP_GRACE_S: how long detached children get to stop
    children: dict[str, subprocess.Popen[bytes]] = field(default_factory=dict)
    stopping: threading.Event = field(default_factory=threading.Event)
    signalled: bool = False  # stopped by SIGINT/SIGTERM, not by the code that runs the stack

    def start(self, name: str, *args: str, env: dict[str, str] | None = None) -> None:
        """An `erpd-hub` command (this installation's) as a child."""
        self.spawn(name, [str(EXE), *args], env=env)

    def spawn(self, name: str, argv: list[str], env: dict[str, str] | None = None) -> None:
        """Any program as a child; a name already taken gets a number (`worker --gpus 0,0`)."""
        key, n = name, 1
        while key in self.children:
            n += 1
            key = f"{name}#{n}"
        env = env or self.env
        if self.log_dir is None:
            self.children[key] = subprocess.Popen(argv, env=env, start_new_session=self.detached)
            return
        self.log_dir.mkdir(parents=True, exist_ok=True)
        with self.log(key).open("wb") as log:  # this session's output only
            self.children[key] = subprocess.Popen(
                argv,
                env=env,
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=self.detached,
            )

    def log(self, name: str) -> Path:
        assert self.log_dir is not None
        return self.log_dir / f"{name}.log"

    def died(self, name: str) -> str:
        """What to tell the user when child `name` exited: how, and its log's last line."""
        code = self.children[name].returncode
        how = f"was killed by signal {-code}" if code is not None and code < 0 else "exited"
        if self.log_dir is None:
            return f"the {name} process {how}; everything was stopped"
        lines = self.log(name).read_text(errors="replace").strip().splitlines()
        last = f": {lines[-1].strip()}" if lines else ""
        return f"the {name} process {how}{last} (log: {self.log(name)}); everything was stopped"

    def handle_signals(self) -> None:
        """SIGINT and SIGTERM stop the watch; attached children get the same signal at once
        (only this process may have been signalled). Call it after starting attached children:
        a signal that came before them would reach none of them."""

        def on_signal(signum: int, _frame: object) -> None:
            self.signalled = True
            if not self.detached:
                self.forward(signum)
            self.stopping.set()

        for sig in (signal.SIGINT, signal.SIGTERM):
            signal.signal(sig, on_signal)

    def forward(self, signum: int) -> None:
        for child in self.children.values():
            if child.poll() is None:
                child.send_signal(signum)

    def dead(self) -> str | None:
        return next((n for n, c in self.children.items() if c.poll() is not None), None)

    def watch(self) -> str | None:
        """Until `stopping` is set (None) or a child dies (its name). A child found dead when
        the code, not a signal, stopped the stack is reported too: its death may be why."""
        while not self.stopping.wait(0.5):
            if (name := self.dead()) is not None:
                return name
        return None if self.signalled else self.dead()

    def wait(self) -> dict[str, int]:
        """Each child's exit code, once every child has exited."""
        return {name: child.wait() for name, child in self.children.items()}

    def stop(self) -> None:
        """SIGTERM to every child still running; attached children are then awaited however
        long they take, detached ones get `grace_s` before their whole group is killed."""
        self.forward(signal.SIGTERM)
        if not self.detached:
            self.wait()
            return
        deadline = time.monotonic() + self.grace_s
        for child in self.children.values():
            with contextlib.suppress(subprocess.TimeoutExpired):
                child.wait(timeout=max(0.1, deadline - time.monotonic()))
        for child in self.children.values():  # what is left of each group (e.g. Celery)
            with contextlib.suppress(ProcessLookupError):
                os.killpg(child.pid, signal.SIGKILL)
            child.wait()


class StackError(Exception):
    """The stack could not start, or one of its processes died (the message says which)."""


@dataclass
class Stack:
    """A started embedded stack: its supervisor, API URL and key, and what to tell the user."""

    supervisor: Supervisor
    api_url: str
    key: str
    banner: list[str]


def start_stack(
    settings: Settings,
    *,
    gpus: str | None = None,
    api_port: int | None = None,
    dashboard_port: int | None = 8501,
    reap_every: float = 5.0,
    log_dir: Path | None = None,
) -> Stack:
    """Migrate, make the key, then start the API (awaited), worker, reaper and dashboard
    (`dashboard_port=None`: none), their output in `log_dir/<name>.log` if given. Signals stop
    the returned supervisor's watch; the caller stops it; a failed start stops what it
    started."""
    from server.db import make_engine, migrate

    settings.home.mkdir(parents=True, exist_ok=True)
    engine = make_engine(settings.db_url)
    try:
        migrate.upgrade(engine)
    finally:
        engine.dispose()
    key = ensure_key(settings)
    port = api_port or settings.port
    api_url = f"http://{settings.host}:{port}/api/v1"
    env = dict(os.environ) | {"ERPD_HOME": str(settings.home.resolve())}
    sup = Supervisor(env, log_dir, grace_s=settings.stop_grace_s)
    sup.handle_signals()
    stack = Stack(sup, api_url, key, [])
    try:
        if not port_is_free(settings.host, port):
            raise StackError(f"port {port} is taken (another erpd-hub?): set ERPD_PORT")
        sup.start("api", "serve", "--port", str(port))
        if not wait_until_serving(api_url, sup.children["api"], sup.stopping):
            if sup.stopping.is_set():  # Ctrl-C while it started: the caller sees a stop
                return stack
            raise StackError(f"the API did not start on port {port}: " + sup.died("api"))
        sup.start("worker", "worker", *(["--gpus", gpus] if gpus else []))
        sup.start("reaper", "reaper", "--every", str(reap_every))
        stack.banner = [
            f"erpd-hub is up (data in {settings.home})",
            f"  API        {api_url}   (docs: {api_url}/docs)",
        ]
        if dashboard_port is not None:
            dash_env = env | {"ERPD_DASHBOARD_API_URL": api_url, "ERPD_DASHBOARD_API_KEY": key}
            sup.start("dashboard", "dashboard", "--port", str(dashboard_port), env=dash_env)
            stack.banner.append(f"  dashboard  http://127.0.0.1:{dashboard_port}")
        stack.banner.append(f"  API key    {key}   (kept in {settings.home / 'api-key'})")
    except BaseException:
        sup.stop()
        raise
    return stack


def port_is_free(host: str, port: int) -> bool:
    with socket.socket() as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind((host, port))
        except OSError:
            return False
    return True


def wait_until_serving(
    url: str,
    child: subprocess.Popen[bytes],
    stop: threading.Event | None = None,
    timeout_s: float = 90,
) -> bool:
    """Poll the API's liveness endpoint while it starts (its child may die, or a signal stop
    the wait, instead)."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline and child.poll() is None:
        if stop is not None and stop.is_set():
            return False
        try:
            if httpx.get(f"{url}/healthz", timeout=2).status_code == 200:
                return True
        except httpx.HTTPError:
            pass
        time.sleep(0.2)
    return False
