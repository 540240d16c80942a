"""Run-finished webhooks: a JSON POST to the run's notify_url (whose host the operator allowed).

Delivery never runs in the API's request path: the API (or the worker) publishes a `notify`
message for the `cpu` queue and a housekeeping worker calls `deliver`, which retries with
exponential backoff and gives up after a few attempts (a webhook is a courtesy, not a contract:
the run's state is in the API either way).
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

import httpx

from server.db import Run

# housekeeping task: the worker registers it under this name (worker/tasks.py)
NOTIFY_TASK = "erpd.notify"


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


def deliver(
    url: str,
    body: dict[str, Any],
    *,
    attempts: int = 5,
    backoff_s: float = 1.0,
    timeout_s: float = 10.0,
    sleep: Callable[[float], None] = time.sleep,
) -> bool:
    """POST `body`; a 2xx is success. Retries connection errors, timeouts, 429 and 5xx after
    backoff_s, 2 backoff_s, 4 backoff_s...; other 4xx are final (the receiver refused it)."""
    with httpx.Client(timeout=timeout_s, follow_redirects=False) as client:
        for attempt in range(attempts):
            try:
                response = client.post(url, json=body, headers={"User-Agent": "erpd-hub"})
            except httpx.HTTPError:
                response = None
            if response is not None:
                if response.is_success:
                    return True
                if response.status_code != 429 and response.status_code < 500:
                    return False
            if attempt + 1 < attempts:
                sleep(backoff_s * 2**attempt)
    return False
