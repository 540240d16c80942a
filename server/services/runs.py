"""Creating, reading and listing runs (the transitions are in transitions.py)."""

from __future__ import annotations

import base64
import binascii
import json
import re
import uuid
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

from sqlalchemy import exists, literal, select, tuple_
from sqlalchemy.orm import Session

from server.db import (
    Checkpoint,
    CheckpointRole,
    Dataset,
    EventKind,
    Model,
    Run,
    RunEvent,
    RunKind,
    RunStatus,
    RunTag,
    RunTeacher,
    utcnow,
)
from server.services.configs import validate_run_config
from server.services.errors import InvalidInputError, NotFoundError

TAG = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.:=-]{0,63}$")
MAX_TAGS = 32
MAX_PAGE = 500


def add_event(
    session: Session,
    run: Run,
    *,
    event: EventKind,
    from_status: RunStatus | None,
    actor: str,
    reason: str | None = None,
    now: datetime,
) -> None:
    session.add(
        RunEvent(
            run_id=run.id,
            at=now,
            event=event,
            from_status=from_status,
            to_status=run.status,
            attempt=run.attempt,
            actor=actor,
            reason=reason,
        )
    )


def get_run(
    session: Session,
    *,
    run_id: uuid.UUID,
    lock: bool = False,
    owner_id: uuid.UUID | None = None,
) -> Run:
    """The run, or NotFoundError. `lock` takes the row lock on Postgres (SQLite transactions already
    hold the database's write lock, see server/db/session.py). The row is always re-read into
    the session: a Run the session already holds may predate another process's transition, and
    every state check must see the committed row."""
    stmt = select(Run).where(Run.id == run_id).execution_options(populate_existing=True)
    if lock:
        stmt = stmt.with_for_update()
    run = session.scalars(stmt).one_or_none()
    # another key's run is "not found", never "forbidden": ids of others' runs leak nothing
    if run is None or (owner_id is not None and run.owner_id != owner_id):
        raise NotFoundError("run", run_id)
    return run


def _check_tags(tags: Iterable[str]) -> list[str]:
    unique = sorted(set(tags))
    if len(unique) > MAX_TAGS:
        raise InvalidInputError("tags", f"at most {MAX_TAGS} tags")
    for tag in unique:
        if not TAG.match(tag):
            raise InvalidInputError("tags", f"{tag!r}: 1-64 letters, digits or _.:=- (no spaces)")
    return unique


def _teachers(
    session: Session,
    *,
    kind: RunKind,
    teacher_ids: Sequence[uuid.UUID],
    model_id: uuid.UUID,
    dataset_id: uuid.UUID,
    config: dict[str, Any],
) -> list[Run]:
    if kind is not RunKind.STAGE2:
        if teacher_ids:
            raise InvalidInputError("teacher_ids", f"only a stage2 run has teachers, not {kind}")
        return []
    if not teacher_ids:
        stage = config["stage"]
        # the no-teacher control (erpd.stage2.check_inputs): the outcome advantage on a region
        # that no teacher chooses
        alone = stage["signal"] == "advantage" and stage["region"] in ("random", "all")
        if alone and not stage["permute_delta"]:
            return []
        raise InvalidInputError("teacher_ids", "a stage2 run needs at least one teacher run")
    if len(set(teacher_ids)) != len(teacher_ids):
        raise InvalidInputError("teacher_ids", "a teacher is listed twice")
    weights = config["stage"].get("teacher_weights")
    if weights is not None and len(weights) != len(teacher_ids):
        raise InvalidInputError(
            "config.stage.teacher_weights",
            f"{len(weights)} weights for {len(teacher_ids)} teachers",
        )
    # FOR SHARE: a teacher failing concurrently is seen failed once its transaction commits,
    # instead of this student slipping in after _fail_waiting_students looked for students
    found = {
        r.id: r
        for r in session.scalars(
            select(Run)
            .where(Run.id.in_(teacher_ids))
            .order_by(Run.id)
            .with_for_update(read=True)
            .execution_options(populate_existing=True)
        )
    }
    teachers = []
    for i, tid in enumerate(teacher_ids):
        teacher = found.get(tid)
        if teacher is None:
            raise InvalidInputError(f"teacher_ids.{i}", f"run {tid} not found")
        if teacher.kind is not RunKind.STAGE1:
            raise InvalidInputError(
                f"teacher_ids.{i}", f"run {tid} is a {teacher.kind} run, not stage1"
            )
        if teacher.status in (RunStatus.FAILED, RunStatus.CANCELLED):
            raise InvalidInputError(f"teacher_ids.{i}", f"run {tid} is {teacher.status}")
        # the teachers were trained from the same base on the same fixed batch (docs/method.md)
        if teacher.model_id != model_id or teacher.dataset_id != dataset_id:
            raise InvalidInputError(f"teacher_ids.{i}", f"run {tid} has another model or dataset")
        teachers.append(teacher)
    return teachers


