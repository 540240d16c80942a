"""Giving storage back: deleting runs and pipelines, and the retention pass the reaper runs.

A run's rows (its events, metric points, checkpoints, tags, teacher links) go with it through
the database's ON DELETE CASCADE; its directory is moved to the artifact store's trash while the
transaction is open and removed once it commits (server/artifacts.py). A run another run reads
(as its teacher, its batch or its base) is never deleted from under it, and a running one never.

The retention pass (`reclaim`) removes, once they are older than the operator's settings: the
directories of failed and cancelled runs (their rows stay: the audit trail and metrics remain,
a retry starts over), the resume points of succeeded runs (they can never resume), directories
that belong to no run, and Idempotency-Key rows.
"""

from __future__ import annotations

import logging
import uuid
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta
from pathlib import Path

from sqlalchemy import delete, or_, select
from sqlalchemy.orm import Session, sessionmaker

from server import artifacts
from server.db import Checkpoint, CheckpointRole, IdempotencyKey, Pipeline, Run, RunStatus, utcnow
from server.db.models import RunTeacher
from server.services.errors import ConflictError, IllegalTransitionError, NotFoundError
from server.settings import Settings

log = logging.getLogger("erpd.storage")
RESUME = "resume"  # a run directory's resume points (erpd/checkpoint.py RESUME_DIR)
CHUNK = 500


def delete_runs(
    session: Session, *, run_ids: Sequence[uuid.UUID], owner_id: uuid.UUID | None
) -> list[uuid.UUID]:
    """Delete the runs (locked first; another key's run is not found) and every row that
    belongs to them, and a pipeline left without runs. Refused while one is running (409), or
    while a run outside `run_ids` reads one of them (409, naming those runs)."""
    wanted = sorted(set(run_ids))
    runs = list(
        session.scalars(
            select(Run)
            .where(Run.id.in_(wanted))
            .order_by(Run.id)
            .with_for_update()
            .execution_options(populate_existing=True)
        )
    )
    found = {r.id: r for r in runs if owner_id is None or r.owner_id == owner_id}
    for run_id in wanted:
        if run_id not in found:
            raise NotFoundError("run", run_id)
    for run in runs:
        if run.status is RunStatus.RUNNING:
            raise IllegalTransitionError(run.id, run.status, "delete (cancel it first)")
    readers = list(
        session.scalars(
            select(Run.id)
            .where(
                or_(
                    Run.batch_run_id.in_(wanted),
                    Run.base_run_id.in_(wanted),
                    Run.id.in_(
                        select(RunTeacher.student_id).where(RunTeacher.teacher_id.in_(wanted))
                    ),
                ),
                Run.id.not_in(wanted),
            )
            .order_by(Run.created_at)
        )
    )
    if readers:
        shown = ", ".join(str(r) for r in readers[:10]) + (" ..." if len(readers) > 10 else "")
        raise ConflictError(
            "run",
            f"runs {shown} read it (as teacher, batch or base): delete them first",
        )
    pipelines = {r.pipeline_id for r in runs if r.pipeline_id is not None}
    # one statement: the database cascades to every row of theirs (and between them: a batch
    # run's readers in the same set), which a row-by-row ORM delete would trip over
    session.execute(
        delete(Run).where(Run.id.in_(wanted)).execution_options(synchronize_session=False)
    )
    for run in runs:
        session.expunge(run)
    for pipeline_id in pipelines:
        left = session.scalars(select(Run.id).where(Run.pipeline_id == pipeline_id).limit(1))
        if left.first() is None:
            session.execute(delete(Pipeline).where(Pipeline.id == pipeline_id))
    return wanted


def pipeline_runs(
    session: Session, *, pipeline_id: uuid.UUID, owner_id: uuid.UUID
) -> list[uuid.UUID]:
    """The ids of the key's pipeline's runs (another key's pipeline is not found)."""
    pipeline = session.get(Pipeline, pipeline_id)
    if pipeline is None or pipeline.owner_id != owner_id:
        raise NotFoundError("pipeline", pipeline_id)
    return list(session.scalars(select(Run.id).where(Run.pipeline_id == pipeline_id)))


def delete_pipeline(
    session: Session, *, pipeline_id: uuid.UUID, owner_id: uuid.UUID
) -> list[uuid.UUID]:
    """Delete a pipeline with all its runs (as `delete_runs`); returns their ids."""
    run_ids = pipeline_runs(session, pipeline_id=pipeline_id, owner_id=owner_id)
    deleted = delete_runs(session, run_ids=run_ids, owner_id=owner_id)
    session.execute(delete(Pipeline).where(Pipeline.id == pipeline_id))
    return deleted


def delete_with_files(
    writes: sessionmaker[Session], root: Path, remove: Callable[[Session], list[uuid.UUID]]
) -> list[uuid.UUID]:
    """Run `remove` (delete_runs, delete_pipeline) in one transaction and move the deleted runs'
    directories to the trash before it commits (moved back if it does not), then empty them:
    a committed delete leaves no directory behind, a failed one loses nothing."""
    moved: list[tuple[Path | None, Path]] = []
    try:
        with writes.begin() as session:
            deleted = remove(session)
            for run_id in deleted:
                directory = artifacts.run_dir(root, run_id)
                moved.append((artifacts.discard(root, directory), directory))
    except BaseException:
        for discarded, directory in moved:
            artifacts.restore(discarded, directory)
        raise
    for discarded, _ in moved:
        artifacts.empty(discarded)
    return deleted


