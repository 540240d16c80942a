"""`erpd-hub`: operate the service (migrate the run store, create API keys; more verbs arrive with
the API, worker and dashboard). Errors print one line and exit non-zero, never a traceback."""

from __future__ import annotations

import os
import sys
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any, NoReturn

import typer
from rich.console import Console
from sqlalchemy import Engine
from sqlalchemy.exc import ArgumentError, OperationalError

from server.settings import get_settings

if TYPE_CHECKING:
    from server.stack import Stack

app = typer.Typer(
    name="erpd-hub",
    help="erpd-hub: the ERPD service (run store, API, workers, dashboard).",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)
out = Console()
err = Console(stderr=True)


def _fail(message: str, code: int = 1) -> NoReturn:
    err.print(f"[bold red]error:[/bold red] {message}", highlight=False, soft_wrap=True)
    raise typer.Exit(code)


def _guard(fn: Callable[[], None]) -> None:
    from pydantic import ValidationError

    from server.services import ServiceError

    try:
        fn()
    except typer.Exit:
        raise
    except ValidationError as exc:
        first = exc.errors()[0]
        field = "ERPD_" + "_".join(str(p) for p in first["loc"]).upper()
        _fail(f"{field}: {first['msg']}", 2)
    except ServiceError as exc:
        _fail(str(exc), 2)
    except ArgumentError as exc:
        _fail(f"ERPD_DATABASE_URL: {exc}", 2)
    except OperationalError as exc:
        _fail(f"database unreachable: {str(exc.orig).strip().splitlines()[0]}", 1)
    except Exception as exc:  # a bug, not bad input: one line, traceback on request
        if os.environ.get("ERPD_DEBUG"):
            raise
        _fail(f"internal error: {type(exc).__name__}: {exc} (set ERPD_DEBUG=1 for a traceback)")


def say(line: str) -> None:
    """A line on stdout, as written (no markup, no wrapping), flushed at once."""
    out.print(line, highlight=False, soft_wrap=True, markup=False)
    sys.stdout.flush()


def _engine() -> Engine:
    from server.db import make_engine

    return make_engine(get_settings().db_url)


def _require_schema(engine: Engine) -> None:
    from server.db import migrate

    have, want = migrate.current(engine), migrate.head()
    if have != want:
        _fail(f"the database is at revision {have or 'empty'}, not {want}: run `erpd-hub migrate`")


@app.command()
def migrate(
    downgrade: Annotated[
        str | None,
        typer.Option("--downgrade", help="Go back to this revision ('base' = empty) instead."),
    ] = None,
) -> None:
    """Bring the run store's schema to the latest revision (safe to run again)."""

    def body() -> None:
        from server.db import migrate as m

        engine = _engine()
        before = m.current(engine)
        if downgrade is None:
            m.upgrade(engine, "head")
        else:
            m.downgrade(engine, downgrade)
        after = m.current(engine)
        url = engine.url.render_as_string(hide_password=True)
        out.print(
            f"{url}: revision {before or 'empty'} -> {after or 'empty'}",
            highlight=False,
            soft_wrap=True,
        )

    _guard(body)


@app.command("create-key")
def create_key(name: Annotated[str, typer.Argument(help="Who or what uses the key.")]) -> None:
    """Create an API key and print its secret (shown this once; only its hash is stored)."""

    def body() -> None:
        from server.db import session_factory, transaction
        from server.services import create_api_key

        engine = _engine()
        _require_schema(engine)
        with transaction(session_factory(engine)) as session:
            key, secret = create_api_key(session, name=name)
        err.print(
            f"created key {key.id} ({key.name}); store the secret now, it is not kept:",
            soft_wrap=True,
        )
        typer.echo(secret)

    _guard(body)


@app.command("revoke-key")
def revoke_key(
    key: Annotated[str, typer.Argument(help="The key's id, or its shown prefix (erpd_...).")],
) -> None:
    """Revoke an API key: requests with it get 401 from now on."""

    def body() -> None:
        import uuid

        from sqlalchemy import or_, select

        from server.db import ApiKey, session_factory, transaction
        from server.services import revoke_api_key

        engine = _engine()
        _require_schema(engine)
        with transaction(session_factory(engine)) as session:
            try:
                match = ApiKey.id == uuid.UUID(key)
            except ValueError:
                match = ApiKey.prefix == key
            found = session.scalars(select(ApiKey).where(or_(match))).all()
            if len(found) != 1:
                _fail(f"{key}: {'no' if not found else 'more than one'} key matches", 2)
            revoked = revoke_api_key(session, key_id=found[0].id)
        out.print(f"revoked key {revoked.id} ({revoked.name})", highlight=False, soft_wrap=True)

    _guard(body)


