"""The REST API's run endpoints against real Postgres and Redis (no worker: the tests check the
messages on the broker's queue)."""

from __future__ import annotations

import uuid

from sqlalchemy.orm import Session

from server.db import CheckpointRole, make_engine, session_factory
from server.queue import RUN_STAGE_TASK
from server.services import claim_run, complete_run, register_checkpoint, revoke_api_key
from tests.integration.conftest import Api, Databases, make_api

STAGE1 = {"kind": "stage1", "config": {"stage": {"objective": "sapo", "epochs": 4}}}


def error(response) -> dict:  # type: ignore[no-untyped-def]
    body = response.json()
    assert set(body) == {"error"} and set(body["error"]) == {"code", "message", "field"}
    return body["error"]


def db(api: Api) -> Session:
    return session_factory(make_engine(api.settings.db_url))()


def test_health_needs_no_key_and_everything_else_does(api: Api) -> None:
    assert api.client.get("/api/v1/healthz").json() == {"status": "ok"}
    ready = api.client.get("/api/v1/readyz")
    assert ready.status_code == 200 and ready.json()["checks"] == {"database": "ok", "broker": "ok"}
    for path in ("/runs", "/models", "/datasets", "/metrics/catalogue"):
        missing = api.client.get(f"/api/v1{path}")
        assert missing.status_code == 401 and error(missing)["code"] == "unauthorized"
        wrong = api.client.get(f"/api/v1{path}", headers={"Authorization": "Bearer erpd_nope"})
        assert wrong.status_code == 401


def test_a_revoked_key_is_refused(api: Api) -> None:
    assert api.get("/runs").status_code == 200
    with db(api) as s, s.begin():
        from server.services import authenticate

        key = authenticate(s, secret=api.alice)
        assert key is not None
        revoke_api_key(s, key_id=key.id)
    assert api.get("/runs").status_code == 401


def test_submit_a_stage1_run_publishes_its_message_after_the_commit(api: Api) -> None:
    made = api.post("/runs", json=STAGE1 | {"tags": ["sweep"]})
    assert made.status_code == 201, made.text
    run = made.json()
    assert run["status"] == "queued" and run["kind"] == "stage1" and run["tags"] == ["sweep"]
    assert run["config"]["stage"]["objective"] == "sapo" and run["config"]["stage"]["lr"] == 1e-4
    assert api.published() == [(RUN_STAGE_TASK, [run["id"]])]
    assert api.get(f"/runs/{run['id']}").json()["id"] == run["id"]
    assert [e["event"] for e in api.get(f"/runs/{run['id']}/events").json()] == ["created"]


def test_another_keys_runs_are_not_found(api: Api) -> None:
    run = api.post("/runs", json=STAGE1).json()
    for path in (f"/runs/{run['id']}", f"/runs/{run['id']}/events", f"/runs/{run['id']}/metrics"):
        hidden = api.get(path, key=api.bob)
        assert hidden.status_code == 404 and error(hidden)["code"] == "not_found"
    assert api.post(f"/runs/{run['id']}/cancel", key=api.bob).status_code == 404
    assert api.get("/runs", key=api.bob).json() == {"items": [], "next": None}
    stolen = api.post("/runs", key=api.bob, json={"kind": "stage2", "teachers": [run["id"]]})
    assert stolen.status_code == 422 and error(stolen)["field"] == "teachers.0"
    stolen = api.post("/runs", key=api.bob, json=STAGE1 | {"base_run": run["id"]})
    assert stolen.status_code == 422 and error(stolen)["field"] == "base_run"


def test_a_run_pinned_to_a_gpu_goes_to_that_gpu_s_queue(api: Api) -> None:
    pinned = api.post("/runs", json=STAGE1 | {"gpu": 1}).json()
    assert pinned["gpu"] == 1
    assert api.published() == []
    assert api.published(f"{api.settings.queue}.1") == [(RUN_STAGE_TASK, [pinned["id"]])]
    refused = api.post("/runs", json=STAGE1 | {"gpu": -1})
    assert refused.status_code == 422 and error(refused)["field"] == "gpu"


