"""Listing with keyset pagination, metric points, checkpoints and API keys on both backends."""

from __future__ import annotations

import math
import random
import uuid
from datetime import timedelta

import pytest
from sqlalchemy import func, select
from sqlalchemy.orm import Session

from erpd import metrics as M
from server.db import CheckpointRole, MetricPoint, Pipeline, RunKind, RunStatus
from server.db.base import utcnow
from server.services import (
    InvalidInputError,
    Point,
    authenticate,
    claim_run,
    create_api_key,
    create_run,
    list_runs,
    metric_series,
    record_metrics,
    register_checkpoint,
    request_cancel,
    revoke_api_key,
)


def test_keyset_pages_cover_every_run_once_in_order(factory, builtins) -> None:
    t0 = utcnow()
    with factory.begin() as s:
        # several runs share a timestamp: the id breaks the tie, so no page repeats or skips one
        ids = {
            create_run(
                s,
                kind=RunKind.SAMPLE,
                model_id=builtins[0],
                dataset_id=builtins[1],
                config={},
                now=t0 + timedelta(seconds=i // 3),
            ).id
            for i in range(25)
        }
    seen, cursor, pages = [], None, 0
    while True:
        with factory() as s:
            page = list_runs(s, limit=7, cursor=cursor)
        seen += page.items
        pages += 1
        if page.next_cursor is None:
            break
        cursor = page.next_cursor
        if pages == 2:  # a run created mid-listing is newer: it never shifts later pages
            with factory.begin() as s:
                create_run(
                    s,
                    kind=RunKind.SAMPLE,
                    model_id=builtins[0],
                    dataset_id=builtins[1],
                    config={},
                    now=t0 + timedelta(hours=1),
                )
    assert pages == 4 and {r.id for r in seen} == ids and len(seen) == 25
    keys = [(r.created_at, r.id) for r in seen]
    assert keys == sorted(keys, reverse=True)


def test_list_filters(factory, builtins) -> None:
    t0 = utcnow()
    with factory.begin() as s:
        key, _ = create_api_key(s, name="alice")
        pipe = Pipeline(
            name="p",
            model_id=builtins[0],
            dataset_id=builtins[1],
            rounds=1,
            teacher_objectives=["sapo"],
            stage2={},
            config={},
            created_at=t0,
        )
        s.add(pipe)
        s.flush()

        def run(kind: RunKind, minutes: int, **kw: object) -> uuid.UUID:
            return create_run(
                s,
                kind=kind,
                model_id=builtins[0],
                dataset_id=builtins[1],
                config={},
                now=t0 + timedelta(minutes=minutes),
                **kw,
            ).id  # type: ignore[arg-type]

        a = run(RunKind.STAGE1, 0, tags=["sweep"], owner_id=key.id, pipeline_id=pipe.id)
        b = run(RunKind.STAGE1, 1, tags=["sweep", "lr=1e-4"])
        c = run(RunKind.SAMPLE, 2, owner_id=key.id)
        request_cancel(s, run_id=c, actor="api")

    def listed(**kw: object) -> list[uuid.UUID]:
        with factory() as s:
            return [r.id for r in list_runs(s, **kw).items]  # type: ignore[arg-type]

    assert listed() == [c, b, a]
    assert listed(kind=[RunKind.STAGE1]) == [b, a]
    assert listed(status=[RunStatus.CANCELLED]) == [c]
    assert listed(tag="sweep") == [b, a] and listed(tag="lr=1e-4") == [b]
    assert listed(owner_id=key.id) == [c, a]
    assert listed(pipeline_id=pipe.id) == [a]
    assert listed(created_after=t0 + timedelta(minutes=1)) == [c, b]
    assert listed(created_before=t0 + timedelta(minutes=1)) == [a]
    for bad in ({"cursor": "not-a-cursor"}, {"cursor": "W1td"}, {"limit": 0}, {"limit": 501}):
        with pytest.raises(InvalidInputError), factory() as s:
            list_runs(s, **bad)  # type: ignore[arg-type]


def test_metric_points_never_duplicate_and_the_last_write_wins(factory, builtins) -> None:
    with factory.begin() as s:
        run = create_run(
            s, kind=RunKind.STAGE1, model_id=builtins[0], dataset_id=builtins[1], config={}
        )
    names = [M.KL_EXACT, M.KL_K3, M.ENTROPY_TOKEN, M.LOSS, M.GRAD_NORM]
    rng = random.Random(0)
    latest: dict[tuple[str, int], float] = {}
    # 100k points in 10 batches; ~30% re-report a key (within and across batches), as a resumed
    # run does after its checkpoint
    for batch in range(10):
        points = []
        for i in range(10_000):
            step = rng.randrange(14_000) if rng.random() < 0.3 else batch * 1_400 + i % 1_400
            name = names[i % len(names)]
            value = rng.random()
            points.append(Point(step, name, value, 1.0 + batch))
            latest[(name, step)] = value
        with factory.begin() as s:
            record_metrics(s, run_id=run.id, points=points)
    with factory() as s:
        rows = s.scalar(select(func.count()).select_from(MetricPoint))
        distinct = s.scalar(
            select(func.count()).select_from(
                select(MetricPoint.name, MetricPoint.step).distinct().subquery()
            )
        )
        stored = {
            (n, st): v
            for n, st, v in s.execute(select(MetricPoint.name, MetricPoint.step, MetricPoint.value))
        }
    assert rows == distinct == len(latest)
    assert stored == latest


def test_metric_names_and_non_finite_values(factory, builtins) -> None:
    with factory.begin() as s:
        run = create_run(
            s, kind=RunKind.STAGE1, model_id=builtins[0], dataset_id=builtins[1], config={}
        )
    with pytest.raises(InvalidInputError, match="kl/typo"), factory.begin() as s:
        record_metrics(s, run_id=run.id, points=[Point(0, "kl/typo", 1.0, 0.0)])
    with factory.begin() as s:
        record_metrics(
            s,
            run_id=run.id,
            points=[
                Point(1, M.LOSS, math.nan, 0.0),
                Point(2, M.LOSS, math.inf, 0.0),
                Point(3, M.LOSS, 0.5, 0.0),
                Point(3, M.KL_K3, 0.1, 0.0),
            ],
        )
    with factory() as s:
        series = metric_series(s, run_id=run.id, names=[M.LOSS, M.KL_K3], since_step=1)
    assert series == {M.LOSS: ([2, 3], [None, 0.5]), M.KL_K3: ([3], [0.1])}


def test_checkpoints_register_once(factory, builtins) -> None:
    with factory.begin() as s:
        run = create_run(
            s, kind=RunKind.STAGE1, model_id=builtins[0], dataset_id=builtins[1], config={}
        )
        claim_run(s, run_id=run.id, worker="w", device="cpu")

    def register(session: Session, **kw: object):  # type: ignore[no-untyped-def]
        args = {
            "run_id": run.id,
            "attempt": 1,
            "role": CheckpointRole.RESUME,
            "step": 10,
            "key": f"runs/{run.id.hex}/resume-10",
            "size": 9,
            "sha256": "c" * 64,
            "manifest": {},
        } | kw
        return register_checkpoint(session, **args)  # type: ignore[arg-type]

    with factory.begin() as s:
        first = register(s)
        assert register(s).id == first.id  # the same checkpoint again: a no-op
        assert register(s, sha256="d" * 64).sha256 == "d" * 64  # a rewritten resume point
        register(s, role=CheckpointRole.TEACHER, key=f"runs/{run.id.hex}/teacher-10")
    with pytest.raises(InvalidInputError, match="another hash"), factory.begin() as s:
        register(s, role=CheckpointRole.TEACHER, key="x/y", sha256="e" * 64)
    for bad in ({"key": "../etc/passwd"}, {"key": "/abs"}, {"sha256": "XYZ"}, {"size": -1}):
        with pytest.raises(InvalidInputError), factory.begin() as s:
            register(s, step=11, **bad)


def test_api_keys_are_stored_hashed_and_revocable(factory) -> None:
    with factory.begin() as s:
        key, secret = create_api_key(s, name="ci")
        assert secret not in (key.key_hash, key.prefix) and secret.startswith(key.prefix)
    with factory() as s:
        assert authenticate(s, secret=secret).id == key.id  # type: ignore[union-attr]
        assert authenticate(s, secret=secret + "x") is None
        assert authenticate(s, secret="Bearer nonsense") is None
    with factory.begin() as s:
        revoke_api_key(s, key_id=key.id)
    with factory() as s:
        assert authenticate(s, secret=secret) is None


def test_bad_reads_and_writes_raise_typed_errors(factory, builtins) -> None:
    import base64
    import json
    from datetime import datetime

    from server.services import NotFoundError, StaleAttemptError

    cursor = base64.urlsafe_b64encode(json.dumps([utcnow().isoformat(), 5]).encode()).decode()
    with pytest.raises(InvalidInputError, match="cursor"), factory() as s:
        list_runs(s, cursor=cursor)
    with pytest.raises(InvalidInputError, match="created_after"), factory() as s:
        list_runs(s, created_after=datetime(2026, 1, 1))
    with pytest.raises(NotFoundError), factory.begin() as s:
        record_metrics(s, run_id=uuid.uuid4(), points=[Point(0, M.LOSS, 1.0, 0.0)])
    with factory.begin() as s:
        run = create_run(
            s, kind=RunKind.STAGE1, model_id=builtins[0], dataset_id=builtins[1], config={}
        )
        claim_run(s, run_id=run.id, worker="w", device="cpu")
    for bad in (Point(2.5, M.LOSS, 1.0, 0.0), Point(1, M.LOSS, "x", 0.0)):  # type: ignore[arg-type]
        with pytest.raises(InvalidInputError), factory.begin() as s:
            record_metrics(s, run_id=run.id, points=[bad])
    with pytest.raises(StaleAttemptError), factory.begin() as s:
        record_metrics(s, run_id=run.id, points=[Point(0, M.LOSS, 1.0, 0.0)], attempt=0)
    with factory.begin() as s:
        assert record_metrics(s, run_id=run.id, points=[Point(0, M.LOSS, 1.0, 0.0)], attempt=1)
