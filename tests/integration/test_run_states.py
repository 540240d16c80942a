"""The run state machine on real Postgres and SQLite: transitions, audit trail, typed errors."""

from __future__ import annotations

import itertools
import random
import uuid
from datetime import timedelta

import pytest
from sqlalchemy import select
from sqlalchemy.orm import Session, sessionmaker

from erpd import metrics as M
from server.db import Checkpoint, CheckpointRole, EventKind, Run, RunEvent, RunKind, RunStatus
from server.db.base import utcnow
from server.services import (
    IllegalTransitionError,
    InvalidInputError,
    NotFoundError,
    StaleAttemptError,
    cancel_run,
    claim_run,
    complete_run,
    create_run,
    fail_run,
    get_run,
    heartbeat,
    register_checkpoint,
    request_cancel,
    retry_run,
    run_events,
)

Ids = tuple[uuid.UUID, uuid.UUID]
SUMMARY = {M.ACC_EVAL: 0.61, M.KL_EXACT_BATCH: 0.05, M.ENTROPY_BATCH: 0.4}


def new_run(s: Session, ids: Ids, kind: RunKind = RunKind.STAGE1, **kw: object) -> Run:
    kw.setdefault("config", {})
    return create_run(s, kind=kind, model_id=ids[0], dataset_id=ids[1], **kw)  # type: ignore[arg-type]


def claim(factory: sessionmaker[Session], run_id: uuid.UUID) -> Run | None:
    with factory.begin() as s:
        return claim_run(s, run_id=run_id, worker="w1", device="cpu")


def finish_teacher(
    factory: sessionmaker[Session],
    run_id: uuid.UUID,
    sha: str = "a" * 64,
    role: CheckpointRole = CheckpointRole.TEACHER,
) -> None:
    """Claim the run, register its checkpoint (a teacher's, or `role`) and complete it."""
    run = claim(factory, run_id)
    assert run is not None
    with factory.begin() as s:
        register_checkpoint(
            s,
            run_id=run_id,
            attempt=run.attempt,
            role=role,
            step=40,
            key=f"runs/{run_id.hex}/{role}-40",
            size=123,
            sha256=sha,
            manifest={"step": 40},
        )
        complete_run(s, run_id=run_id, attempt=run.attempt, summary=SUMMARY, actor="worker:w1")


def events(factory: sessionmaker[Session], run_id: uuid.UUID) -> list[RunEvent]:
    with factory() as s:
        return run_events(s, run_id=run_id)


def test_create_stores_the_normalised_config_and_an_event(factory, builtins) -> None:
    with factory.begin() as s:
        run = new_run(s, builtins, config={"stage": {"objective": "grpo"}}, tags=["b", "a", "a"])
    with factory() as s:
        stored = get_run(s, run_id=run.id)
        assert stored.status is RunStatus.QUEUED and stored.attempt == 0
        assert stored.config["stage"]["objective"] == "grpo"
        assert stored.config["stage"]["lr"] == 1e-4  # the default, written out
        assert stored.tags == ["a", "b"]
    [created] = events(factory, run.id)
    assert created.event is EventKind.CREATED and created.to_status is RunStatus.QUEUED


@pytest.mark.parametrize(
    ("kwargs", "field"),
    [
        ({"config": {"stage": {"lr": -1}}}, "config.stage.lr"),
        ({"config": {"stage": {"objective": "ppo"}}}, "config.stage.objective"),
        ({"config": {"model": {"path": "/etc"}}}, "config.model"),
        ({"tags": ["has space"]}, "tags"),
        ({"max_attempts": 0}, "max_attempts"),
        ({"teacher_ids": [uuid.uuid4()]}, "teacher_ids"),
    ],
)
def test_bad_input_names_the_field_and_writes_nothing(factory, builtins, kwargs, field) -> None:
    with pytest.raises(InvalidInputError) as err, factory.begin() as s:
        new_run(s, builtins, **kwargs)
    assert err.value.field == field
    with factory() as s:
        assert s.scalars(select(Run)).all() == []


