"""Idempotency-Key on POSTs: a retried request (same key, same body) replays the first response
instead of creating a second run; the same key with another body is a conflict."""

from __future__ import annotations

import hashlib
import json
import uuid
from typing import Any

from sqlalchemy import select
from sqlalchemy.orm import Session

from server.db import IdempotencyKey, utcnow
from server.services.errors import ServiceError


class IdempotencyConflictError(ServiceError):  # 422
    field = "Idempotency-Key"

    def __init__(self, key: str) -> None:
        super().__init__(f"Idempotency-Key {key!r} was used with another request body")


def body_hash(path: str, body: Any) -> str:
    canonical = json.dumps([path, body], sort_keys=True, separators=(",", ":"), default=str)
    return hashlib.sha256(canonical.encode()).hexdigest()


def replay(
    session: Session, *, owner_id: uuid.UUID, key: str, request_sha256: str
) -> tuple[int, dict[str, Any]] | None:
    """The stored (status, response) of an earlier request with this key, if any."""
    row = session.scalars(
        select(IdempotencyKey).where(IdempotencyKey.owner_id == owner_id, IdempotencyKey.key == key)
    ).one_or_none()
    if row is None:
        return None
    if row.request_sha256 != request_sha256:
        raise IdempotencyConflictError(key)
    return row.status_code, row.response


def remember(
    session: Session,
    *,
    owner_id: uuid.UUID,
    key: str,
    request_sha256: str,
    status_code: int,
    response: dict[str, Any],
) -> None:
    """Store the response in the same transaction as what it created: both or neither."""
    session.add(
        IdempotencyKey(
            owner_id=owner_id,
            key=key,
            request_sha256=request_sha256,
            status_code=status_code,
            response=response,
            created_at=utcnow(),
        )
    )
    session.flush()