# --- the retention pass ---------------------------------------------------------------------
@dataclass(frozen=True)
class Retention:
    """How long what may be given back is kept (None: for ever)."""

    artifacts: Path
    failed: timedelta | None = None  # directories of failed and cancelled runs
    resume: timedelta | None = None  # resume points of succeeded runs
    idempotency: timedelta | None = None  # Idempotency-Key rows

    @classmethod
    def of(cls, settings: Settings) -> Retention:
        def keep(amount: float, unit: str) -> timedelta | None:
            return timedelta(**{unit: amount}) if amount > 0 else None

        return cls(
            settings.artifacts,
            failed=keep(settings.retention_failed_days, "days"),
            resume=keep(settings.retention_resume_days, "days"),
            idempotency=keep(settings.idempotency_ttl_hours, "hours"),
        )


@dataclass
class Reclaimed:
    run_dirs: int = 0
    resume_points: int = 0
    orphans: int = 0
    idempotency_keys: int = 0


def expire_idempotency_keys(session: Session, *, older_than: datetime) -> int:
    result = session.execute(
        delete(IdempotencyKey)
        .where(IdempotencyKey.created_at < older_than)
        .execution_options(synchronize_session=False)
    )
    return int(result.rowcount or 0)  # type: ignore[attr-defined]


def _finished(
    session: Session, ids: list[uuid.UUID]
) -> dict[uuid.UUID, tuple[RunStatus, datetime | None]]:
    rows = session.execute(select(Run.id, Run.status, Run.finished_at).where(Run.id.in_(ids)))
    return {run_id: (status, finished) for run_id, status, finished in rows}


def _drop_failed_run_dir(
    writes: sessionmaker[Session], root: Path, run_id: uuid.UUID, directory: Path, cutoff: datetime
) -> bool:
    """A failed or cancelled run's directory and checkpoint rows, if it is still that old and
    ended (a retry may have queued it again meanwhile: the row lock settles it)."""
    moved: Path | None = None
    try:
        with writes.begin() as session:
            run = session.scalars(
                select(Run)
                .where(Run.id == run_id)
                .with_for_update()
                .execution_options(populate_existing=True)
            ).one_or_none()
            if run is None or run.status not in (RunStatus.FAILED, RunStatus.CANCELLED):
                return False
            if run.finished_at is None or run.finished_at >= cutoff:
                return False
            session.execute(delete(Checkpoint).where(Checkpoint.run_id == run_id))
            moved = artifacts.discard(root, directory)
    except BaseException:
        artifacts.restore(moved, directory)
        raise
    artifacts.empty(moved)
    return moved is not None


def _drop_resume_points(
    writes: sessionmaker[Session], root: Path, run_id: uuid.UUID, directory: Path
) -> bool:
    """A succeeded run's resume points (it never resumes again: succeeded is final)."""
    if not (directory / RESUME).is_dir():
        return False
    with writes.begin() as session:
        session.execute(
            delete(Checkpoint).where(
                Checkpoint.run_id == run_id, Checkpoint.role == CheckpointRole.RESUME
            )
        )
    artifacts.empty(artifacts.discard(root, directory / RESUME))
    return True


def _is_older(path: Path, cutoff: datetime) -> bool:
    try:
        return path.stat().st_mtime < cutoff.timestamp()
    except FileNotFoundError:
        return False


def _older(at: datetime | None, keep: timedelta | None, now: datetime) -> bool:
    return at is not None and keep is not None and at < now - keep


def _reclaim_dir(
    writes: sessionmaker[Session],
    retention: Retention,
    done: Reclaimed,
    run_id: uuid.UUID,
    directory: Path,
    status: RunStatus | None,
    finished: datetime | None,
    now: datetime,
) -> None:
    root = retention.artifacts
    if status is None:  # no run owns it (its delete was cut off): gone after the grace
        if retention.failed is not None and _is_older(directory, now - retention.failed):
            artifacts.empty(artifacts.discard(root, directory))
            done.orphans += 1
    elif status in (RunStatus.FAILED, RunStatus.CANCELLED):
        if _older(finished, retention.failed, now):
            assert retention.failed is not None
            cutoff = now - retention.failed
            done.run_dirs += _drop_failed_run_dir(writes, root, run_id, directory, cutoff)
    elif status is RunStatus.SUCCEEDED and _older(finished, retention.resume, now):
        done.resume_points += _drop_resume_points(writes, root, run_id, directory)


def reclaim(
    writes: sessionmaker[Session], retention: Retention, *, now: datetime | None = None
) -> Reclaimed:
    """One retention pass (the reaper runs it every round; each step is cheap when nothing is
    due: one directory listing and one indexed read per 500 run directories)."""
    now = now or utcnow()
    done = Reclaimed()
    root = retention.artifacts
    if retention.idempotency is not None:
        with writes.begin() as session:
            done.idempotency_keys = expire_idempotency_keys(
                session, older_than=now - retention.idempotency
            )
    dirs = artifacts.run_dirs(root)
    for start in range(0, len(dirs), CHUNK):
        chunk = dirs[start : start + CHUNK]
        with writes() as session:
            known = _finished(session, [run_id for run_id, _ in chunk])
        for run_id, directory in chunk:
            status, finished = known.get(run_id, (None, None))
            _reclaim_dir(writes, retention, done, run_id, directory, status, finished, now)
    artifacts.empty_trash(root)
    return done
