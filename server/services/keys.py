"""API keys: created once (the secret is shown only then), stored as sha256, revocable."""

from __future__ import annotations

import hashlib
import secrets
import uuid
from datetime import datetime

from sqlalchemy import select
from sqlalchemy.orm import Session

from server.db import ApiKey, utcnow
from server.services.errors import InvalidInputError, NotFoundError

SECRET_PREFIX = "erpd_"
SHOWN_PREFIX = 12  # characters of the secret kept in clear, to tell keys apart in listings


def _hash(secret: str) -> str:
    return hashlib.sha256(secret.encode()).hexdigest()


def create_api_key(
    session: Session, *, name: str, now: datetime | None = None
) -> tuple[ApiKey, str]:
    """The new key and its secret; the secret is not stored and cannot be shown again."""
    name = name.strip()
    if not 1 <= len(name) <= 100:
        raise InvalidInputError("name", "1-100 characters")
    secret = SECRET_PREFIX + secrets.token_urlsafe(32)
    key = ApiKey(
        id=uuid.uuid4(),
        name=name,
        key_hash=_hash(secret),
        prefix=secret[:SHOWN_PREFIX],
        created_at=now or utcnow(),
    )
    session.add(key)
    session.flush()
    return key, secret


def authenticate(session: Session, *, secret: str) -> ApiKey | None:
    """The live key with this secret, or None. The lookup is by hash: the comparison an
    attacker could time is between hashes, not secrets."""
    if not secret.startswith(SECRET_PREFIX):
        return None
    key = session.scalars(select(ApiKey).where(ApiKey.key_hash == _hash(secret))).one_or_none()
    return key if key is not None and key.revoked_at is None else None


def revoke_api_key(session: Session, *, key_id: uuid.UUID, now: datetime | None = None) -> ApiKey:
    key = session.get(ApiKey, key_id)
    if key is None:
        raise NotFoundError("api key", key_id)
    if key.revoked_at is None:
        key.revoked_at = now or utcnow()
    session.flush()
    return key


def find_api_keys(session: Session, *, id_or_prefix: str) -> list[ApiKey]:
    """The keys an operator means by a key's id or its shown prefix (`erpd_...`): the caller
    decides what none, or more than one, means."""
    try:
        match = ApiKey.id == uuid.UUID(id_or_prefix)
    except ValueError:
        match = ApiKey.prefix == id_or_prefix
    return list(session.scalars(select(ApiKey).where(match)))
