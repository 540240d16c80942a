"""Registering committed checkpoints (the worker calls this after the manifest is written), and
reading them as a key that may only see its own runs' checkpoints."""

from __future__ import annotations

import re
import uuid
from datetime import datetime
from typing import Any

from sqlalchemy import select
from sqlalchemy.orm import Session

from server.db import Checkpoint, CheckpointRole, utcnow
from server.services.errors import InvalidInputError, NotFoundError
from server.services.runs import get_run
from server.services.transitions import running_attempt

SHA256 = re.compile(r"^[0-9a-f]{64}$")
# keys are built by the server from ids ("runs/<uuid>/teacher-<step>"): no "..", no leading "/"
KEY = re.compile(r"^[A-Za-z0-9_-]+(/[A-Za-z0-9_.-]+)*$")


def register_checkpoint(
    session: Session,
    *,
    run_id: uuid.UUID,
    attempt: int,
    role: CheckpointRole,
    step: int,
    key: str,
    size: int,
    sha256: str,
    manifest: dict[str, Any],
    now: datetime | None = None,
) -> Checkpoint:
    """Record a checkpoint of the running attempt. Registering the same checkpoint twice is a
    no-op; a resume checkpoint at the same step may be replaced (a retried attempt rewrote it),
    any other role may not."""
    running_attempt(session, run_id=run_id, attempt=attempt, action="register a checkpoint")
    if not SHA256.match(sha256):
        raise InvalidInputError("sha256", "64 lowercase hex characters")
    if not KEY.match(key) or ".." in key.split("/"):
        raise InvalidInputError("key", "a relative key of ids, no '..'")
    if size < 0 or step < 0:
        raise InvalidInputError("size" if size < 0 else "step", "must be >= 0")
    role = CheckpointRole(role)
    existing = session.scalars(
        select(Checkpoint).where(
            Checkpoint.run_id == run_id, Checkpoint.role == role, Checkpoint.step == step
        )
    ).one_or_none()
    if existing is not None:
        if existing.sha256 == sha256:
            return existing
        if role is not CheckpointRole.RESUME:
            raise InvalidInputError(
                "sha256", f"{role} checkpoint at step {step} already registered with another hash"
            )
        session.delete(existing)
        session.flush()
    ckpt = Checkpoint(
        id=uuid.uuid4(),
        run_id=run_id,
        role=role,
        step=step,
        key=key,
        bytes=size,
        sha256=sha256,
        manifest=manifest,
        created_at=now or utcnow(),
    )
    session.add(ckpt)
    session.flush()
    return ckpt


def list_checkpoints(
    session: Session, *, run_id: uuid.UUID, owner_id: uuid.UUID | None = None
) -> list[Checkpoint]:
    """The run's checkpoints in step order (with `owner_id`, another key's run is not found)."""
    get_run(session, run_id=run_id, owner_id=owner_id)
    return list(
        session.scalars(
            select(Checkpoint).where(Checkpoint.run_id == run_id).order_by(Checkpoint.step)
        )
    )


def get_checkpoint(
    session: Session, *, checkpoint_id: uuid.UUID, owner_id: uuid.UUID | None = None
) -> Checkpoint:
    """The checkpoint, or NotFoundError; with `owner_id`, another key's checkpoint reads exactly
    like a missing one (the error names the checkpoint, never its run)."""
    ckpt = session.get(Checkpoint, checkpoint_id)
    if ckpt is None:
        raise NotFoundError("checkpoint", checkpoint_id)
    try:
        get_run(session, run_id=ckpt.run_id, owner_id=owner_id)
    except NotFoundError as exc:
        raise NotFoundError("checkpoint", checkpoint_id) from exc
    return ckpt