def test_a_base_run_must_be_a_student_and_errors_name_the_api_field(api: Api) -> None:
    teacher = api.post("/runs", json=STAGE1).json()
    refused = api.post("/runs", json=STAGE1 | {"base_run": teacher["id"]})
    assert refused.status_code == 422
    assert error(refused)["field"] == "base_run"
    assert error(refused)["message"].startswith("base_run: ") and "not stage2" in str(
        error(refused)["message"]
    )
    sample = api.post("/runs", json={"kind": "sample"}).json()
    refused = api.post("/runs", json=STAGE1 | {"batch_run": teacher["id"]})
    assert error(refused)["field"] == "batch_run"
    student = api.post(
        "/runs", json={"kind": "stage2", "teachers": [teacher["id"]], "batch_run": sample["id"]}
    ).json()
    later = api.post("/runs", json={"kind": "sample", "base_run": student["id"]})
    assert later.status_code == 201, later.text
    assert later.json()["base_run"] == student["id"] and later.json()["base_sha256"] is None
    # it waits for its base: nothing published for it yet
    assert [args for _, args in api.published()] == [[teacher["id"]], [sample["id"]]]


def test_bad_input_is_a_422_naming_the_field_and_creates_nothing(api: Api) -> None:
    cases = [
        ({"kind": "stage1", "config": {"stage": {"lr": -1}}}, "config.stage.lr"),
        ({"kind": "stage1", "config": {"stage": {"epochs": 10**6}}}, "config.stage.epochs"),
        ({"kind": "stage1", "config": {"model": {"path": "/etc"}}}, "config.model"),
        ({"kind": "stage1", "model": "../../etc"}, "model"),
        ({"kind": "stage1", "model": "llama-70b"}, "model"),
        ({"kind": "stage1", "dataset": "nope"}, "dataset"),
        ({"kind": "stage1", "notify_url": "http://evil.example/hook"}, "notify_url"),
        ({"kind": "stage1", "trust_remote_code": True}, "trust_remote_code"),
        ({"kind": "stage2", "teachers": []}, "teachers"),
        ({"kind": "ppo"}, "kind"),
    ]
    for body, field in cases:
        bad = api.post("/runs", json=body)
        assert bad.status_code == 422, (body, bad.text)
        assert error(bad)["field"].endswith(field), (body, error(bad))
    nan = api.post(
        "/runs",
        content=b'{"kind": "stage1", "config": {"stage": {"lr": NaN}}}',
        headers={"Content-Type": "application/json"},
    )
    assert nan.status_code == 422 and "stage.lr" in error(nan)["field"]
    assert api.get("/runs").json()["items"] == [] and api.published() == []


def test_stage2_waits_for_its_teacher_before_it_is_published(api: Api) -> None:
    teacher = api.post("/runs", json=STAGE1).json()
    student = api.post("/runs", json={"kind": "stage2", "teachers": [teacher["id"]]}).json()
    assert student["teachers"] == [{"run": teacher["id"], "sha256": None}]
    assert [args for _, args in api.published()] == [[teacher["id"]]]


def test_a_pipeline_creates_its_round_and_publishes_only_the_sample_run(api: Api) -> None:
    body = {
        "teachers": [{"objective": "sapo", "epochs": 4}, {"objective": "ce", "epochs": 4}],
        "stage2": {"signal": "logratio"},
        "sample": {"num_prompts": 16},
        "tags": ["exp"],
    }
    made = api.post("/pipelines", json=body)
    assert made.status_code == 201, made.text
    pipeline = made.json()
    sample, t1, t2, student = pipeline["runs"]
    assert api.published() == [(RUN_STAGE_TASK, [sample])]
    listed = api.get("/runs", params={"pipeline": pipeline["id"]}).json()["items"]
    kinds = {r["id"]: (r["kind"], r["batch_run"]) for r in listed}
    assert kinds == {
        sample: ("sample", None),
        t1: ("stage1", sample),
        t2: ("stage1", sample),
        student: ("stage2", sample),
    }
    detail = api.get(f"/runs/{student}").json()
    assert [t["run"] for t in detail["teachers"]] == [t1, t2]
    assert detail["config"]["stage"]["signal"] == "logratio"
    assert detail["config"]["sample"]["num_prompts"] == 16


