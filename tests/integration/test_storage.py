"""Giving storage back: DELETE of runs and pipelines (refused while running or while another run
reads them), and the reaper's retention pass over old timestamps injected into a real store."""

from __future__ import annotations

import os
import uuid
from datetime import timedelta
from pathlib import Path

import httpx
from sqlalchemy import func, select, update

from erpd import metrics as M
from server.db import (
    Base,
    CheckpointRole,
    IdempotencyKey,
    Run,
    make_engine,
    session_factory,
    utcnow,
)
from server.services import (
    Point,
    claim_run,
    complete_run,
    fail_run,
    record_metrics,
    register_checkpoint,
)
from server.services.reaper import reap
from server.services.storage import Retention
from tests.integration.conftest import Api


def error(response: httpx.Response) -> dict[str, str]:
    body: dict[str, dict[str, str]] = response.json()
    return body["error"]


def delete(api: Api, path: str, key: str | None = None) -> httpx.Response:
    return api.client.delete(f"/api/v1{path}", headers=api.headers(key))


def rows(api: Api) -> dict[str, int]:
    engine = make_engine(api.settings.db_url)
    with engine.connect() as conn:
        counts = {
            t.name: int(conn.execute(select(func.count()).select_from(t)).scalar_one())
            for t in Base.metadata.sorted_tables
        }
    engine.dispose()
    return counts


def files(root: Path) -> list[str]:
    return sorted(p.relative_to(root).as_posix() for p in root.rglob("*") if p.is_file())


def ran(api: Api, run_id: str, *, fail: bool = False, resume: bool = False) -> Path:
    """Play a worker on the run: claim it, write its directory and a few points, register a
    checkpoint, then end it (failed, or succeeded); returns its directory."""
    rid = uuid.UUID(run_id)
    here = api.settings.artifacts / "runs" / rid.hex
    (here / "batch").mkdir(parents=True)
    (here / "batch" / "batch.safetensors").write_bytes(b"b" * 4096)
    if resume:
        (here / "resume" / "step-2").mkdir(parents=True)
        (here / "resume" / "step-2" / "model.safetensors").write_bytes(b"r" * 8192)
    factory = session_factory(make_engine(api.settings.db_url))
    with factory.begin() as s:
        run = claim_run(s, run_id=rid, worker="w", device="cpu")
        assert run is not None
        record_metrics(s, run_id=rid, points=[Point(1, M.LOSS, 0.5, 0.0)])
        if run.kind.value != "sample":
            key = f"runs/{rid.hex}/teacher-2"
            (api.settings.artifacts / key).mkdir(parents=True)
            (api.settings.artifacts / key / "manifest.json").write_text("{}")
            register_checkpoint(
                s,
                run_id=rid,
                attempt=1,
                role=CheckpointRole.TEACHER,
                step=2,
                key=key,
                size=2,
                sha256="c" * 64,
                manifest={},
            )
        if fail:
            fail_run(s, run_id=rid, attempt=1, reason="boom", actor="w")
        else:
            complete_run(s, run_id=rid, attempt=1, summary={}, actor="w")
    return here


def test_deleting_runs_gives_back_every_row_and_file(api: Api) -> None:
    before_rows, before_files = rows(api), files(api.settings.home)
    made = api.post("/pipelines", json={"rounds": 1}).json()
    sample, teacher, student = made["runs"]
    for run_id in (sample, teacher):
        ran(api, run_id, resume=True)
    assert rows(api) != before_rows and files(api.settings.home) != before_files
    busy = delete(api, f"/runs/{teacher}")
    assert busy.status_code == 409 and student in error(busy)["message"]  # names its reader
    assert delete(api, f"/runs/{sample}").status_code == 409
    assert delete(api, f"/runs/{student}", key=api.bob).status_code == 404
    factory = session_factory(make_engine(api.settings.db_url))
    with factory.begin() as s:
        claim_run(s, run_id=uuid.UUID(student), worker="w", device="cpu")
    running = delete(api, f"/runs/{student}")
    assert running.status_code == 409 and "running" in error(running)["message"]
    api.post(f"/runs/{student}/cancel")
    with factory.begin() as s:
        from server.services import cancel_run

        cancel_run(s, run_id=uuid.UUID(student), attempt=1, actor="w")
    for run_id in (student, teacher, sample):
        assert delete(api, f"/runs/{run_id}").status_code == 204
        assert api.get(f"/runs/{run_id}").status_code == 404
    assert rows(api) == before_rows  # the pipeline row went with its last run
    assert files(api.settings.home) == before_files  # no run directory, nothing in the trash
    whole = api.post("/pipelines", json={"rounds": 2}).json()
    ran(api, whole["runs"][0])
    assert delete(api, f"/pipelines/{whole['id']}", key=api.bob).status_code == 404
    assert delete(api, f"/pipelines/{whole['id']}").status_code == 204
    assert rows(api) == before_rows and files(api.settings.home) == before_files