def _check_batch(
    session: Session,
    batch_run_id: uuid.UUID,
    *,
    kind: RunKind,
    model_id: uuid.UUID,
    dataset_id: uuid.UUID,
) -> Run:
    if kind is RunKind.SAMPLE:
        raise InvalidInputError("batch_run_id", "a sample run draws its own batch")
    batch = session.scalars(
        select(Run)
        .where(Run.id == batch_run_id)
        .with_for_update(read=True)
        .execution_options(populate_existing=True)
    ).one_or_none()
    if batch is None:
        raise InvalidInputError("batch_run_id", f"run {batch_run_id} not found")
    if batch.kind is not RunKind.SAMPLE:
        raise InvalidInputError("batch_run_id", f"run {batch_run_id} is a {batch.kind} run")
    if batch.status in (RunStatus.FAILED, RunStatus.CANCELLED):
        raise InvalidInputError("batch_run_id", f"run {batch_run_id} is {batch.status}")
    if batch.model_id != model_id or batch.dataset_id != dataset_id:
        raise InvalidInputError("batch_run_id", f"run {batch_run_id} has another model or dataset")
    return batch


def _same_policy(base_run_id: uuid.UUID | None, batch: Run | None, teachers: Sequence[Run]) -> None:
    """A stage's batch and teachers come from the policy it starts from (docs/method.md: the
    fixed batch is sampled from pi_k, the teachers are trained from pi_k on it)."""
    if batch is not None and batch.base_run_id != base_run_id:
        raise InvalidInputError(
            "batch_run_id", f"run {batch.id} was sampled from another base than this run's"
        )
    for i, teacher in enumerate(teachers):
        if teacher.base_run_id != base_run_id:
            raise InvalidInputError(
                f"teacher_ids.{i}",
                f"run {teacher.id} was trained from another base than this run's",
            )


def latest_checkpoint(
    session: Session, *, run_id: uuid.UUID, role: CheckpointRole
) -> Checkpoint | None:
    return session.scalars(
        select(Checkpoint)
        .where(Checkpoint.run_id == run_id, Checkpoint.role == role)
        .order_by(Checkpoint.step.desc())
        .limit(1)
    ).one_or_none()


def _check_base(
    session: Session,
    base_run_id: uuid.UUID,
    *,
    model_id: uuid.UUID,
    dataset_id: uuid.UUID,
) -> str | None:
    """A later round's pi_k is an earlier stage-2 run's student; returns its sha256 when that
    run has already succeeded (else the run waits and complete_run pins it)."""
    base = session.scalars(
        select(Run)
        .where(Run.id == base_run_id)
        .with_for_update(read=True)  # as for teachers: a concurrent failure is seen, not missed
        .execution_options(populate_existing=True)
    ).one_or_none()
    if base is None:
        raise InvalidInputError("base_run_id", f"run {base_run_id} not found")
    if base.kind is not RunKind.STAGE2:
        raise InvalidInputError(
            "base_run_id", f"run {base_run_id} is a {base.kind} run, not stage2 (a student)"
        )
    if base.status in (RunStatus.FAILED, RunStatus.CANCELLED):
        raise InvalidInputError("base_run_id", f"run {base_run_id} is {base.status}")
    if base.model_id != model_id or base.dataset_id != dataset_id:
        raise InvalidInputError("base_run_id", f"run {base_run_id} has another model or dataset")
    if base.status is not RunStatus.SUCCEEDED:
        return None
    ckpt = latest_checkpoint(session, run_id=base.id, role=CheckpointRole.STUDENT)
    if ckpt is None:  # it could never be pinned: the run would wait forever
        raise InvalidInputError("base_run_id", f"run {base_run_id} has no student checkpoint")
    return ckpt.sha256


def _link(session: Session, teacher: Run, *, position: int) -> RunTeacher:
    """A teacher link, pinned at once when the teacher has already succeeded."""
    link = RunTeacher(teacher_id=teacher.id, position=position)
    if teacher.status is RunStatus.SUCCEEDED:
        ckpt = latest_checkpoint(session, run_id=teacher.id, role=CheckpointRole.TEACHER)
        if ckpt is not None:
            link.checkpoint_id, link.sha256 = ckpt.id, ckpt.sha256
    return link


