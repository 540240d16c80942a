"""Typed errors of the service layer. The API maps each to one HTTP status (the comment says
which); the worker and the CLI print them as one line."""

from __future__ import annotations

import uuid


class ServiceError(Exception):
    """Base class: a request the store refused, with a message a user can act on."""


class NotFoundError(ServiceError):  # 404
    def __init__(self, what: str, ident: object) -> None:
        super().__init__(f"{what} {ident} not found")
        self.what = what
        self.ident = ident


class IllegalTransitionError(ServiceError):  # 409
    """The run is not in a state that allows the action (e.g. cancelling a finished run)."""

    def __init__(self, run_id: uuid.UUID, status: str, action: str) -> None:
        super().__init__(f"run {run_id} is {status}: cannot {action}")
        self.run_id = run_id
        self.status = status
        self.action = action


class StaleAttemptError(IllegalTransitionError):  # 409
    """A worker reported on an attempt the store no longer runs (the reaper requeued or failed
    the run): that worker must stop, another attempt owns the run now."""

    def __init__(self, run_id: uuid.UUID, status: str, attempt: int, current: int) -> None:
        super().__init__(run_id, status, f"report on attempt {attempt} (current: {current})")
        self.attempt = attempt
        self.current = current


class ConflictError(ServiceError):  # 409
    """The request collides with what exists (a name that is taken); `field` names it."""

    def __init__(self, field: str, message: str) -> None:
        super().__init__(f"{field}: {message}")
        self.field = field


class InvalidInputError(ServiceError):  # 422
    """A value the caller can fix; `field` is its dotted path."""

    def __init__(self, field: str, message: str) -> None:
        super().__init__(f"{field}: {message}")
        self.field = field


class QuotaExceededError(ServiceError):  # 429
    """A key asked for more queued or running runs than its limit (ERPD_MAX_ACTIVE_RUNS)."""
