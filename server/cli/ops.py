"""Operator commands: migrate the run store, create and revoke API keys, register a model, run
the reaper, and show what the workers are doing. They reach the store only through the service
layer and server/db (no SQL here)."""

from __future__ import annotations

import signal
import threading
from datetime import timedelta
from pathlib import Path
from typing import Annotated

import typer
from sqlalchemy.exc import OperationalError

from server.cli.app import app, engine, err, fail, guarded, out
from server.settings import get_settings


@app.command()
@guarded
def migrate(
    downgrade: Annotated[
        str | None,
        typer.Option("--downgrade", help="Go back to this revision ('base' = empty) instead."),
    ] = None,
) -> None:
    """Bring the run store's schema to the latest revision (safe to run again)."""
    from server.db import migrate as m

    store = engine(migrated=False)
    before = m.current(store)
    if downgrade is None:
        m.upgrade(store, "head")
    else:
        m.downgrade(store, downgrade)
    after = m.current(store)
    url = store.url.render_as_string(hide_password=True)
    out.print(
        f"{url}: revision {before or 'empty'} -> {after or 'empty'}",
        highlight=False,
        soft_wrap=True,
    )


@app.command("create-key")
@guarded
def create_key(name: Annotated[str, typer.Argument(help="Who or what uses the key.")]) -> None:
    """Create an API key and print its secret (shown this once; only its hash is stored)."""
    from server.db import session_factory, transaction
    from server.services import create_api_key

    with transaction(session_factory(engine())) as session:
        key, secret = create_api_key(session, name=name)
    err.print(
        f"created key {key.id} ({key.name}); store the secret now, it is not kept:",
        soft_wrap=True,
    )
    typer.echo(secret)


@app.command("revoke-key")
@guarded
def revoke_key(
    key: Annotated[str, typer.Argument(help="The key's id, or its shown prefix (erpd_...).")],
) -> None:
    """Revoke an API key: requests with it get 401 from now on."""
    from server.db import session_factory, transaction
    from server.services import revoke_api_key
    from server.services.keys import find_api_keys

    with transaction(session_factory(engine())) as session:
        found = find_api_keys(session, id_or_prefix=key)
        if len(found) != 1:
            fail(f"{key}: {'no' if not found else 'more than one'} key matches", 2)
        revoked = revoke_api_key(session, key_id=found[0].id)
    out.print(f"revoked key {revoked.id} ({revoked.name})", highlight=False, soft_wrap=True)


@app.command("register-model")
@guarded
def register_model(
    name: Annotated[str, typer.Argument(help="What runs and pipelines call it (`model`).")],
    path: Annotated[
        Path, typer.Argument(help="A local Hugging Face model directory on the workers' disk.")
    ],
    description: Annotated[str, typer.Option(help="Shown by GET /models.")] = "",
) -> None:
    """Register a local Hugging Face model directory for every API key to train (an operator's
    step: the path is never taken from a request). Nothing is downloaded."""
    from server.db import Model, RegistryKind, session_factory, transaction
    from server.services.registry import register

    folder = path.expanduser().resolve()
    if not (folder / "config.json").is_file():
        fail(f"{path}: not a Hugging Face model directory (no config.json)", 2)
    with transaction(session_factory(engine())) as session:
        entry = register(
            session,
            Model,
            name=name,
            kind=RegistryKind.REGISTERED,
            location=str(folder),
            meta={"description": description} if description else {},
        )
    out.print(f"registered model {entry.name} ({entry.id}): {folder}", highlight=False)


@app.command()
@guarded
def reaper(
    every: Annotated[float, typer.Option(help="Seconds between rounds.", min=0.1)] = 30.0,
    once: Annotated[bool, typer.Option(help="One round, then exit.")] = False,
) -> None:
    """Requeue runs whose worker went silent (ERPD_HEARTBEAT_TIMEOUT_S), fail them after
    max_attempts, and publish every queued, ready run that has no message (the outbox)."""
    from server.db import read_session_factory, session_factory
    from server.queue import Broker
    from server.services.reaper import reap
    from server.services.storage import Retention

    settings = get_settings()
    store = engine()
    writes, reads = session_factory(store), read_session_factory(store)
    broker = Broker(settings.broker, settings.queue, settings.housekeeping_queue)
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    signal.signal(signal.SIGINT, lambda *_: stop.set())
    timeout = timedelta(seconds=settings.heartbeat_timeout_s)
    republish = timedelta(seconds=settings.republish_after_s)
    err.print(f"reaper: every {every:g} s, heartbeat timeout {timeout}", highlight=False)
    while True:
        try:
            for r in reap(
                writes,
                reads,
                broker,
                timeout=timeout,
                republish_after=republish,
                retention=Retention.of(settings),
            ):
                err.print(f"reaper: run {r.run_id} -> {r.status}: {r.reason}", highlight=False)
        except OperationalError as exc:  # the store is away: try again next round
            err.print(f"reaper: database unreachable ({type(exc.orig).__name__})")
        if once or stop.wait(every):
            break
    broker.close()
    store.dispose()


@app.command()
@guarded
def status() -> None:
    """Workers (Celery ping), queue depths, and the runs running now (from the store)."""
    from celery import Celery

    from server.db import read_session_factory, utcnow
    from server.queue import Broker
    from server.services.queries import running_runs

    settings = get_settings()
    store = engine()
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
    with read_session_factory(store)() as session:
        running = running_runs(session)
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
    store.dispose()
