"""HTTP details a client relies on: strict JSON types in request bodies, byte ranges as RFC 9110
has them, and a server-sent event stream that resumes from `Last-Event-ID` without a gap or a
repeat."""

from __future__ import annotations

import uuid
from pathlib import Path

import httpx
import pytest

from erpd import metrics as M
from server.db import CheckpointRole, make_engine, session_factory
from server.services import Point, claim_run, complete_run, record_metrics, register_checkpoint
from tests.integration.conftest import Api, Live
from tests.integration.test_api_stream import sse_events


def error(response: httpx.Response) -> dict[str, str]:
    body: dict[str, dict[str, str]] = response.json()
    return body["error"]


@pytest.mark.parametrize(
    ("path", "body", "field"),
    [
        ("/runs", {"kind": "stage1", "config": {"stage": {"epochs": True}}}, "config.stage.epochs"),
        ("/runs", {"kind": "stage1", "config": {"stage": {"epochs": "3"}}}, "config.stage.epochs"),
        ("/runs", {"kind": "sample", "max_attempts": "3"}, "max_attempts"),
        ("/runs", {"kind": "sample", "config": {"sample": {"top_p": "1"}}}, "config.sample.top_p"),
        ("/runs", {"kind": "sample", "gpu": False}, "gpu"),
        ("/pipelines", {"rounds": "2"}, "rounds"),
        ("/pipelines", {"sample": {"num_prompts": 8.0}}, "sample.num_prompts"),
        ("/pipelines", {"eval": {"sampled": 1}}, "eval.sampled"),
    ],
)
def test_json_types_are_strict_and_the_error_names_the_field(
    api: Api, path: str, body: dict[str, object], field: str
) -> None:
    refused = api.post(path, json=body)
    assert refused.status_code == 422, refused.text
    assert error(refused)["field"] == field and error(refused)["code"] == "invalid"
    assert api.get("/runs").json()["items"] == []  # nothing was created


def test_strict_bodies_still_take_what_json_means(api: Api) -> None:
    made = api.post(
        "/runs",
        json={"kind": "stage1", "config": {"stage": {"epochs": 3, "lr": 1}}, "gpu": 0},
    )
    assert made.status_code == 201, made.text  # an integer is a valid float; ids are strings
    assert made.json()["config"]["stage"]["lr"] == 1.0
    assert api.patch(f"/runs/{made.json()['id']}", json={"name": 3}).status_code == 422
    assert api.patch(f"/runs/{made.json()['id']}", json={"name": "ok"}).status_code == 200
    garbled = api.post("/runs", content=b'{"kind": "sample",', headers={"content-type": "x"})
    assert garbled.status_code == 422 and error(garbled)["field"] == "body"


@pytest.fixture
def stored_file(api: Api) -> tuple[str, bytes]:
    """A checkpoint with one known file in the artifact store: (its id, the file's bytes)."""
    run_id = uuid.UUID(api.post("/runs", json={"kind": "stage1"}).json()["id"])
    key = f"runs/{run_id.hex}/teacher-1"
    data = bytes(range(256)) * 40
    folder: Path = api.settings.artifacts / key
    folder.mkdir(parents=True)
    (folder / "model.safetensors").write_bytes(data)
    engine = make_engine(api.settings.db_url)
    with session_factory(engine).begin() as s:
        claim_run(s, run_id=run_id, worker="w", device="cpu")
        ckpt = register_checkpoint(
            s,
            run_id=run_id,
            attempt=1,
            role=CheckpointRole.TEACHER,
            step=1,
            key=key,
            size=len(data),
            sha256="a" * 64,
            manifest={"files": {"model.safetensors": "b" * 64}},
        )
    engine.dispose()
    return str(ckpt.id), data


@pytest.mark.parametrize(
    "header",
    ["bytes=5-2", "bytes=abc", "bytes=", "bytes=-", "items=0-3", "bytes 0-3", "bytes=0-1,4-5"],
)
def test_a_range_that_does_not_parse_is_ignored(
    api: Api, stored_file: tuple[str, bytes], header: str
) -> None:
    checkpoint, data = stored_file
    url = f"/api/v1/checkpoints/{checkpoint}/files/model.safetensors"
    whole = api.client.get(url, headers=api.headers() | {"Range": header})
    assert whole.status_code == 200 and whole.content == data
    assert "content-range" not in whole.headers