def test_unknown_model_and_missing_run(factory, builtins) -> None:
    with pytest.raises(InvalidInputError, match="model_id"), factory.begin() as s:
        create_run(s, kind=RunKind.SAMPLE, model_id=uuid.uuid4(), dataset_id=builtins[1], config={})
    with pytest.raises(NotFoundError), factory() as s:
        get_run(s, run_id=uuid.uuid4())


def test_lifecycle_claim_heartbeat_complete(factory, builtins) -> None:
    with factory.begin() as s:
        run = new_run(s, builtins)
    claimed = claim(factory, run.id)
    assert claimed is not None and claimed.status is RunStatus.RUNNING and claimed.attempt == 1
    assert claimed.worker == "w1" and claimed.started_at is not None
    assert claim(factory, run.id) is None  # a second delivery of the message does nothing
    with factory.begin() as s:
        assert heartbeat(s, run_id=run.id, attempt=1, step=5, total=40) is False
    with factory.begin() as s:
        register_checkpoint(
            s,
            run_id=run.id,
            attempt=1,
            role=CheckpointRole.TEACHER,
            step=40,
            key=f"runs/{run.id.hex}/teacher-40",
            size=1,
            sha256="b" * 64,
            manifest={},
        )
        complete_run(s, run_id=run.id, attempt=1, summary=SUMMARY, actor="worker:w1", steps=38)
    with factory() as s:
        done = get_run(s, run_id=run.id)
        assert done.status is RunStatus.SUCCEEDED and done.finished_at is not None
        assert (done.final_accuracy, done.kl_spent, done.entropy) == (0.61, 0.05, 0.4)
        # the last heartbeat said 5; the stage's own count of steps is what is kept
        assert (done.progress_step, done.progress_total) == (38, 40)
    kinds = [e.event for e in events(factory, run.id)]
    assert kinds == [EventKind.CREATED, EventKind.CLAIMED, EventKind.SUCCEEDED]


def test_a_stage_shorter_than_a_heartbeat_still_ends_with_its_progress(factory, builtins) -> None:
    """No heartbeat carried a total: the stage's own counts are what completion records."""
    with factory.begin() as s:
        run = new_run(s, builtins, kind=RunKind.SAMPLE)
    assert claim(factory, run.id) is not None
    with factory.begin() as s:
        complete_run(s, run_id=run.id, attempt=1, summary={}, actor="w", steps=2, total=2)
    with factory() as s:
        done = get_run(s, run_id=run.id)
        assert (done.progress_step, done.progress_total) == (2, 2)


def test_illegal_transitions_raise_typed_errors(factory, builtins) -> None:
    with factory.begin() as s:
        run = new_run(s, builtins, kind=RunKind.SAMPLE)
    with pytest.raises(IllegalTransitionError, match="queued: cannot complete"), factory() as s:
        complete_run(s, run_id=run.id, attempt=0, summary={}, actor="x")
    claim(factory, run.id)
    with pytest.raises(StaleAttemptError), factory() as s:
        heartbeat(s, run_id=run.id, attempt=7)
    with pytest.raises(InvalidInputError, match=r"summary\.acc/nope"), factory() as s:
        complete_run(s, run_id=run.id, attempt=1, summary={"acc/nope": 1.0}, actor="x")
    with factory.begin() as s:
        fail_run(s, run_id=run.id, attempt=1, reason="CUDA out of memory", actor="worker:w1")
    with pytest.raises(IllegalTransitionError, match="failed: cannot cancel"), factory() as s:
        request_cancel(s, run_id=run.id, actor="x")
    with pytest.raises(IllegalTransitionError, match="failed: cannot heartbeat"), factory() as s:
        heartbeat(s, run_id=run.id, attempt=1)
    with factory() as s:
        assert get_run(s, run_id=run.id).error == "CUDA out of memory"


