"""The run state machine: queued -> running -> succeeded | failed | cancelled.

Every transition writes a RunEvent (the audit trail) in the same transaction. `attempt` is the
fencing token: a worker reports with the attempt it claimed, so a worker the reaper gave up on
(its run requeued or failed meanwhile) gets StaleAttemptError and stops instead of overwriting the
new attempt's state. Functions flush but never commit: the caller owns the transaction.
"""

from __future__ import annotations

import math
import uuid
from collections.abc import Mapping
from datetime import datetime

from sqlalchemy import ColumnElement, and_, exists, not_, or_, select, update
from sqlalchemy.orm import Session, aliased

from erpd import metrics as M
from server.db import (
    FINISHED,
    Checkpoint,
    CheckpointRole,
    EventKind,
    Run,
    RunKind,
    RunStatus,
    RunTeacher,
    utcnow,
)
from server.services.errors import IllegalTransitionError, InvalidInputError, StaleAttemptError
from server.services.runs import add_event, get_run, latest_checkpoint

# Summary metrics copied to their own columns (sortable, comparable across runs).
SUMMARY_COLUMNS = {
    "final_accuracy": M.ACC_EVAL,
    "kl_spent": M.KL_EXACT_BATCH,
    "entropy": M.ENTROPY_BATCH,
}


def running_attempt(session: Session, *, run_id: uuid.UUID, attempt: int, action: str) -> Run:
    run = get_run(session, run_id=run_id, lock=True)
    if run.status is not RunStatus.RUNNING:
        raise IllegalTransitionError(run.id, run.status, action)
    if run.attempt != attempt:
        raise StaleAttemptError(run.id, run.status, attempt, run.attempt)
    return run


def inputs_ready() -> ColumnElement[bool]:
    """A run's inputs exist: every teacher pinned (stage 2), its batch run succeeded and its
    base (a previous round's student) pinned."""
    batch = aliased(Run)
    teachers_pinned = not_(
        exists().where(RunTeacher.student_id == Run.id, RunTeacher.sha256.is_(None))
    )
    batch_done = or_(
        Run.batch_run_id.is_(None),
        exists().where(batch.id == Run.batch_run_id, batch.status == RunStatus.SUCCEEDED),
    )
    base_pinned = or_(Run.base_run_id.is_(None), Run.base_sha256.is_not(None))
    return and_(teachers_pinned, batch_done, base_pinned)


def claim_run(
    session: Session,
    *,
    run_id: uuid.UUID,
    worker: str,
    device: str,
    now: datetime | None = None,
) -> Run | None:
    """Move a queued run to running in one conditional UPDATE; None if it was not claimable.

    A second delivery of the same message, a cancelled run and a run whose inputs are not ready
    (teachers not all pinned, batch not sampled yet) all come back None: the caller simply drops
    the message; the run is published again once its inputs are ready.
    """
    now = now or utcnow()
    stmt = (
        update(Run)
        .where(
            Run.id == run_id,
            Run.status == RunStatus.QUEUED,
            Run.cancel_requested.is_(False),
            inputs_ready(),
        )
        .values(
            status=RunStatus.RUNNING,
            attempt=Run.attempt + 1,
            worker=worker,
            device=device,
            started_at=now,
            heartbeat_at=None,
            progress_step=None,
            progress_total=None,
        )
        .returning(Run)
        .execution_options(populate_existing=True, synchronize_session=False)
    )
    run = session.scalars(stmt).one_or_none()
    if run is None:
        return None
    add_event(
        session,
        run,
        event=EventKind.CLAIMED,
        from_status=RunStatus.QUEUED,
        actor=f"worker:{worker}",
        reason=f"attempt {run.attempt} of {run.max_attempts} on {device}",
        now=now,
    )
    return run


def heartbeat(
    session: Session,
    *,
    run_id: uuid.UUID,
    attempt: int,
    step: int | None = None,
    total: int | None = None,
    now: datetime | None = None,
) -> bool:
    """Record that the attempt is alive (and its progress); returns whether cancel was requested,
    so the worker learns it in the same round trip."""
    values: dict[str, object] = {"heartbeat_at": now or utcnow()}
    if step is not None:
        values["progress_step"] = step
    if total is not None:
        values["progress_total"] = total
    stmt = (
        update(Run)
        .where(Run.id == run_id, Run.status == RunStatus.RUNNING, Run.attempt == attempt)
        .values(**values)
        .returning(Run.cancel_requested)
        .execution_options(synchronize_session=False)
    )
    cancel = session.scalars(stmt).one_or_none()
    if cancel is None:
        run = get_run(session, run_id=run_id)
        if run.status is RunStatus.RUNNING:
            raise StaleAttemptError(run.id, run.status, attempt, run.attempt)
        raise IllegalTransitionError(run.id, run.status, "heartbeat")
    return bool(cancel)