@pytest.mark.parametrize("header", ["bytes=10240-", "bytes=20000-30000", "bytes=-0"])
def test_an_unsatisfiable_range_is_416_with_the_size(
    api: Api, stored_file: tuple[str, bytes], header: str
) -> None:
    checkpoint, data = stored_file
    url = f"/api/v1/checkpoints/{checkpoint}/files/model.safetensors"
    refused = api.client.get(url, headers=api.headers() | {"Range": header})
    assert refused.status_code == 416, refused.text
    assert refused.headers["content-range"] == f"bytes */{len(data)}"
    assert error(refused)["code"] == "range_not_satisfiable"
    tail = api.client.get(url, headers=api.headers() | {"Range": "bytes=10000-99999"})
    assert tail.status_code == 206 and tail.content == data[10000:]
    assert tail.headers["content-range"] == f"bytes 10000-{len(data) - 1}/{len(data)}"


def _read_until(events, count: int) -> tuple[list[tuple[str, int]], str]:  # type: ignore[no-untyped-def]
    """(name, step) of the points of the next `count` metrics events, and the last event id."""
    seen: list[tuple[str, int]] = []
    last_id = ""
    while count:
        kind, body, event_id = next(events)
        last_id = event_id or last_id
        if kind == "metrics":
            seen += [(p["name"], p["step"]) for p in body["points"]]
            count -= 1
    return seen, last_id


def _events_with_ids(response: httpx.Response):  # type: ignore[no-untyped-def]
    """(event, JSON data, id) of each event; the client's parser (erpd_hub.client) drops ids."""
    import json

    event, data, ident = "message", [], None
    for line in response.iter_lines():
        if line.startswith("event:"):
            event = line.split(":", 1)[1].strip()
        elif line.startswith("data:"):
            data.append(line.split(":", 1)[1].strip())
        elif line.startswith("id:"):
            ident = line.split(":", 1)[1].strip()
        elif line == "" and data:
            yield event, json.loads("\n".join(data)), ident
            event, data, ident = "message", [], None


def test_a_stream_resumes_from_last_event_id_without_gaps_or_repeats(live: Live) -> None:
    run_id = uuid.UUID(live.http.post("/runs", json={"kind": "sample"}).json()["id"])
    factory = session_factory(make_engine(live.settings.db_url))
    with factory.begin() as s:
        claim_run(s, run_id=run_id, worker="w", device="cpu")
        record_metrics(s, run_id=run_id, points=[Point(1, M.LOSS, 0.5, 0.0)])
    written = [(M.LOSS, 1)]
    with live.http.stream("GET", f"/runs/{run_id}/stream") as response:
        events = _events_with_ids(response)
        first, last_id = _read_until(events, 1)
        # while the client is away: step 1's eval point lands late, then step 2's points
        with factory.begin() as s:
            record_metrics(
                s,
                run_id=run_id,
                points=[Point(1, M.ACC_EVAL, 0.25, 0.0), Point(2, M.LOSS, 0.4, 0.0)],
            )
        written += [(M.ACC_EVAL, 1), (M.LOSS, 2)]
    assert first == [(M.LOSS, 1)] and last_id == f"1:{M.LOSS}"
    with factory.begin() as s:
        record_metrics(s, run_id=run_id, points=[Point(3, M.LOSS, 0.3, 0.0)])
        complete_run(s, run_id=run_id, attempt=1, summary={}, actor="w")
    written.append((M.LOSS, 3))
    headers = {"Last-Event-ID": last_id}
    with live.http.stream("GET", f"/runs/{run_id}/stream", headers=headers) as response:
        rest = list(_events_with_ids(response))
    again = [
        (p["name"], p["step"])
        for kind, body, _ in rest
        if kind == "metrics"
        for p in body["points"]
    ]
    assert sorted(first + again) == sorted(written)  # every point once: no gap, no repeat
    assert all(ident for _, _, ident in rest) and rest[-1][0] == "end"
    bad = live.http.get(f"/runs/{run_id}/stream", headers={"Last-Event-ID": "x;y"})
    assert bad.status_code == 422 and error(bad)["field"] == "Last-Event-ID"


def test_the_stream_parser_of_the_client_still_reads_events_with_ids(live: Live) -> None:
    run_id = live.http.post("/runs", json={"kind": "sample"}).json()["id"]
    with live.http.stream("GET", f"/runs/{run_id}/stream") as response:
        kind, body = next(sse_events(response))
    assert kind == "status" and body["status"] == "queued"