def test_idempotency_key_replays_and_refuses_another_body(api: Api) -> None:
    headers = {"Idempotency-Key": "submit-42"}
    first = api.post("/runs", json=STAGE1, headers=headers)
    again = api.post("/runs", json=STAGE1, headers=headers)
    assert first.status_code == again.status_code == 201
    assert again.json()["id"] == first.json()["id"]
    assert again.headers["Idempotent-Replayed"] == "true"
    assert len(api.get("/runs").json()["items"]) == 1 and len(api.published()) == 1
    other = api.post("/runs", json=STAGE1 | {"tags": ["x"]}, headers=headers)
    assert other.status_code == 422 and error(other)["code"] == "idempotency_conflict"
    # keys are per API key: bob's "submit-42" is his own
    assert api.post("/runs", key=api.bob, json=STAGE1, headers=headers).status_code == 201


def test_cancel_retry_and_patch(api: Api) -> None:
    run = api.post("/runs", json=STAGE1).json()
    cancelled = api.post(f"/runs/{run['id']}/cancel")
    assert cancelled.status_code == 200 and cancelled.json()["status"] == "cancelled"
    again = api.post(f"/runs/{run['id']}/cancel")
    assert again.status_code == 409 and error(again)["code"] == "conflict"
    retried = api.post(f"/runs/{run['id']}/retry")
    assert retried.status_code == 200 and retried.json()["status"] == "queued"
    assert [args for _, args in api.published()] == [[run["id"]], [run["id"]]]
    assert api.post(f"/runs/{run['id']}/retry").status_code == 409
    patched = api.patch(f"/runs/{run['id']}", json={"name": "lr sweep a", "tags": ["b", "a"]})
    assert patched.json()["name"] == "lr sweep a" and patched.json()["tags"] == ["a", "b"]
    assert api.patch(f"/runs/{run['id']}", json={"status": "succeeded"}).status_code == 422
    events = [e["event"] for e in api.get(f"/runs/{run['id']}/events").json()]
    assert events == ["created", "cancelled", "retried"]


def test_list_filters_and_pagination(api: Api) -> None:
    ids = [api.post("/runs", json=STAGE1 | {"tags": [f"t{i % 2}"]}).json()["id"] for i in range(5)]
    api.post(f"/runs/{ids[0]}/cancel")
    seen, cursor = [], None
    while True:
        page = api.get("/runs", params={"limit": 2} | ({"cursor": cursor} if cursor else {}))
        seen += [r["id"] for r in page.json()["items"]]
        cursor = page.json()["next"]
        if cursor is None:
            break
    assert seen == ids[::-1]
    assert [r["id"] for r in api.get("/runs", params={"tag": "t1"}).json()["items"]] == [
        ids[3],
        ids[1],
    ]
    cancelled = api.get("/runs", params={"status": ["cancelled"]}).json()["items"]
    assert [r["id"] for r in cancelled] == [ids[0]]
    bad = api.get("/runs", params={"cursor": "garbage"})
    assert bad.status_code == 422 and error(bad)["field"] == "cursor"
    assert api.get("/runs", params={"status": "exploded"}).status_code == 422


def test_registries(api: Api) -> None:
    assert [m["name"] for m in api.get("/models").json()] == ["tiny"]
    assert [d["name"] for d in api.get("/datasets").json()] == ["arithmetic"]