def test_the_retention_pass_reclaims_what_is_old_and_keeps_the_rest(api: Api) -> None:
    def submit() -> str:
        made = api.post("/runs", json={"kind": "stage1"})
        assert made.status_code == 201, made.text
        return str(made.json()["id"])

    old_failed, new_failed, old_ok, queued = submit(), submit(), submit(), submit()
    old_failed_dir = ran(api, old_failed, fail=True, resume=True)
    new_failed_dir = ran(api, new_failed, fail=True, resume=True)
    old_ok_dir = ran(api, old_ok, resume=True)
    queued_dir = api.settings.artifacts / "runs" / uuid.UUID(queued).hex
    queued_dir.mkdir(parents=True)
    orphan_old = api.settings.artifacts / "runs" / uuid.uuid4().hex
    orphan_new = api.settings.artifacts / "runs" / uuid.uuid4().hex
    for orphan in (orphan_old, orphan_new):
        (orphan / "x").mkdir(parents=True)
    leftover = api.settings.artifacts / ".trash" / "left-over"
    leftover.mkdir(parents=True)
    ago = utcnow() - timedelta(days=30)
    os.utime(orphan_old, (ago.timestamp(), ago.timestamp()))
    key = {"Idempotency-Key": "k1"}
    assert api.post("/runs", json={"kind": "sample"}, headers=key).status_code == 201
    factory = session_factory(make_engine(api.settings.db_url))
    with factory.begin() as s:  # the injected past: ended, or sent, 30 days ago
        old = [uuid.UUID(old_failed), uuid.UUID(old_ok)]
        s.execute(update(Run).where(Run.id.in_(old)).values(finished_at=ago))
        s.execute(update(IdempotencyKey).values(created_at=ago))
    state = api.client.app.state.erpd  # type: ignore[attr-defined]
    retention = Retention(
        api.settings.artifacts,
        failed=timedelta(days=14),
        resume=timedelta(days=1),
        idempotency=timedelta(hours=24),
    )
    reap(
        state.writes,
        state.reads,
        state.broker,
        timeout=timedelta(hours=1),
        republish_after=timedelta(hours=1),
        retention=retention,
    )
    assert not old_failed_dir.exists() and not orphan_old.exists() and not leftover.exists()
    assert (new_failed_dir / "resume").is_dir() and queued_dir.is_dir() and orphan_new.is_dir()
    assert not (old_ok_dir / "resume").exists() and (old_ok_dir / "batch").is_dir()
    assert api.get(f"/runs/{old_failed}/checkpoints").json() == []  # its files are gone
    assert len(api.get(f"/runs/{new_failed}/checkpoints").json()) == 1
    assert len(api.get(f"/runs/{old_ok}/checkpoints").json()) == 1  # a teacher is kept
    assert api.get(f"/runs/{old_failed}/metrics").json()["series"]  # its record stays
    assert list((api.settings.artifacts / ".trash").iterdir()) == []
    # the key expired: it may name a new request now
    again = api.post("/runs", json={"kind": "stage1"}, headers=key)
    assert again.status_code == 201 and "idempotent-replayed" not in again.headers