def test_a_stage1_run_cannot_succeed_without_its_teacher_checkpoint(factory, builtins) -> None:
    with factory.begin() as s:
        run = new_run(s, builtins)
    claim(factory, run.id)
    with pytest.raises(IllegalTransitionError, match="teacher checkpoint"), factory() as s:
        complete_run(s, run_id=run.id, attempt=1, summary={}, actor="x")


def test_cancel_queued_at_once_running_cooperatively(factory, builtins) -> None:
    with factory.begin() as s:
        queued, running = new_run(s, builtins), new_run(s, builtins)
    with factory.begin() as s:
        assert request_cancel(s, run_id=queued.id, actor="api:k").status is RunStatus.CANCELLED
    assert claim(factory, queued.id) is None
    claim(factory, running.id)
    with factory.begin() as s:
        assert request_cancel(s, run_id=running.id, actor="api:k").status is RunStatus.RUNNING
    with factory.begin() as s:
        assert heartbeat(s, run_id=running.id, attempt=1) is True  # the worker learns it here
        cancel_run(s, run_id=running.id, attempt=1, actor="worker:w1")
    with pytest.raises(IllegalTransitionError, match="cancelled: cannot cancel"), factory() as s:
        request_cancel(s, run_id=running.id, actor="api:k")
    kinds = [e.event for e in events(factory, running.id)]
    assert kinds[-2:] == [EventKind.CANCEL_REQUESTED, EventKind.CANCELLED]


def test_retry_gives_a_new_attempt_with_the_same_config(factory, builtins) -> None:
    with factory.begin() as s:
        run = new_run(s, builtins, max_attempts=1, config={"stage": {"epochs": 3}})
    claim(factory, run.id)
    with factory.begin() as s:
        fail_run(s, run_id=run.id, attempt=1, reason="boom", actor="w")
    with factory.begin() as s:
        again = retry_run(s, run_id=run.id, actor="api:k", attempts=2)
        assert again.status is RunStatus.QUEUED and again.error is None
        assert again.max_attempts == 3
    second = claim(factory, run.id)
    assert second is not None and second.attempt == 2 and second.config["stage"]["epochs"] == 3
    with pytest.raises(IllegalTransitionError, match="running: cannot retry"), factory() as s:
        retry_run(s, run_id=run.id, actor="api:k")


def test_stage2_waits_for_teachers_and_pins_their_sha256(factory, builtins) -> None:
    with factory.begin() as s:
        t1, t2 = new_run(s, builtins), new_run(s, builtins)
        student = new_run(s, builtins, kind=RunKind.STAGE2, teacher_ids=[t1.id, t2.id])
    assert claim(factory, student.id) is None  # no teacher has finished
    finish_teacher(factory, t1.id, sha="1" * 64)
    assert claim(factory, student.id) is None  # one still missing
    finish_teacher(factory, t2.id, sha="2" * 64)
    with factory() as s:
        pins = [(t.teacher_id, t.sha256) for t in get_run(s, run_id=student.id).teachers]
        ckpt = s.scalars(select(Checkpoint).where(Checkpoint.run_id == t1.id)).one()
    assert pins == [(t1.id, "1" * 64), (t2.id, "2" * 64)]
    assert ckpt.sha256 == "1" * 64
    assert claim(factory, student.id) is not None


def test_a_failed_teacher_fails_its_waiting_students(factory, builtins) -> None:
    with factory.begin() as s:
        teacher = new_run(s, builtins)
        student = new_run(s, builtins, kind=RunKind.STAGE2, teacher_ids=[teacher.id])
    claim(factory, teacher.id)
    with factory.begin() as s:
        fail_run(s, run_id=teacher.id, attempt=1, reason="loss is NaN", actor="worker:w1")
    with factory() as s:
        failed = get_run(s, run_id=student.id)
    assert failed.status is RunStatus.FAILED
    assert failed.error is not None and str(teacher.id) in failed.error and "NaN" in failed.error
    with pytest.raises(InvalidInputError, match=r"teacher_ids\.0"), factory.begin() as s:
        new_run(s, builtins, kind=RunKind.STAGE2, teacher_ids=[teacher.id])