def test_body_limit_quota_and_broker_down(databases: Databases, tmp_path) -> None:  # type: ignore[no-untyped-def]
    small = make_api(
        databases, tmp_path, max_active_runs=2, max_body_bytes=2048, max_upload_bytes=4096
    )
    api = next(small)
    try:
        assert api.post("/runs", json=STAGE1).status_code == 201
        assert api.post("/runs", json=STAGE1).status_code == 201
        over = api.post("/runs", json=STAGE1)
        assert over.status_code == 429 and error(over)["code"] == "too_many_runs"
        big = api.post("/runs", json=STAGE1 | {"name": "x" * 4000})
        assert big.status_code == 413 and error(big)["code"] == "too_large"
        rows = b'{"prompt": "1+1=", "answer": 2}\n' * 300
        upload = api.post("/datasets", data={"name": "huge"}, files={"file": ("x", rows)})
        assert upload.status_code == 413 and not list((tmp_path / "datasets").glob("*"))
    finally:
        next(small, None)
    down = make_api(databases, tmp_path, broker_url="redis://127.0.0.1:1/0")
    api = next(down)
    try:  # the run is accepted and waits, queued, for the outbox to publish it
        accepted = api.post("/runs", json=STAGE1)
        assert accepted.status_code == 201 and accepted.json()["status"] == "queued"
        assert [r["id"] for r in api.get("/runs").json()["items"]] == [accepted.json()["id"]]
        not_ready = api.client.get("/api/v1/readyz")
        assert not_ready.status_code == 503 and not_ready.json()["checks"]["broker"] != "ok"
    finally:
        next(down, None)


def test_a_teacher_that_succeeds_shows_its_pinned_sha256(api: Api) -> None:
    teacher = api.post("/runs", json=STAGE1).json()
    student = api.post("/runs", json={"kind": "stage2", "teachers": [teacher["id"]]}).json()
    tid = uuid.UUID(teacher["id"])
    with db(api) as s, s.begin():
        claim_run(s, run_id=tid, worker="w", device="cpu")
        register_checkpoint(
            s,
            run_id=tid,
            attempt=1,
            role=CheckpointRole.TEACHER,
            step=4,
            key=f"runs/{tid.hex}/teacher-4",
            size=1,
            sha256="9" * 64,
            manifest={},
        )
        complete_run(s, run_id=tid, attempt=1, summary={}, actor="worker:w")
    detail = api.get(f"/runs/{student['id']}").json()
    assert detail["teachers"] == [{"run": teacher["id"], "sha256": "9" * 64}]


def test_upload_a_dataset_and_run_on_it(api: Api) -> None:
    rows = b'{"prompt": "2+2=", "answer": 4}\n\n{"prompt": "3*3=", "answer": "9"}\n'
    made = api.post("/datasets", data={"name": "my-math"}, files={"file": ("x.jsonl", rows)})
    assert made.status_code == 201, made.text
    assert made.json()["kind"] == "uploaded" and made.json()["metadata"]["rows"] == 2
    stored = list((api.settings.home / "datasets").iterdir())
    assert [p.suffix for p in stored] == [".jsonl"] and stored[0].read_bytes() == rows
    assert "my-math" in [d["name"] for d in api.get("/datasets").json()]
    assert "my-math" not in [d["name"] for d in api.get("/datasets", key=api.bob).json()]
    # two prompts: one held out for evaluation, one to train on
    small = {"task": {"eval_size": 1}, "sample": {"num_prompts": 1}}
    on_it = STAGE1 | {"dataset": "my-math", "config": STAGE1["config"] | small}
    assert api.post("/runs", json=on_it).status_code == 201
    refused = api.post("/runs", key=api.bob, json=on_it)
    assert refused.status_code == 422 and error(refused)["field"] == "dataset"