def _clean_summary(summary: Mapping[str, float]) -> dict[str, float | None]:
    clean: dict[str, float | None] = {}
    for name, value in summary.items():
        if name not in M.CATALOGUE:
            raise InvalidInputError(f"summary.{name}", "unknown metric name (see erpd/metrics.py)")
        v = float(value)
        clean[name] = v if math.isfinite(v) else None  # JSON has no NaN
    return clean


def complete_run(
    session: Session,
    *,
    run_id: uuid.UUID,
    attempt: int,
    summary: Mapping[str, float],
    actor: str,
    steps: int | None = None,
    total: int | None = None,
    now: datetime | None = None,
) -> Run:
    """running -> succeeded. A stage-1 run must have registered its teacher checkpoint: its
    sha256 is pinned on every stage-2 run waiting for this teacher. Likewise a stage-2 run's
    student is pinned on the runs of the next round, whose base it is.

    `steps`, the optimizer steps the stage took, becomes the final progress (the last heartbeat
    may be a few steps behind), and `total` its planned steps (a stage shorter than one
    heartbeat never reported one); without them a run that reported a total is shown
    complete."""
    now = now or utcnow()
    run = running_attempt(session, run_id=run_id, attempt=attempt, action="complete")
    clean = _clean_summary(summary)
    if run.kind is RunKind.STAGE1:
        _pin_teacher(session, run)
    elif run.kind is RunKind.STAGE2:
        _pin_base(session, run)
    run.status = RunStatus.SUCCEEDED
    run.finished_at = now
    run.summary = clean
    if total is not None:
        run.progress_total = total
    if steps is not None:
        run.progress_step = steps
    elif run.progress_total is not None:
        run.progress_step = run.progress_total
    for column, name in SUMMARY_COLUMNS.items():
        setattr(run, column, clean.get(name))
    add_event(
        session, run, event=EventKind.SUCCEEDED, from_status=RunStatus.RUNNING, actor=actor, now=now
    )
    session.flush()
    return run


def _own_checkpoint(session: Session, run: Run, role: CheckpointRole) -> Checkpoint:
    """The checkpoint a succeeding run hands on; a run that registered none cannot succeed."""
    ckpt = latest_checkpoint(session, run_id=run.id, role=role)
    if ckpt is None:
        raise IllegalTransitionError(run.id, run.status, f"complete without a {role} checkpoint")
    return ckpt


def _pin_teacher(session: Session, run: Run) -> None:
    ckpt = _own_checkpoint(session, run, CheckpointRole.TEACHER)
    session.execute(
        update(RunTeacher)
        .where(RunTeacher.teacher_id == run.id, RunTeacher.sha256.is_(None))
        .values(checkpoint_id=ckpt.id, sha256=ckpt.sha256)
        .execution_options(synchronize_session="fetch")
    )


def _pin_base(session: Session, run: Run) -> None:
    ckpt = _own_checkpoint(session, run, CheckpointRole.STUDENT)
    session.execute(
        update(Run)
        .where(Run.base_run_id == run.id, Run.base_sha256.is_(None))
        .values(base_sha256=ckpt.sha256)
        .execution_options(synchronize_session="fetch")
    )


def fail_run(
    session: Session,
    *,
    run_id: uuid.UUID,
    attempt: int,
    reason: str,
    actor: str,
    now: datetime | None = None,
) -> Run:
    """running -> failed (the worker hit an error it cannot retry)."""
    now = now or utcnow()
    run = running_attempt(session, run_id=run_id, attempt=attempt, action="fail")
    end_run(session, run, RunStatus.FAILED, EventKind.FAILED, actor=actor, reason=reason, now=now)
    return run


def cancel_run(
    session: Session,
    *,
    run_id: uuid.UUID,
    attempt: int,
    actor: str,
    reason: str = "cancel requested",
    now: datetime | None = None,
) -> Run:
    """running -> cancelled: the worker saw the cancel flag, saved and stopped."""
    now = now or utcnow()
    run = running_attempt(session, run_id=run_id, attempt=attempt, action="cancel")
    end_run(
        session, run, RunStatus.CANCELLED, EventKind.CANCELLED, actor=actor, reason=reason, now=now
    )
    return run


def end_run(
    session: Session,
    run: Run,
    status: RunStatus,
    event: EventKind,
    *,
    actor: str,
    reason: str | None,
    now: datetime,
) -> None:
    before = run.status
    run.status = status
    run.finished_at = now
    if status is RunStatus.FAILED:
        run.error = reason
    add_event(session, run, event=event, from_status=before, actor=actor, reason=reason, now=now)
    _end_dependents(session, source=run, now=now)
    session.flush()


