"""Housekeeping tasks (the `cpu` queue, a threads pool, no GPU): webhook delivery.

This module imports neither torch nor the training core, so a housekeeping worker starts fast.
A delivery is one signed POST (server/services/webhooks.py); when the receiver is away or
answers 408, 429 or 5xx, the task asks Celery to run it again after an exponential backoff with
jitter (`self.retry(countdown=...)`: the message waits on the broker, no thread sleeps), up to
ERPD_WEBHOOK_ATTEMPTS deliveries in all.
"""

from __future__ import annotations

import json
import logging
import uuid
from functools import cache

from celery import Task
from sqlalchemy.orm import Session, sessionmaker

from server.db import make_engine, read_session_factory, utcnow
from server.services import NotFoundError, get_run
from server.services.webhooks import (
    NOTIFY_TASK,
    Outcome,
    backoff_s,
    message_id,
    payload,
    post,
    signed_headers,
    signing_secret,
)
from worker.celery_app import app, settings

log = logging.getLogger("erpd.webhooks")


@cache
def _reads() -> sessionmaker[Session]:
    return read_session_factory(make_engine(settings.db_url))


@app.task(name=NOTIFY_TASK, bind=True, max_retries=None)
def notify(self: Task, run_id: str) -> bool:
    """Deliver the run's webhook; True once the receiver took it, False when it refused it or
    every attempt failed."""
    try:
        with _reads()() as session:
            run = get_run(session, run_id=uuid.UUID(run_id))
            url, body, msg_id = run.notify_url, payload(run), message_id(run)
    except NotFoundError:  # deleted since it ended: nothing to tell
        return False
    if not url:
        return False
    raw = json.dumps(body, separators=(",", ":")).encode()
    headers = signed_headers(signing_secret(settings), msg_id, raw, utcnow())
    attempt = post(url, raw, headers, timeout_s=settings.webhook_timeout_s)
    done = self.request.retries + 1
    if attempt.outcome is Outcome.DELIVERED:
        return True
    if attempt.outcome is Outcome.REFUSED or done >= settings.webhook_attempts:
        log.warning(
            "webhook of run %s to %s given up after %d attempts (%s)",
            run_id,
            url,
            done,
            attempt.detail,
        )
        return False
    wait = backoff_s(
        self.request.retries,
        base_s=settings.webhook_backoff_s,
        cap_s=settings.webhook_backoff_max_s,
        asked_s=attempt.retry_after_s,
    )
    log.info("webhook of run %s: %s; attempt %d in %.1f s", run_id, attempt.detail, done + 1, wait)
    raise self.retry(countdown=wait)