def test_bad_uploads_name_the_line_and_store_nothing(api: Api) -> None:
    cases = [
        (b'{"prompt": "a", "answer": 1}\n{"prompt": "b"}\n', 'line 2: missing "answer"'),
        (b'{"prompt": "a", "answer": 1}\nnot json\n', "line 2: not valid JSON"),
        (b"", "no rows"),
        (b'{"prompt": "a", "answer": NaN}\n', "finite"),
    ]
    for body, message in cases:
        bad = api.post("/datasets", data={"name": "bad"}, files={"file": ("x.jsonl", body)})
        assert bad.status_code == 422 and message in error(bad)["message"], bad.text
        assert error(bad)["field"] == "file" and "/" not in error(bad)["message"].split(":")[0]
    assert (
        api.post("/datasets", data={"name": "../x"}, files={"file": ("x", b"")}).status_code == 422
    )
    assert list((api.settings.home / "datasets").glob("*")) == []
    ok = b'{"prompt": "a", "answer": 1}\n{"prompt": "b", "answer": 2}\n'
    assert (
        api.post("/datasets", data={"name": "twice"}, files={"file": ("x", ok)}).status_code == 201
    )
    taken = api.post("/datasets", data={"name": "twice"}, files={"file": ("x", ok)})
    assert taken.status_code == 409 and error(taken)["field"] == "name"
    shared = api.post("/datasets", data={"name": "arithmetic"}, files={"file": ("x", ok)})
    assert shared.status_code == 409
    # another key's names are its own: bob may use "twice" too, and learns nothing about alice's
    mine = api.post("/datasets", key=api.bob, data={"name": "twice"}, files={"file": ("x", ok)})
    assert mine.status_code == 201
    assert len(list((api.settings.home / "datasets").glob("*.jsonl"))) == 2
    deep = b'{"prompt": ' + b"[" * 100_000 + b"]" * 100_000 + b', "answer": 1}\n'
    for body in (deep, b'{"prompt": "a", "answer": ' + b"9" * 5000 + b"}\n"):
        bad = api.post("/datasets", data={"name": "odd"}, files={"file": ("x", body)})
        assert bad.status_code == 422 and error(bad)["field"] == "file"


def test_prometheus_metrics(databases: Databases, tmp_path) -> None:  # type: ignore[no-untyped-def]
    apis = make_api(databases, tmp_path, operator_keys=["alice"])
    api = next(apis)
    try:
        _prometheus(api)
    finally:
        next(apis, None)


def _prometheus(api: Api) -> None:
    assert api.get("/metrics", key=api.bob).status_code == 404  # counts across users: operators
    run = api.post("/runs", json=STAGE1).json()
    api.get(f"/runs/{run['id']}")
    assert api.client.get("/api/v1/metrics").status_code == 401
    text = api.get("/metrics").text
    assert 'erpd_runs{status="queued"} 1.0' in text
    assert "erpd_queue_depth 1.0" in text
    assert 'erpd_http_requests_total{method="POST",route="/runs",status="201"} 1.0' in text
    assert str(run["id"]) not in text and 'route="/runs/{run_id}"' in text  # templates
    assert "erpd_http_request_seconds_bucket" in text


def test_the_outbox_publishes_runs_committed_without_a_message(api: Api) -> None:
    from fastapi.testclient import TestClient

    from server.db import Dataset, Model, RunKind
    from server.main import create_app
    from server.services import create_run

    with db(api) as s, s.begin():  # as if the API crashed between its commit and its publish
        model = s.query(Model).filter_by(name="tiny").one().id
        dataset = s.query(Dataset).filter_by(name="arithmetic").one().id
        run = create_run(s, kind=RunKind.SAMPLE, model_id=model, dataset_id=dataset, config={})
    assert api.published() == []
    with TestClient(create_app(api.settings)):
        pass
    assert api.published() == [(RUN_STAGE_TASK, [str(run.id)])]
    with TestClient(create_app(api.settings)):
        pass
    assert len(api.published()) == 1  # sent once: enqueued_at is recorded