def _check_ids_and_limits(
    session: Session,
    *,
    model_id: uuid.UUID,
    dataset_id: uuid.UUID,
    max_attempts: int,
    round: int,
    gpu: int | None,
) -> None:
    if session.get(Model, model_id) is None:
        raise InvalidInputError("model_id", f"model {model_id} not found")
    if session.get(Dataset, dataset_id) is None:
        raise InvalidInputError("dataset_id", f"dataset {dataset_id} not found")
    if max_attempts < 1:
        raise InvalidInputError("max_attempts", "must be at least 1")
    if round < 0:
        raise InvalidInputError("round", "must be >= 0")
    if gpu is not None and gpu < 0:
        raise InvalidInputError("gpu", "must be >= 0")


def _check_inputs(
    session: Session,
    *,
    kind: RunKind,
    model_id: uuid.UUID,
    dataset_id: uuid.UUID,
    config: dict[str, Any],
    teacher_ids: Sequence[uuid.UUID],
    batch_run_id: uuid.UUID | None,
    base_run_id: uuid.UUID | None,
) -> tuple[list[Run], str | None]:
    """The runs a new run reads (teachers, batch, base), each checked in that order and locked
    FOR SHARE; returns the teachers and the base's pinned sha256 (None while it runs)."""
    teachers = _teachers(
        session,
        kind=kind,
        teacher_ids=teacher_ids,
        model_id=model_id,
        dataset_id=dataset_id,
        config=config,
    )
    batch = None
    if batch_run_id is not None:
        batch = _check_batch(
            session, batch_run_id, kind=kind, model_id=model_id, dataset_id=dataset_id
        )
    _same_policy(base_run_id, batch, teachers)
    if base_run_id is None:
        return teachers, None
    return teachers, _check_base(session, base_run_id, model_id=model_id, dataset_id=dataset_id)


def create_run(
    session: Session,
    *,
    kind: RunKind,
    model_id: uuid.UUID,
    dataset_id: uuid.UUID,
    config: dict[str, Any],
    name: str | None = None,
    owner_id: uuid.UUID | None = None,
    pipeline_id: uuid.UUID | None = None,
    round: int = 0,
    teacher_ids: Sequence[uuid.UUID] = (),
    batch_run_id: uuid.UUID | None = None,
    base_run_id: uuid.UUID | None = None,
    gpu: int | None = None,
    notify_url: str | None = None,
    tags: Iterable[str] = (),
    max_attempts: int = 3,
    seed: int | None = None,
    code_version: str | None = None,
    actor: str = "system",
    now: datetime | None = None,
) -> Run:
    """A queued run with its validated config. A run waits until its inputs exist (claim_run
    refuses it before): every teacher of a stage2 run, its batch run, its base run; it fails if
    one of them fails."""
    now = now or utcnow()
    kind = RunKind(kind)
    normalised = validate_run_config(kind, config)
    _check_ids_and_limits(
        session,
        model_id=model_id,
        dataset_id=dataset_id,
        max_attempts=max_attempts,
        round=round,
        gpu=gpu,
    )
    teachers, base_sha256 = _check_inputs(
        session,
        kind=kind,
        model_id=model_id,
        dataset_id=dataset_id,
        config=normalised,
        teacher_ids=teacher_ids,
        batch_run_id=batch_run_id,
        base_run_id=base_run_id,
    )
    run = Run(
        gpu=gpu,
        base_run_id=base_run_id,
        base_sha256=base_sha256,
        id=uuid.uuid4(),
        batch_run_id=batch_run_id,
        notify_url=notify_url,
        name=name or f"{kind}-{now:%Y%m%d-%H%M%S}",
        owner_id=owner_id,
        kind=kind,
        pipeline_id=pipeline_id,
        round=round,
        status=RunStatus.QUEUED,
        attempt=0,
        max_attempts=max_attempts,
        config=normalised,
        model_id=model_id,
        dataset_id=dataset_id,
        seed=seed,
        code_version=code_version,
        cancel_requested=False,
        created_at=now,
        summary={},
        tag_rows=[RunTag(tag=t) for t in _check_tags(tags)],
        teachers=[_link(session, t, position=i) for i, t in enumerate(teachers)],
    )
    session.add(run)
    session.flush()
    add_event(session, run, event=EventKind.CREATED, from_status=None, actor=actor, now=now)
    return run


# --- listing with keyset pagination ---------------------------------------------------------------
@dataclass(frozen=True)
class Page:
    items: list[Run]
    next_cursor: str | None


