"""`erpd-hub`: operate the service (migrate the run store, manage API keys, run the API, workers,
reaper and dashboard, or all of them at once) and use it (submit, follow, download, the demo).
Errors print one line and exit non-zero, never a traceback.

Each command module registers its commands on the one Typer app of app.py when imported here;
they share app.py and nothing of each other.
"""

from __future__ import annotations

from server.cli import client, demo, ops, processes
from server.cli.app import app

__all__ = ["app", "client", "demo", "main", "ops", "processes"]

# `erpd-hub --help` lists the commands in the order a deployment meets them, not by module
ORDER = (
    "migrate",
    "create-key",
    "revoke-key",
    "register-model",
    "serve",
    "worker",
    "reaper",
    "dashboard",
    "up",
    "status",
    "submit",
    "runs",
    "logs",
    "download",
    "demo",
)


def _position(name: str) -> int:
    return ORDER.index(name) if name in ORDER else len(ORDER)


app.registered_commands.sort(
    key=lambda c: _position(c.name or getattr(c.callback, "__name__", "").replace("_", "-"))
)


def main() -> None:
    app()