def test_reconcilers_racing_publish_a_run_once_and_a_failed_publish_is_retried(
    api: Api,
) -> None:
    import threading

    from server.db import Dataset, Model, Run, RunKind, read_session_factory
    from server.queue import Broker
    from server.services import create_run
    from server.services.outbox import publish_pending

    with db(api) as s, s.begin():  # committed, never published
        model = s.query(Model).filter_by(name="tiny").one().id
        dataset = s.query(Dataset).filter_by(name="arithmetic").one().id
        run = create_run(s, kind=RunKind.SAMPLE, model_id=model, dataset_id=dataset, config={})
    engine = make_engine(api.settings.db_url)
    writes, reads = session_factory(engine), read_session_factory(engine)
    # a broker that cannot be reached: the publish fails and the run is left for the next round
    down = Broker("redis://127.0.0.1:1/0", api.settings.queue, api.settings.housekeeping_queue)
    assert publish_pending(writes, reads, down) == 0
    with db(api) as s:
        assert s.get(Run, run.id).enqueued_at is None  # type: ignore[union-attr]
    down.close()
    brokers = [
        Broker(api.settings.broker, api.settings.queue, api.settings.housekeeping_queue)
        for _ in range(6)
    ]
    start = threading.Barrier(len(brokers))

    def reconcile(broker: Broker) -> None:
        start.wait()
        publish_pending(writes, reads, broker)

    threads = [threading.Thread(target=reconcile, args=(b,)) for b in brokers]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert api.published() == [(RUN_STAGE_TASK, [str(run.id)])]  # once, not once per reconciler
    for broker in brokers:
        broker.close()
    engine.dispose()


def test_the_reaper_republishes_a_run_whose_message_was_lost(api: Api) -> None:
    from datetime import timedelta

    import redis

    from server.db import read_session_factory
    from server.queue import Broker
    from server.services.reaper import reap

    run = api.post("/runs", json=STAGE1).json()
    pinned = api.post("/runs", json=STAGE1 | {"gpu": 2}).json()
    engine = make_engine(api.settings.db_url)
    writes, reads = session_factory(engine), read_session_factory(engine)
    broker = Broker(api.settings.broker, api.settings.queue, api.settings.housekeeping_queue)

    def reap_once(after: timedelta) -> None:
        reap(writes, reads, broker, timeout=timedelta(minutes=2), republish_after=after)

    reap_once(timedelta(0))  # both messages are still on their queues: nothing is duplicated
    assert api.published() == [(RUN_STAGE_TASK, [run["id"]])]
    # a worker took the message and died before it claimed the run: the queue is empty
    conn = redis.Redis.from_url(api.settings.broker)
    conn.delete(api.settings.queue)
    reap_once(timedelta(minutes=5))  # published too recently to call it lost
    assert api.published() == []
    reap_once(timedelta(0))
    assert api.published() == [(RUN_STAGE_TASK, [run["id"]])]
    assert api.published(f"{api.settings.queue}.2") == [(RUN_STAGE_TASK, [pinned["id"]])]
    conn.close()
    broker.close()
    engine.dispose()


def test_a_database_outage_is_a_503_not_a_trace(api: Api) -> None:
    from server.db import make_engine, read_session_factory, session_factory

    state = api.client.app.state.erpd  # type: ignore[attr-defined]
    down = make_engine("postgresql+psycopg://postgres@127.0.0.1:1/none")
    saved = (state.engine, state.writes, state.reads)
    state.engine, state.writes, state.reads = (
        down,
        session_factory(down),
        read_session_factory(down),
    )
    try:
        for response in (api.get("/runs"), api.post("/runs", json=STAGE1)):
            assert response.status_code == 503 and error(response)["code"] == "unavailable"
            assert "Traceback" not in response.text and "psycopg" not in response.text
        assert api.client.get("/api/v1/readyz").json()["checks"]["database"].startswith("unre")
    finally:
        state.engine, state.writes, state.reads = saved
    assert api.published() == []  # nothing was sent for a run that was never stored