@app.command("register-model")
def register_model(
    name: Annotated[str, typer.Argument(help="What runs and pipelines call it (`model`).")],
    path: Annotated[
        Path, typer.Argument(help="A local Hugging Face model directory on the workers' disk.")
    ],
    description: Annotated[str, typer.Option(help="Shown by GET /models.")] = "",
) -> None:
    """Register a local Hugging Face model directory for every API key to train (an operator's
    step: the path is never taken from a request). Nothing is downloaded."""

    def body() -> None:
        from server.db import Model, RegistryKind, session_factory, transaction
        from server.services.registry import register

        folder = path.expanduser().resolve()
        if not (folder / "config.json").is_file():
            _fail(f"{path}: not a Hugging Face model directory (no config.json)", 2)
        engine = _engine()
        _require_schema(engine)
        with transaction(session_factory(engine)) as session:
            entry = register(
                session,
                Model,
                name=name,
                kind=RegistryKind.REGISTERED,
                location=str(folder),
                meta={"description": description} if description else {},
            )
        out.print(f"registered model {entry.name} ({entry.id}): {folder}", highlight=False)

    _guard(body)


@app.command()
def serve(
    host: Annotated[str | None, typer.Option(help="Bind address (default ERPD_HOST).")] = None,
    port: Annotated[int | None, typer.Option(help="Port (default ERPD_PORT).")] = None,
    workers: Annotated[
        int | None, typer.Option(min=1, help="API processes (default ERPD_API_WORKERS).")
    ] = None,
) -> None:
    """Run the REST API (uvicorn). Binds 127.0.0.1 unless told otherwise."""

    def body() -> None:
        import uvicorn

        settings = get_settings()
        engine = _engine()
        _require_schema(engine)
        engine.dispose()
        uvicorn.run(
            "server.main:create_app",
            factory=True,
            host=host or settings.host,
            port=port or settings.port,
            workers=workers or settings.api_workers,
            log_level="info",
        )

    _guard(body)


@app.command()
def worker(
    gpus: Annotated[
        str | None,
        typer.Option(help="GPU indices, e.g. 0,1: one solo-pool worker per GPU. None = CPU."),
    ] = None,
    group: Annotated[
        bool,
        typer.Option(
            help="One worker owns all the --gpus and runs each stage on runtime.gpus of them "
            "(torchrun, FSDP2): one worker per node."
        ),
    ] = False,
    housekeeping: Annotated[
        bool,
        typer.Option(help="Also start a worker for the cpu queue (webhook deliveries)."),
    ] = True,
    loglevel: Annotated[str, typer.Option(help="Celery log level.")] = "INFO",
) -> None:
    """Start the workers that run queued stages (one per GPU, or one on CPU) and a housekeeping
    worker, supervised: a signal reaches them all, and the command exits when they have."""

    def body() -> None:
        import signal
        import subprocess
        import time

        settings = get_settings()
        engine = _engine()
        _require_schema(engine)
        engine.dispose()
        slots = [None] if gpus is None else [g.strip() for g in gpus.split(",") if g.strip()]
        for slot in slots:
            if slot is not None and not slot.isdigit():
                _fail(f"--gpus: {slot!r} is not a GPU index", 2)

        def celery(name: str, queues: list[str], pool: str, concurrency: int) -> list[str]:
            return [
                sys.executable,
                "-m",
                "celery",
                "-A",
                "worker.celery_app",
                "worker",
                "--pool",
                pool,
                "--concurrency",
                str(concurrency),
                "--queues",
                ",".join(queues),
                "--hostname",
                f"{name}@%h",
                "--loglevel",
                loglevel,
            ]

        if group and gpus is None:
            _fail("--group: name the GPUs the worker owns with --gpus", 2)
        children = []
        # a stage runs for hours: housekeeping messages must not wait behind one
        for owned in [slots] if group else [[slot] for slot in slots]:
            env = dict(os.environ) | {"ERPD_WORKER_GPUS": str(len(owned))}
            queues, name = [settings.queue], "erpd-cpu"
            if owned != [None]:
                env["CUDA_VISIBLE_DEVICES"] = ",".join(str(s) for s in owned)
                queues += [f"{settings.queue}.{s}" for s in owned]
                name = "erpd-gpu" + "-".join(str(s) for s in owned)
            children.append(subprocess.Popen(celery(name, queues, "solo", 1), env=env))
        if housekeeping:
            # webhook deliveries wait on remote hosts: a few threads, no GPU
            env = dict(os.environ) | {"CUDA_VISIBLE_DEVICES": ""}
            # named after the slots: `worker --gpus 0` and `--gpus 1` on one host stay distinct
            suffix = "".join(f"-gpu{slot}" for slot in slots if slot is not None)
            argv = celery(f"erpd-housekeeping{suffix}", [settings.housekeeping_queue], "threads", 4)
            children.append(subprocess.Popen(argv, env=env))

        signalled = []

        def forward(signum: int, _frame: object) -> None:
            signalled.append(signum)
            for child in children:
                if child.poll() is None:
                    child.send_signal(signum)

        signal.signal(signal.SIGTERM, forward)
        signal.signal(signal.SIGINT, forward)
        while all(child.poll() is None for child in children):
            time.sleep(0.5)
        if not signalled:  # one died on its own (e.g. killed for memory): stop the rest
            dead = next(child for child in children if child.poll() is not None)
            for child in children:
                if child.poll() is None:
                    child.terminate()
            for child in children:
                child.wait()
            _fail(f"a Celery worker exited with code {dead.returncode}; stopped the others")
        codes = [child.wait() for child in children]
        if any(codes):
            raise typer.Exit(1)

    _guard(body)