def _end_dependents(session: Session, *, source: Run, now: datetime) -> None:
    """A run can never start once one of its inputs failed or was cancelled: a stage-2 run
    whose teacher did, a stage run whose batch (`sample` run) did, a later round's run whose
    base (the previous student) did. They end as their input did (a cancelled teacher cancels
    its waiting student, it does not make it 'failed'), with the input named in their error;
    their own dependents follow, round after round."""
    if source.status is RunStatus.SUCCEEDED:
        return
    depends = or_(
        Run.id.in_(select(RunTeacher.student_id).where(RunTeacher.teacher_id == source.id)),
        Run.batch_run_id == source.id,
        Run.base_run_id == source.id,
    )
    dependents = session.scalars(
        select(Run)
        .where(depends, Run.status == RunStatus.QUEUED)
        .order_by(Run.id)  # a stable lock order for the dependents of one input
        .with_for_update()
        .execution_options(populate_existing=True)
    ).all()
    role = {RunKind.STAGE1: "teacher", RunKind.SAMPLE: "batch", RunKind.STAGE2: "base"}
    reason = f"{role[source.kind]} run {source.id} {source.status}"
    if source.error:
        reason += f": {source.error}"
    cancelled = source.status is RunStatus.CANCELLED
    status = RunStatus.CANCELLED if cancelled else RunStatus.FAILED
    event = EventKind.CANCELLED if cancelled else EventKind.FAILED
    for dependent in dependents:
        if dependent.status is not RunStatus.QUEUED:
            continue  # ended already, through another of its inputs earlier in this cascade
        dependent.error = reason  # the input it waited for, whether it fails or is cancelled
        end_run(session, dependent, status, event, actor="system", reason=reason, now=now)


def request_cancel(
    session: Session,
    *,
    run_id: uuid.UUID,
    actor: str,
    reason: str | None = None,
    now: datetime | None = None,
) -> Run:
    """A queued run is cancelled at once; a running one gets the flag its worker checks every
    optimizer step (cancel is cooperative: the worker saves, stops and calls cancel_run)."""
    now = now or utcnow()
    run = get_run(session, run_id=run_id, lock=True)
    if run.status in FINISHED:
        raise IllegalTransitionError(run.id, run.status, "cancel")
    run.cancel_requested = True
    if run.status is RunStatus.QUEUED:
        end_run(
            session,
            run,
            RunStatus.CANCELLED,
            EventKind.CANCELLED,
            actor=actor,
            reason=reason or "cancelled before it started",
            now=now,
        )
    elif run.status is RunStatus.RUNNING:
        add_event(
            session,
            run,
            event=EventKind.CANCEL_REQUESTED,
            from_status=run.status,
            actor=actor,
            reason=reason,
            now=now,
        )
    session.flush()
    return run


def retry_run(
    session: Session,
    *,
    run_id: uuid.UUID,
    actor: str,
    attempts: int = 3,
    now: datetime | None = None,
) -> Run:
    """failed | cancelled -> queued: a new attempt with the same config and a fresh budget of
    `attempts` claims."""
    now = now or utcnow()
    run = get_run(session, run_id=run_id, lock=True)
    if run.status not in (RunStatus.FAILED, RunStatus.CANCELLED):
        raise IllegalTransitionError(run.id, run.status, "retry")
    if attempts < 1:
        raise InvalidInputError("attempts", "must be at least 1")
    inputs: list[tuple[str, uuid.UUID | None]] = [("teacher", t.teacher_id) for t in run.teachers]
    inputs += [("batch", run.batch_run_id), ("base", run.base_run_id)]
    for role, input_id in inputs:
        if input_id is None:
            continue
        source = get_run(session, run_id=input_id, lock=True)
        if source.status in (RunStatus.FAILED, RunStatus.CANCELLED):
            raise IllegalTransitionError(
                run.id,
                run.status,
                f"retry: {role} run {source.id} is {source.status}, retry it first",
            )
    before = run.status
    run.status = RunStatus.QUEUED
    run.max_attempts = run.attempt + attempts
    run.cancel_requested = False
    run.error = None
    run.finished_at = None
    run.heartbeat_at = None
    run.enqueued_at = None  # the outbox publishes the new attempt
    run.notify_enqueued_at = None  # and its end gets a webhook of its own
    run.progress_step = run.progress_total = None
    add_event(session, run, event=EventKind.RETRIED, from_status=before, actor=actor, now=now)
    session.flush()
    return run
