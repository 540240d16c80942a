"""What the service benchmarks share: a throwaway Postgres database, free ports, and waiting for
a child process to say it is ready (by its own log line, not a timer)."""

from __future__ import annotations

import socket
import subprocess
import threading
import uuid
from collections.abc import Iterator
from contextlib import contextmanager

from sqlalchemy import create_engine, text
from sqlalchemy.engine import make_url

POSTGRES_URL = "postgresql+psycopg://postgres@127.0.0.1:5432/test"
REDIS_URL = "redis://127.0.0.1:6379/0"


@contextmanager
def postgres_database(admin_url: str = POSTGRES_URL) -> Iterator[str]:
    """A new, empty database on the server; dropped afterwards. Yields its URL."""
    name = f"erpd_bench_{uuid.uuid4().hex[:8]}"
    admin = create_engine(admin_url, isolation_level="AUTOCOMMIT")
    with admin.connect() as conn:
        conn.execute(text(f'CREATE DATABASE "{name}"'))
    try:
        yield make_url(admin_url).set(database=name).render_as_string(hide_password=False)
    finally:
        with admin.connect() as conn:
            conn.execute(text(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))
        admin.dispose()


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def await_line(process: subprocess.Popen[str], wanted: str, stream_name: str = "stderr") -> None:
    """Read the process's output until a line contains `wanted`, then keep draining it in the
    background (a full pipe would block the process)."""
    stream = getattr(process, stream_name)
    assert stream is not None
    seen = []
    for line in stream:
        seen.append(line)
        if wanted in line:
            threading.Thread(target=stream.read, daemon=True).start()
            return
    raise SystemExit(f"process exited before {wanted!r}:\n{''.join(seen[-20:])}")