@app.command()
def reaper(
    every: Annotated[float, typer.Option(help="Seconds between rounds.", min=0.1)] = 30.0,
    once: Annotated[bool, typer.Option(help="One round, then exit.")] = False,
) -> None:
    """Requeue runs whose worker went silent (ERPD_HEARTBEAT_TIMEOUT_S), fail them after
    max_attempts, and publish every queued, ready run that has no message (the outbox)."""

    def body() -> None:
        import signal
        import threading
        from datetime import timedelta

        from server.db import read_session_factory, session_factory
        from server.queue import Broker
        from server.services.reaper import reap

        settings = get_settings()
        engine = _engine()
        _require_schema(engine)
        writes, reads = session_factory(engine), read_session_factory(engine)
        broker = Broker(settings.broker, settings.queue, settings.housekeeping_queue)
        stop = threading.Event()
        signal.signal(signal.SIGTERM, lambda *_: stop.set())
        signal.signal(signal.SIGINT, lambda *_: stop.set())
        timeout = timedelta(seconds=settings.heartbeat_timeout_s)
        republish = timedelta(seconds=settings.republish_after_s)
        err.print(f"reaper: every {every:g} s, heartbeat timeout {timeout}", highlight=False)
        while True:
            try:
                for r in reap(writes, reads, broker, timeout=timeout, republish_after=republish):
                    err.print(f"reaper: run {r.run_id} -> {r.status}: {r.reason}", highlight=False)
            except OperationalError as exc:  # the store is away: try again next round
                err.print(f"reaper: database unreachable ({type(exc.orig).__name__})")
            if once or stop.wait(every):
                break
        broker.close()
        engine.dispose()

    _guard(body)


@app.command()
def dashboard(
    host: Annotated[str, typer.Option(help="Bind address.")] = "127.0.0.1",
    port: Annotated[
        int, typer.Option(envvar="ERPD_DASHBOARD_PORT", help="Port.", min=1, max=65535)
    ] = 8501,
    api_url: Annotated[
        str | None, typer.Option(help="The API it reads (default ERPD_DASHBOARD_API_URL).")
    ] = None,
) -> None:
    """Run the Streamlit dashboard. It reads the REST API only; binds 127.0.0.1 by default.
    The API key comes from ERPD_DASHBOARD_API_KEY or the sidebar."""

    def body() -> None:
        import signal
        import subprocess
        import sys
        from pathlib import Path

        app_file = Path(__file__).resolve().parents[1] / "dashboard" / "app.py"
        env = dict(os.environ)
        if api_url:
            env["ERPD_DASHBOARD_API_URL"] = api_url
        argv = [
            sys.executable,
            "-m",
            "streamlit",
            "run",
            str(app_file),
            "--server.address",
            host,
            "--server.port",
            str(port),
            "--server.headless",
            "true",
            "--browser.gatherUsageStats",
            "false",
            "--global.developmentMode",
            "false",
            "--client.toolbarMode",
            "viewer",
        ]
        child = subprocess.Popen(argv, env=env)

        def forward(signum: int, _frame: object) -> None:  # stopping this stops streamlit
            child.send_signal(signum)

        signal.signal(signal.SIGTERM, forward)
        signal.signal(signal.SIGINT, forward)
        raise typer.Exit(child.wait())

    _guard(body)


