"""The service layer: every read and write of the run store, as functions with keyword-only
arguments that take a Session and never commit (the caller owns the transaction)."""

from server.services.checkpoints import get_checkpoint, list_checkpoints, register_checkpoint
from server.services.errors import (
    ConflictError,
    IllegalTransitionError,
    InvalidInputError,
    NotFoundError,
    QuotaExceededError,
    ServiceError,
    StaleAttemptError,
)
from server.services.keys import authenticate, create_api_key, revoke_api_key
from server.services.metrics import Point, metric_series, record_metrics
from server.services.reaper import Reaped, release_run, requeue_stale, yield_run
from server.services.registry import ensure_builtins, register
from server.services.runs import Page, create_run, get_run, list_runs, run_events
from server.services.transitions import (
    cancel_run,
    claim_run,
    complete_run,
    fail_run,
    heartbeat,
    request_cancel,
    retry_run,
)

__all__ = [
    "ConflictError",
    "IllegalTransitionError",
    "InvalidInputError",
    "NotFoundError",
    "Page",
    "Point",
    "QuotaExceededError",
    "Reaped",
    "ServiceError",
    "StaleAttemptError",
    "authenticate",
    "cancel_run",
    "claim_run",
    "complete_run",
    "create_api_key",
    "create_run",
    "ensure_builtins",
    "fail_run",
    "get_checkpoint",
    "get_run",
    "heartbeat",
    "list_checkpoints",
    "list_runs",
    "metric_series",
    "record_metrics",
    "register",
    "register_checkpoint",
    "release_run",
    "request_cancel",
    "requeue_stale",
    "retry_run",
    "revoke_api_key",
    "run_events",
    "yield_run",
]
