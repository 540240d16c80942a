"""What the benchmarks share: a throwaway Postgres database, free ports, waiting for a child
process to say it is ready (by its own log line, not a timer), the machine a result came from,
and writing results as JSON."""

from __future__ import annotations

import json
import os
import platform
import socket
import subprocess
import threading
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

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


def machine(device: Any = None) -> str:
    """The CPU (model and the threads torch uses) or the CUDA card a number was measured on."""
    import torch

    if device is not None and str(device).startswith("cuda"):
        return f"{torch.cuda.get_device_name(device)}, torch {torch.__version__}"
    model = platform.processor() or platform.machine()
    cpuinfo = Path("/proc/cpuinfo")
    if cpuinfo.is_file():
        for line in cpuinfo.read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    return (
        f"{model}, {torch.get_num_threads()} threads of {os.cpu_count()}, torch {torch.__version__}"
    )


def write_json(path: str | Path, body: dict[str, Any]) -> None:
    """The benchmark's numbers, for the record (benchmarks/README.md quotes them)."""
    out = Path(path)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(body, indent=2) + "\n")
    print(f"wrote {out}")