def supervise(on_up: Callable[[Stack], None], **options: Any) -> None:
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
            err.print("erpd-hub: stopping (a running stage gets up to 30 s to finish)")
    except StackError as exc:
        _fail(str(exc))
    finally:
        if stack is not None:
            stack.supervisor.stop()
    if died is not None and stack is not None:
        _fail(stack.supervisor.died(died))


@app.command()
def up(
    gpus: Annotated[
        str | None, typer.Option(help="GPU indices for the worker, e.g. 0,1. None = CPU.")
    ] = None,
    api_port: Annotated[int | None, typer.Option(help="API port (default ERPD_PORT).")] = None,
    dashboard_port: Annotated[
        int, typer.Option(envvar="ERPD_DASHBOARD_PORT", help="Dashboard port.")
    ] = 8501,
    dashboard_: Annotated[
        bool, typer.Option("--dashboard/--no-dashboard", help="Start the dashboard too.")
    ] = True,
    reap_every: Annotated[float, typer.Option(help="Seconds between reaper rounds.")] = 5.0,
) -> None:
    """The whole embedded stack, supervised: migrations, the API, a worker (CPU or each GPU),
    the reaper and the dashboard, under ERPD_HOME. Ctrl-C stops it all."""

    def body() -> None:
        supervise(
            lambda stack: say("\n".join([*stack.banner, "Ctrl-C stops everything."])),
            gpus=gpus,
            api_port=api_port,
            dashboard_port=dashboard_port if dashboard_ else None,
            reap_every=reap_every,
        )
        err.print("erpd-hub: stopped", highlight=False)

    _guard(body)


@app.command()
def status() -> None:
    """Workers (Celery ping), queue depths, and the runs running now (from the store)."""

    def body() -> None:
        from celery import Celery
        from sqlalchemy import select

        from server.db import Run, RunStatus, read_session_factory, utcnow
        from server.queue import Broker

        settings = get_settings()
        engine = _engine()
        _require_schema(engine)
        app_ = Celery("erpd-hub-status", broker=settings.broker, set_as_current=False)
        # a solo-pool worker busy with a run cannot answer a ping: busy ones come from the store
        replies = app_.control.ping(timeout=1.0) or []
        idle = sorted(name for reply in replies for name in reply)
        out.print(
            f"idle workers ({len(idle)}): {', '.join(idle) or 'none answering'}",
            highlight=False,
            soft_wrap=True,
        )
        broker = Broker(settings.broker, settings.queue, settings.housekeeping_queue)
        for queue in (settings.queue, settings.housekeeping_queue):
            depth = broker.depth(queue)
            out.print(f"queue {queue}: {'?' if depth is None else depth} waiting", highlight=False)
        now = utcnow()
        with read_session_factory(engine)() as session:
            running = session.scalars(
                select(Run).where(Run.status == RunStatus.RUNNING).order_by(Run.started_at)
            ).all()
        busy = sorted({run.worker for run in running if run.worker})
        out.print(f"busy workers ({len(busy)}): {', '.join(busy) or 'none'}", highlight=False)
        out.print(f"running runs: {len(running)}", highlight=False)
        for run in running:  # one plain line each: easy to grep
            beat = (now - (run.heartbeat_at or run.started_at or now)).total_seconds()
            out.print(
                f"  {run.id}  {run.name}  on {run.worker}  attempt {run.attempt}/"
                f"{run.max_attempts}  step {run.progress_step or 0}/{run.progress_total or '?'}"
                f"  heartbeat {beat:.0f} s ago",
                highlight=False,
                soft_wrap=True,
            )
        engine.dispose()

    _guard(body)


def _register_client_verbs() -> None:
    from server import cli_client, demo

    cli_client.register(app)
    demo.register(app)


_register_client_verbs()


def main() -> None:
    app()
