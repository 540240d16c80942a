"""Run-finished webhooks: a signed JSON POST to the run's notify_url (whose host the operator
allowed).

Delivery never runs in the API's request path: whoever ends a run leaves its webhook in the
outbox (server/services/outbox.py), which queues a `notify` message for the housekeeping workers
(worker/housekeeping.py). Each delivery is one POST; a failed one is retried by the task queue
after an exponential backoff with jitter (no thread sleeps through it), and given up after
`ERPD_WEBHOOK_ATTEMPTS` (a webhook is a courtesy, not a contract: the run's state is in the API
either way).

Payloads are signed as Standard Webhooks specifies (https://www.standardwebhooks.com/):
`webhook-id` (the same for every retry of one message, so a receiver can drop repeats),
`webhook-timestamp` (seconds, of this attempt) and `webhook-signature: v1,<base64 HMAC-SHA256 of
"{id}.{timestamp}.{body}">` under the secret `ERPD_WEBHOOK_SECRET` (`whsec_` + base64).
"""

from __future__ import annotations

import base64
import contextlib
import enum
import hashlib
import os
import random
import secrets
from dataclasses import dataclass
from datetime import UTC, datetime
from email.utils import parsedate_to_datetime
from pathlib import Path
from typing import Any

import httpx
from standardwebhooks import Webhook

from server.db import Run
from server.settings import Settings

# housekeeping task: the worker registers it under this name (worker/housekeeping.py)
NOTIFY_TASK = "erpd.notify"
SECRET_FILE = "webhook-secret"
PREFIX = "whsec_"


def payload(run: Run) -> dict[str, Any]:
    return {
        "event": f"run.{run.status.value}",
        "run": str(run.id),
        "name": run.name,
        "kind": run.kind.value,
        "status": run.status.value,
        "pipeline": str(run.pipeline_id) if run.pipeline_id else None,
        "finished_at": run.finished_at.isoformat() if run.finished_at else None,
        "final_accuracy": run.final_accuracy,
        "kl_spent": run.kl_spent,
        "error": run.error,
    }


def message_id(run: Run) -> str:
    """One id per run end: its retries share it; a retried run's next end gets another."""
    finished = run.finished_at.isoformat() if run.finished_at else ""
    digest = hashlib.sha256(f"{run.id}|{run.status.value}|{finished}".encode()).hexdigest()
    return f"msg_{digest[:32]}"


def signing_secret(settings: Settings) -> str:
    """ERPD_WEBHOOK_SECRET, or the one generated once into `<home>/webhook-secret` (created with
    O_EXCL and mode 0600, so concurrent workers agree on one)."""
    if settings.webhook_secret is not None:
        return settings.webhook_secret.get_secret_value()
    path = Path(settings.home) / SECRET_FILE
    path.parent.mkdir(parents=True, exist_ok=True)
    with contextlib.suppress(FileExistsError):
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "w") as out:
            out.write(PREFIX + base64.b64encode(secrets.token_bytes(32)).decode() + "\n")
    return path.read_text().strip()


def signed_headers(secret: str, msg_id: str, body: bytes, now: datetime) -> dict[str, str]:
    return {
        "webhook-id": msg_id,
        "webhook-timestamp": str(int(now.timestamp())),
        "webhook-signature": Webhook(secret).sign(msg_id, now, body),
        "content-type": "application/json",
        "user-agent": "erpd-hub",
    }


class Outcome(enum.Enum):
    DELIVERED = "delivered"
    REFUSED = "refused"  # a 4xx other than 408/429: the receiver will never take it
    RETRY = "retry"  # unreachable, timed out, 408, 429 or 5xx


@dataclass(frozen=True)
class Attempt:
    outcome: Outcome
    detail: str
    retry_after_s: float | None = None  # what the receiver asked for (Retry-After)


def _retry_after(response: httpx.Response) -> float | None:
    value = response.headers.get("retry-after")
    if value is None:
        return None
    if value.strip().isdigit():
        return float(value.strip())
    with contextlib.suppress(TypeError, ValueError):
        return max(0.0, (parsedate_to_datetime(value) - datetime.now(UTC)).total_seconds())
    return None


def post(url: str, body: bytes, headers: dict[str, str], *, timeout_s: float) -> Attempt:
    """One delivery attempt; never raises for the receiver's sake."""
    try:
        with httpx.Client(timeout=timeout_s, follow_redirects=False) as client:
            response = client.post(url, content=body, headers=headers)
    except httpx.HTTPError as exc:
        return Attempt(Outcome.RETRY, f"{type(exc).__name__}: {exc}")
    detail = f"HTTP {response.status_code}"
    if response.is_success:
        return Attempt(Outcome.DELIVERED, detail)
    if response.status_code in (408, 429) or response.status_code >= 500:
        return Attempt(Outcome.RETRY, detail, _retry_after(response))
    return Attempt(Outcome.REFUSED, detail)


def backoff_s(
    retries: int,
    *,
    base_s: float,
    cap_s: float,
    asked_s: float | None = None,
    rng: random.Random | None = None,
) -> float:
    """The wait before retry number `retries` + 1: exponential (base, 2 base, 4 base...) up to
    the cap, with "equal jitter" (a random half of it), so receivers that failed together are not
    hit again together; at least what the receiver asked for with Retry-After (within the cap)."""
    ceiling = min(cap_s, base_s * 2 ** min(retries, 62))
    wait = ceiling / 2 + (rng or random).uniform(0, ceiling / 2)
    if asked_s is not None:
        wait = max(wait, min(asked_s, cap_s))
    return wait