def test_crafted_input_is_refused_not_a_500(api: Api) -> None:
    run = api.post("/runs", json=STAGE1).json()
    cases = [
        api.get("/runs", params={"tag": "a\x00b"}),
        api.patch(f"/runs/{run['id']}", json={"name": "x\u0000y"}),
        api.post("/runs", json=STAGE1 | {"name": "a\u0000"}),
        api.post("/pipelines", json={"name": "p\u0000"}),
        api.get("/runs", params={"created_after": "0001-01-01T00:00:00+14:00"}),
        api.get("/runs", params={"created_before": "9999-12-31T23:59:59-14:00"}),
        api.post("/runs", json={"kind": "sample", "config": {"sample": {"seed": 10**4000}}}),
        api.post("/runs", json={"kind": "sample", "config": {"runtime": {"seed": -1}}}),
    ]
    for response in cases:
        assert response.status_code == 422, response.text
    broken = api.post("/runs", content=b'{"kind":', headers={"Content-Type": "application/json"})
    assert broken.status_code == 422 and error(broken)["field"] == "body"


def test_a_chunked_body_over_the_limit_is_413(databases: Databases, tmp_path) -> None:  # type: ignore[no-untyped-def]
    apis = make_api(databases, tmp_path, max_body_bytes=2048, max_upload_bytes=4096)
    api = next(apis)
    try:

        def chunks(n: int):  # type: ignore[no-untyped-def]  # no Content-Length: chunked
            yield b'{"kind": "stage1", "name": "'
            for _ in range(n):
                yield b"x" * 1000
            yield b'"}'

        big = api.post("/runs", content=chunks(10), headers={"Content-Type": "application/json"})
        assert big.status_code == 413 and error(big)["code"] == "too_large"
        assert api.get("/runs").json()["items"] == []
    finally:
        next(apis, None)


def test_another_keys_checkpoint_reads_like_a_missing_one(api: Api) -> None:
    from server.db import CheckpointRole

    run = api.post("/runs", json=STAGE1).json()
    rid = uuid.UUID(run["id"])
    with db(api) as s, s.begin():
        claim_run(s, run_id=rid, worker="w", device="cpu")
        ckpt = register_checkpoint(
            s,
            run_id=rid,
            attempt=1,
            role=CheckpointRole.TEACHER,
            step=1,
            key=f"runs/{rid.hex}/teacher-1",
            size=1,
            sha256="1" * 64,
            manifest={},
        )
    theirs = api.get(f"/checkpoints/{ckpt.id}", key=api.bob)
    nobody = api.get(f"/checkpoints/{uuid.uuid4()}", key=api.bob)
    assert theirs.status_code == nobody.status_code == 404
    assert run["id"] not in theirs.text
    assert error(theirs)["message"].replace(str(ckpt.id), "X") == error(nobody)["message"].replace(
        nobody.url.path.split("/")[-1], "X"
    )


def test_the_openapi_document_needs_a_key(api: Api) -> None:
    assert api.client.get("/api/v1/openapi.json").status_code == 401
    assert api.client.get("/api/v1/docs").status_code in (401, 404)
    spec = api.get("/openapi.json").json()
    assert "/api/v1/runs" in spec["paths"]


def test_a_pipeline_s_nested_errors_keep_their_whole_path(api: Api) -> None:
    """`stage2` and `sample` are fields of a pipeline, not the tag of a run's kind."""
    for body, field in (
        ({"stage2": {"top_frac": 0}}, "stage2.top_frac"),
        ({"sample": {"group_size": 1}}, "sample.group_size"),
        ({"teachers": [{"objective": "nope"}]}, "teachers.0.objective"),
    ):
        refused = api.post("/pipelines", json=body)
        assert refused.status_code == 422 and error(refused)["field"] == field, refused.text
    refused = api.post("/runs", json={"kind": "stage2", "teachers": []})
    assert error(refused)["field"] == "teachers"  # the run's kind tag is still dropped