def test_a_cancelled_teacher_cancels_its_waiting_students(factory, builtins) -> None:
    with factory.begin() as s:
        teacher = new_run(s, builtins)
        student = new_run(s, builtins, kind=RunKind.STAGE2, teacher_ids=[teacher.id])
    with factory.begin() as s:
        request_cancel(s, run_id=teacher.id, actor="api:k")
    with factory() as s:
        ended = get_run(s, run_id=student.id)
    assert ended.status is RunStatus.CANCELLED  # not 'failed': nothing went wrong
    assert ended.error == f"teacher run {teacher.id} cancelled"
    assert [e.event for e in events(factory, student.id)] == [
        EventKind.CREATED,
        EventKind.CANCELLED,
    ]


def test_stage2_refuses_teachers_of_another_kind_or_weights_mismatch(factory, builtins) -> None:
    with factory.begin() as s:
        sample = new_run(s, builtins, kind=RunKind.SAMPLE)
        teacher = new_run(s, builtins)
    with pytest.raises(InvalidInputError, match="not stage1"), factory.begin() as s:
        new_run(s, builtins, kind=RunKind.STAGE2, teacher_ids=[sample.id])
    cfg = {"stage": {"teacher_weights": [1.0, 2.0]}}
    with pytest.raises(InvalidInputError) as err, factory.begin() as s:
        new_run(s, builtins, kind=RunKind.STAGE2, teacher_ids=[teacher.id], config=cfg)
    assert err.value.field == "config.stage.teacher_weights"


def test_every_transition_writes_an_event_chain(factory, builtins) -> None:
    """Random walks through the API of the state machine: the events always form a chain from
    `created` to the run's current status, one per successful transition."""
    from server.services import requeue_stale

    rng = random.Random(0)
    with factory.begin() as s:
        runs = [new_run(s, builtins, kind=RunKind.SAMPLE, max_attempts=2) for _ in range(6)]
    now = utcnow()
    transitions = {r.id: 1 for r in runs}  # `created`
    for i in range(300):
        run = rng.choice(runs)
        now += timedelta(seconds=10)
        action = rng.choice(["claim", "complete", "fail", "cancel", "request", "retry", "reap"])
        with factory.begin() as s:
            current = get_run(s, run_id=run.id)
            try:
                if action == "claim":
                    ok = claim_run(s, run_id=run.id, worker="w", device="cpu", now=now) is not None
                elif action == "complete":
                    complete_run(
                        s, run_id=run.id, attempt=current.attempt, summary={}, actor="w", now=now
                    )
                    ok = True
                elif action == "fail":
                    fail_run(
                        s, run_id=run.id, attempt=current.attempt, reason="x", actor="w", now=now
                    )
                    ok = True
                elif action == "cancel":
                    cancel_run(s, run_id=run.id, attempt=current.attempt, actor="w", now=now)
                    ok = True
                elif action == "request":
                    request_cancel(s, run_id=run.id, actor="api", now=now)
                    ok = True
                elif action == "retry":
                    retry_run(s, run_id=run.id, actor="api", now=now)
                    ok = True
                else:
                    for reaped in requeue_stale(s, timeout=timedelta(seconds=5 + i % 30), now=now):
                        transitions[reaped.run_id] += 1  # the reaper may touch several runs
                    continue
            except IllegalTransitionError:
                ok = False
            transitions[run.id] += ok
    seen: set[EventKind] = set()
    for run in runs:
        chain = events(factory, run.id)
        seen |= {e.event for e in chain}
        assert len(chain) == transitions[run.id]
        assert chain[0].event is EventKind.CREATED and chain[0].from_status is None
        for before, after in itertools.pairwise(chain):
            assert after.from_status is before.to_status
        with factory() as s:
            assert chain[-1].to_status is get_run(s, run_id=run.id).status
    assert seen == set(EventKind)  # the walk reached every kind of transition


