"""Thin Celery tasks: each takes a run id, re-reads everything from the store, and calls erpd."""

from __future__ import annotations

import contextlib
import logging
import socket
import threading
import uuid
from collections.abc import Callable
from functools import cache
from typing import Any

from celery.signals import worker_shutting_down
from sqlalchemy.orm import Session

from erpd.errors import StopRequestedError
from server.db import Dataset, Model, Run, make_engine, read_session_factory, session_factory
from server.queue import RUN_STAGE_TASK, Broker
from server.redact import scrub
from server.services import (
    StaleAttemptError,
    cancel_run,
    claim_run,
    fail_run,
    get_run,
    release_run,
    yield_run,
)
from server.services.outbox import publish_pending
from server.services.registry import find_by_id
from worker.celery_app import app, settings
from worker.group import RanksLostError
from worker.runner import Inputs, Store, execute, finish, run_dir
from worker.sinks import DbSink, retrying

log = logging.getLogger("erpd.worker")

SHUTDOWN = threading.Event()
"""Set when the worker is told to stop (SIGTERM/SIGINT: Celery's warm shutdown). The running
stage then finishes its optimizer step, saves a resume point and stops; the run goes back to
`queued` at once for the next worker, and the task returns so the worker can exit."""


@worker_shutting_down.connect
def _on_shutdown(**_: Any) -> None:
    SHUTDOWN.set()


@cache
def store() -> Store:
    engine = make_engine(settings.db_url)
    broker = Broker(settings.broker, settings.queue, settings.housekeeping_queue)
    return Store(settings, session_factory(engine), read_session_factory(engine), broker)


def _device() -> str:
    import torch

    return f"cuda:{torch.cuda.current_device()}" if torch.cuda.is_available() else "cpu"


def _inputs(session: Session, run: Run) -> Inputs:
    model = find_by_id(session, Model, entry_id=run.model_id)
    dataset = find_by_id(session, Dataset, entry_id=run.dataset_id)
    assert model is not None and dataset is not None
    teachers = []
    for link in run.teachers:
        teacher = get_run(session, run_id=link.teacher_id)
        teachers.append((run_dir(settings, teacher.id) / "checkpoint", link.sha256))
    batch = None if run.batch_run_id is None else run_dir(settings, run.batch_run_id) / "batch"
    base = None
    if run.base_run_id is not None:
        base = (run_dir(settings, run.base_run_id) / "checkpoint", run.base_sha256)
    return Inputs(run, model, dataset, batch, teachers, base)


@app.task(name=RUN_STAGE_TASK)
def run_stage(run_id: str) -> None:
    """Claim the run (a second delivery of the message does nothing), run it, record the end."""
    s = store()
    with s.writes.begin() as session:
        run = claim_run(
            session, run_id=uuid.UUID(run_id), worker=socket.gethostname(), device=_device()
        )
        if run is None:
            log.info("run %s: not claimable (done, running elsewhere or waiting)", run_id)
            return
        inputs = _inputs(session, run)
    sink = DbSink(
        s.writes, run.id, run.attempt, heartbeat_s=settings.heartbeat_s, shutdown=SHUTDOWN
    )
    sink.start()
    try:
        outcome = execute(s, inputs, sink)
        sink.close()
        sink.stop()  # no heartbeat may land after the run has ended
        if not outcome.stopped:
            finish(s, inputs, outcome)
        elif not sink.lost.is_set():
            _record_stop(run, outcome.steps, cancelled=sink.cancel.is_set())
    except StaleAttemptError:
        log.warning("run %s: attempt %d was given up by the reaper; stopping", run.id, run.attempt)
    except StopRequestedError as exc:  # stopped before its stage began (base pretraining)
        log.info("run %s: %s", run.id, exc)
        sink.stop()
        if not sink.lost.is_set():
            _record_stop(run, None, cancelled=sink.cancel.is_set())
    except RanksLostError as exc:  # not the run's fault: requeued (resumes from its shards)
        log.warning("run %s: %s; releasing it", run.id, exc)
        sink.stop()
        why = str(exc)
        _record(
            lambda session: release_run(
                session,
                run_id=run.id,
                attempt=run.attempt,
                why=why,
                actor=f"worker:{run.worker}",
            )
        )
    except Exception as exc:  # the run failed: record why, in one line
        log.exception("run %s failed", run.id)
        sink.stop()
        # one line, and no server paths: the reason is shown to API users
        text = f"{type(exc).__name__}: {exc}".splitlines()[0]
        reason = scrub(text, {"ERPD_HOME": settings.home.resolve()})[:500]
        _record(
            lambda session: fail_run(
                session,
                run_id=run.id,
                attempt=run.attempt,
                reason=reason,
                actor=f"worker:{run.worker}",
            )
        )
    finally:
        sink.stop()
        _release_device_memory()
    # whatever this run's end unblocked or ended (its dependents, webhooks) goes out now; the
    # reaper's reconcile catches anything a broker or database hiccup leaves here
    try:
        publish_pending(s.writes, s.reads, s.broker)
    except Exception:
        log.warning("run %s: publishing what it unblocked failed; the reaper will", run.id)


def _record_stop(run: Run, step: int | None, *, cancelled: bool) -> None:
    """A stage that stopped cooperatively saved a resume point: a cancel ends the run, a
    worker shutdown hands it back to the queue (a cancel requested meanwhile still wins)."""
    actor = f"worker:{run.worker}"
    if cancelled or not SHUTDOWN.is_set():
        _record(
            lambda session: cancel_run(session, run_id=run.id, attempt=run.attempt, actor=actor)
        )
        return
    log.info("run %s: worker shutting down; saved at step %s and requeued", run.id, step)
    _record(
        lambda session: yield_run(
            session, run_id=run.id, attempt=run.attempt, step=step, actor=actor
        )
    )


def _release_device_memory() -> None:
    """The stage's tensors are garbage now; hand the cached CUDA blocks back to the driver so
    the GPU shows free between runs (a cancelled run's memory included)."""
    import gc

    import torch

    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def _record(change: Callable[[Session], object]) -> None:
    """A final transition, retried through a database outage; a fenced-off attempt is moot."""

    def write() -> None:
        with store().writes.begin() as session:
            change(session)

    with contextlib.suppress(StaleAttemptError):
        retrying(write)