def _utc(field: str, value: datetime | None) -> datetime | None:
    if value is None:
        return None
    if value.tzinfo is None:
        raise InvalidInputError(field, "needs a time zone (e.g. 2026-11-25T12:00:00Z)")
    try:
        return value.astimezone(UTC)
    except OverflowError as exc:  # e.g. 0001-01-01T00:00+14:00 is before year 1 in UTC
        raise InvalidInputError(field, "out of range") from exc


def _encode_cursor(run: Run) -> str:
    raw = json.dumps([run.created_at.isoformat(), run.id.hex]).encode()
    return base64.urlsafe_b64encode(raw).decode().rstrip("=")


def _decode_cursor(cursor: str) -> tuple[datetime, uuid.UUID]:
    try:
        raw = base64.urlsafe_b64decode(cursor + "=" * (-len(cursor) % 4))
        created, ident = json.loads(raw)
        if not isinstance(created, str) or not isinstance(ident, str):
            raise TypeError("cursor fields are strings")
        at = _utc("cursor", datetime.fromisoformat(created))
        assert at is not None
        return at, uuid.UUID(hex=ident)
    except InvalidInputError:
        raise
    except (binascii.Error, ValueError, TypeError, UnicodeDecodeError) as exc:
        raise InvalidInputError("cursor", "malformed cursor: pass back the `next` value") from exc


def list_runs(
    session: Session,
    *,
    status: Iterable[RunStatus] | None = None,
    kind: Iterable[RunKind] | None = None,
    tag: str | None = None,
    owner_id: uuid.UUID | None = None,
    pipeline_id: uuid.UUID | None = None,
    created_after: datetime | None = None,
    created_before: datetime | None = None,
    limit: int = 50,
    cursor: str | None = None,
) -> Page:
    """Newest first. The cursor is the last row's (created_at, id): a page is an index range
    scan however deep it is, and rows inserted meanwhile never shift or repeat a page."""
    if not 1 <= limit <= MAX_PAGE:
        raise InvalidInputError("limit", f"must be between 1 and {MAX_PAGE}")
    created_after = _utc("created_after", created_after)
    created_before = _utc("created_before", created_before)
    stmt = select(Run)
    if status is not None:
        stmt = stmt.where(Run.status.in_([RunStatus(s) for s in status]))
    if kind is not None:
        stmt = stmt.where(Run.kind.in_([RunKind(k) for k in kind]))
    if tag is not None:
        stmt = stmt.where(exists().where(RunTag.run_id == Run.id, RunTag.tag == tag))
    if owner_id is not None:
        stmt = stmt.where(Run.owner_id == owner_id)
    if pipeline_id is not None:
        stmt = stmt.where(Run.pipeline_id == pipeline_id)
    if created_after is not None:
        stmt = stmt.where(Run.created_at >= created_after)
    if created_before is not None:
        stmt = stmt.where(Run.created_at < created_before)
    if cursor is not None:
        at, ident = _decode_cursor(cursor)
        bound = tuple_(literal(at, Run.created_at.type), literal(ident, Run.id.type))
        stmt = stmt.where(tuple_(Run.created_at, Run.id) < bound)
    stmt = stmt.order_by(Run.created_at.desc(), Run.id.desc()).limit(limit + 1)
    rows = list(session.scalars(stmt))
    more = len(rows) > limit
    items = rows[:limit]
    return Page(items=items, next_cursor=_encode_cursor(items[-1]) if more else None)


def run_events(
    session: Session, *, run_id: uuid.UUID, owner_id: uuid.UUID | None = None
) -> list[RunEvent]:
    """The run's audit trail, oldest first (with `owner_id`, another key's run is not found)."""
    if owner_id is not None:
        get_run(session, run_id=run_id, owner_id=owner_id)
    return list(
        session.scalars(select(RunEvent).where(RunEvent.run_id == run_id).order_by(RunEvent.id))
    )


def set_name_and_tags(
    session: Session, *, run: Run, name: str | None = None, tags: Iterable[str] | None = None
) -> Run:
    """The only fields of a run a user may change after submitting it."""
    if name is not None:
        if not 1 <= len(name) <= 200:
            raise InvalidInputError("name", "1-200 characters")
        run.name = name
    if tags is not None:
        wanted = _check_tags(tags)
        run.tag_rows = [row for row in run.tag_rows if row.tag in wanted]
        have = {row.tag for row in run.tag_rows}
        run.tag_rows += [RunTag(tag=t) for t in wanted if t not in have]
    session.flush()
    return run