def test_a_stage2_run_created_after_its_teachers_succeeded_is_pinned_at_once(
    factory, builtins
) -> None:
    with factory.begin() as s:
        teacher = new_run(s, builtins)
    finish_teacher(factory, teacher.id, sha="f" * 64)
    with factory.begin() as s:
        student = new_run(s, builtins, kind=RunKind.STAGE2, teacher_ids=[teacher.id])
        assert [t.sha256 for t in student.teachers] == ["f" * 64]
    assert claim(factory, student.id) is not None


def test_a_session_holding_an_old_copy_of_a_run_cannot_act_on_it(factory, builtins) -> None:
    """Sessions keep loaded rows across commits (expire_on_commit=False): every state check must
    re-read the row, or a worker the reaper gave up on could finish the next attempt's run."""
    with factory.begin() as s:
        run = new_run(s, builtins, kind=RunKind.SAMPLE)
    old_worker = factory()
    with old_worker.begin():  # the sessions keep these objects only while they are referenced
        held = claim_run(old_worker, run_id=run.id, worker="A", device="cpu")
        assert held is not None
    from server.services import requeue_stale

    with factory.begin() as s:
        requeue_stale(s, timeout=timedelta(0), now=utcnow() + timedelta(seconds=1))
    assert claim(factory, run.id) is not None  # attempt 2, worker w1
    with pytest.raises(StaleAttemptError), old_worker.begin():
        complete_run(old_worker, run_id=run.id, attempt=1, summary={}, actor="worker:A")
    api = factory()
    with api.begin():
        api_copy = get_run(api, run_id=run.id)
        assert api_copy.status is RunStatus.RUNNING
    with factory.begin() as s:
        request_cancel(s, run_id=run.id, actor="api")
        cancel_run(s, run_id=run.id, attempt=2, actor="worker:w1")
    with pytest.raises(IllegalTransitionError, match="cancelled: cannot cancel"), api.begin():
        request_cancel(api, run_id=run.id, actor="api")
    old_worker.close()
    api.close()


def test_deleting_a_pipeline_deletes_its_runs_and_their_rows(factory, builtins) -> None:
    from server.db import Pipeline

    with factory.begin() as s:
        pipe = Pipeline(
            name="p",
            model_id=builtins[0],
            dataset_id=builtins[1],
            rounds=1,
            teacher_objectives=["sapo"],
            stage2={},
            config={},
        )
        s.add(pipe)
        s.flush()
        teacher = new_run(s, builtins, pipeline_id=pipe.id, tags=["x"])
        new_run(s, builtins, kind=RunKind.STAGE2, teacher_ids=[teacher.id], pipeline_id=pipe.id)
    with factory.begin() as s:
        s.delete(s.get(Pipeline, pipe.id))
    with factory() as s:
        assert s.scalars(select(Run)).all() == []
        assert s.scalars(select(RunEvent)).all() == []


def finish_student(factory: sessionmaker[Session], run_id: uuid.UUID, sha: str) -> None:
    finish_teacher(factory, run_id, sha, role=CheckpointRole.STUDENT)


def two_round_pipeline(factory: sessionmaker[Session], ids: Ids) -> list[Run]:
    from server.schemas import PipelineCreate
    from server.services.pipelines import create_pipeline

    spec = PipelineCreate(rounds=2).model_dump(mode="json")  # one teacher per round
    with factory.begin() as s:
        _, runs = create_pipeline(
            s, spec=spec, model_id=ids[0], dataset_id=ids[1], owner_id=None, actor="test"
        )
    return runs


