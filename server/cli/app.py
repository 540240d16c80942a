"""The one Typer app of `erpd-hub` and what every command module shares: the consoles, `say` and
`fail`, the `guarded` decorator that turns any error into one line and an exit code (never a
traceback), the run store's engine behind a schema check, the REST client behind a key, and the
supervised embedded stack. Command modules import this module and nothing of each other.
"""

from __future__ import annotations

import functools
import os
import sys
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any, NoReturn, ParamSpec

import typer
from rich.console import Console
from sqlalchemy import Engine
from sqlalchemy.exc import ArgumentError, OperationalError

from erpd_hub.client import ApiClient, ApiError
from server.settings import get_settings

if TYPE_CHECKING:
    from server.stack import Stack

P = ParamSpec("P")

app = typer.Typer(
    name="erpd-hub",
    help="erpd-hub: the ERPD service (run store, API, workers, dashboard).",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)
out = Console()
err = Console(stderr=True)

# the client verbs' connection options (ERPD_API_URL, ERPD_API_KEY)
ApiUrl = Annotated[
    str | None, typer.Option("--api-url", envvar="ERPD_API_URL", help="The API, e.g. .../api/v1.")
]
Key = Annotated[
    str | None,
    typer.Option("--key", envvar="ERPD_API_KEY", help="API key (default: $ERPD_HOME/api-key)."),
]


def fail(message: str, code: int = 1) -> NoReturn:
    err.print(f"[bold red]error:[/bold red] {message}", highlight=False, soft_wrap=True)
    raise typer.Exit(code)


def say(line: str) -> None:
    """A line on stdout, as written (no markup, no wrapping), flushed at once."""
    out.print(line, highlight=False, soft_wrap=True, markup=False)
    sys.stdout.flush()


def guarded(command: Callable[P, None]) -> Callable[P, None]:
    """Run a command so that every failure is one line on stderr and an exit code: 2 for what
    the user can fix (a bad setting, a refused request, an API 4xx), 1 otherwise. Put it under
    `@app.command()`: Typer reads the command's signature and help through the wrapper."""

    @functools.wraps(command)
    def run(*args: P.args, **kwargs: P.kwargs) -> None:
        from pydantic import ValidationError

        from server.services import ServiceError

        try:
            command(*args, **kwargs)
        except typer.Exit:
            raise
        except ValidationError as exc:
            first = exc.errors()[0]
            field = "ERPD_" + "_".join(str(p) for p in first["loc"]).upper()
            fail(f"{field}: {first['msg']}", 2)
        except ServiceError as exc:
            fail(str(exc), 2)
        except ApiError as exc:
            where = f" (field {exc.field})" if exc.field else ""
            fail(f"{exc.message}{where}", 2 if 400 <= exc.status < 500 else 1)
        except ArgumentError as exc:
            fail(f"ERPD_DATABASE_URL: {exc}", 2)
        except OperationalError as exc:
            fail(f"database unreachable: {str(exc.orig).strip().splitlines()[0]}", 1)
        except Exception as exc:  # a bug, not bad input: one line, traceback on request
            if os.environ.get("ERPD_DEBUG"):
                raise
            fail(f"internal error: {type(exc).__name__}: {exc} (set ERPD_DEBUG=1 for a traceback)")

    return run


def engine(*, migrated: bool = True) -> Engine:
    """The run store's engine; `migrated`: refuse (one line) a store not at the latest revision,
    so no command runs against a schema it does not know."""
    from server.db import make_engine, migrate

    store = make_engine(get_settings().db_url)
    if migrated:
        have, want = migrate.current(store), migrate.head()
        if have != want:
            fail(
                f"the database is at revision {have or 'empty'}, not {want}: run `erpd-hub migrate`"
            )
    return store


def connect(api_url: str | None, key: str | None) -> ApiClient:
    """The REST client for the client verbs: the API at `api_url` (default this machine's
    ERPD_PORT) with `key` (default the one `erpd-hub up` keeps in $ERPD_HOME/api-key)."""
    settings = get_settings()
    url = api_url or f"http://127.0.0.1:{settings.port}/api/v1"
    if not key:
        saved = settings.home / "api-key"
        key = saved.read_text().strip() if saved.is_file() else None
    if not key:
        fail("no API key: pass --key, set ERPD_API_KEY, or run `erpd-hub up` once", 2)
    return ApiClient(url, key)


def load_spec(path: Path) -> dict[str, Any]:
    """A pipeline (or run) description from a YAML or JSON file; a bad one is one line, exit 2."""
    import yaml

    try:
        data = yaml.safe_load(path.read_text())
    except (OSError, UnicodeDecodeError, yaml.YAMLError) as exc:
        fail(f"{path}: {exc}", 2)
    if not isinstance(data, dict):
        fail(f"{path}: expected a mapping of pipeline (or run) fields", 2)
    return data


def run_stack(on_up: Callable[[Stack], None], **options: Any) -> None:
    """Start the embedded stack (`start_stack` options), call `on_up` with it, and keep it until
    a signal or `stopping` is set (returns) or a child dies (stops the rest, one-line error)."""
    from server.stack import StackError, start_stack

    stack: Stack | None = None
    died: str | None = None
    try:
        stack = start_stack(get_settings(), **options)
        if not stack.supervisor.stopping.is_set():  # not stopped while it started
            on_up(stack)
        died = stack.supervisor.watch()
        if stack.supervisor.signalled:
            grace = stack.supervisor.grace_s
            err.print(f"erpd-hub: stopping (a running stage saves and is requeued; {grace:.0f} s)")
    except StackError as exc:
        fail(str(exc))
    finally:
        if stack is not None:
            stack.supervisor.stop()
    if died is not None and stack is not None:
        fail(stack.supervisor.died(died))