def test_round_two_starts_from_round_one_s_student_pinned_by_sha256(factory, builtins) -> None:
    from server.services.outbox import pending_publication

    sample0, teacher0, student0, sample1, teacher1, student1 = two_round_pipeline(factory, builtins)
    assert [r.round for r in (sample0, student0, sample1, student1)] == [0, 0, 1, 1]
    assert {sample1.base_run_id, teacher1.base_run_id, student1.base_run_id} == {student0.id}
    assert sample0.base_run_id is None and teacher1.batch_run_id == sample1.id
    with factory() as s:
        assert pending_publication(s) == [sample0.id]
    assert claim(factory, sample1.id) is None  # its base is not trained yet
    finish_teacher(factory, sample0.id)  # (a sample run registers no checkpoint: harmless here)
    finish_teacher(factory, teacher0.id, sha="1" * 64)
    finish_student(factory, student0.id, sha="2" * 64)
    with factory() as s:
        bases = {get_run(s, run_id=r.id).base_sha256 for r in (sample1, teacher1, student1)}
        assert bases == {"2" * 64}
        assert pending_publication(s) == [sample1.id]  # the next round starts with its batch
    assert claim(factory, sample1.id) is not None


def test_a_failed_student_fails_every_later_round(factory, builtins) -> None:
    sample0, teacher0, student0, *round1 = two_round_pipeline(factory, builtins)
    finish_teacher(factory, sample0.id)
    finish_teacher(factory, teacher0.id)
    claim(factory, student0.id)
    with factory.begin() as s:
        fail_run(s, run_id=student0.id, attempt=1, reason="disk full", actor="worker:w1")
    with factory() as s:
        later = [get_run(s, run_id=r.id) for r in round1]
    assert [r.status for r in later] == [RunStatus.FAILED] * 3
    for r in later:  # each failed once, though two of its inputs failed in the same cascade
        assert [e.event for e in events(factory, r.id)] == [EventKind.CREATED, EventKind.FAILED]
    assert all(r.error is not None and "disk full" in r.error for r in later)
    assert f"base run {student0.id} failed" in str(later[0].error)  # the sample run's only input
    refused = pytest.raises(IllegalTransitionError, match=f"base run {student0.id} is failed")
    with refused, factory.begin() as s:
        retry_run(s, run_id=round1[0].id, actor="api:k")


def test_a_base_run_must_be_a_student_of_the_same_model(factory, builtins) -> None:
    with factory.begin() as s:
        teacher = new_run(s, builtins)
    with pytest.raises(InvalidInputError, match="not stage2") as err, factory.begin() as s:
        new_run(s, builtins, kind=RunKind.SAMPLE, base_run_id=teacher.id)
    assert err.value.field == "base_run_id"
    with pytest.raises(InvalidInputError, match="not found"), factory.begin() as s:
        new_run(s, builtins, base_run_id=uuid.uuid4())
    with factory.begin() as s:
        student = new_run(s, builtins, kind=RunKind.STAGE2, teacher_ids=[teacher.id])
    finish_teacher(factory, teacher.id)
    finish_student(factory, student.id, sha="3" * 64)
    with factory.begin() as s:  # created after its base succeeded: pinned at once
        assert new_run(s, builtins, base_run_id=student.id).base_sha256 == "3" * 64


def test_a_stage_s_batch_and_teachers_must_come_from_its_own_base(factory, builtins) -> None:
    sample0, teacher0, _, sample1, teacher1, _ = two_round_pipeline(factory, builtins)
    with pytest.raises(InvalidInputError) as err, factory.begin() as s:  # round 1's batch, no base
        new_run(s, builtins, batch_run_id=sample1.id)
    assert err.value.field == "batch_run_id" and "another base" in str(err.value)
    with pytest.raises(InvalidInputError) as err, factory.begin() as s:  # a round-0 teacher
        new_run(s, builtins, kind=RunKind.STAGE2, teacher_ids=[teacher0.id, teacher1.id])
    assert err.value.field == "teacher_ids.1"
    with factory.begin() as s:  # the same base all round: accepted
        run = new_run(
            s, builtins, kind=RunKind.STAGE2, teacher_ids=[teacher0.id], batch_run_id=sample0.id
        )
        assert run.base_run_id is None
