"""Metric reads over the API: catalogue, downsampled series that keep extremes, comparison."""

from __future__ import annotations

import math
import uuid

from erpd import metrics as M
from server.db import make_engine, session_factory
from server.services import Point, record_metrics
from server.services.metrics import downsample
from tests.integration.conftest import Api

STAGE1 = {"kind": "stage1", "config": {"stage": {"epochs": 4}}}


def write_points(api: Api, run_id: str, points: list[Point]) -> None:
    engine = make_engine(api.settings.db_url)
    with session_factory(engine).begin() as s:
        record_metrics(s, run_id=uuid.UUID(run_id), points=points)
    engine.dispose()


def test_catalogue_lists_every_metric_with_its_meaning(api: Api) -> None:
    rows = {r["name"]: r for r in api.get("/metrics/catalogue").json()}
    assert set(rows) == set(M.CATALOGUE)
    assert rows[M.KL_K3]["direction"] == "lower_is_better" and "k3" in rows[M.KL_K3]["estimator"]


def test_series_are_downsampled_without_losing_a_collapse(api: Api) -> None:
    run = api.post("/runs", json=STAGE1).json()["id"]
    # a smooth entropy curve with one collapse at step 7,321 and a NaN loss at step 9,000
    points = [Point(s, M.ENTROPY_TOKEN, 1.0 + 0.1 * math.sin(s / 50), 0.0) for s in range(10_000)]
    points[7_321] = Point(7_321, M.ENTROPY_TOKEN, 0.001, 0.0)
    points += [Point(s, M.LOSS, math.nan if s == 9_000 else 1.0, 0.0) for s in range(10_000)]
    write_points(api, run, points)
    got = api.get(
        f"/runs/{run}/metrics", params={"names": f"{M.ENTROPY_TOKEN},{M.LOSS}", "max_points": 200}
    ).json()
    series = {s["name"]: s for s in got["series"]}
    entropy = series[M.ENTROPY_TOKEN]
    assert entropy["downsampled"] and len(entropy["steps"]) <= 202
    assert 7_321 in entropy["steps"] and min(entropy["values"]) == 0.001
    assert entropy["steps"][0] == 0 and entropy["steps"][-1] == 9_999
    assert entropy["steps"] == sorted(entropy["steps"])
    loss = series[M.LOSS]
    assert loss["values"][loss["steps"].index(9_000)] is None  # the non-finite point survives
    assert got["last_step"] == 9_999
    newer = api.get(f"/runs/{run}/metrics", params={"names": M.LOSS, "since_step": 9_990}).json()
    assert newer["series"][0]["steps"] == list(range(9_991, 10_000))
    default = api.get(f"/runs/{run}/metrics").json()
    assert {s["name"] for s in default["series"]} == {M.ENTROPY_TOKEN, M.LOSS}
    bad = api.get(f"/runs/{run}/metrics", params={"names": "kl/made_up"})
    assert bad.status_code == 422 and bad.json()["error"]["field"] == "names"


def test_downsample_keeps_bucket_extremes() -> None:
    points = [(i, float(i % 7)) for i in range(1_000)]
    kept, thinned = downsample(points, 50)
    assert thinned and len(kept) <= 50
    assert kept[0] == points[0] and kept[-1] == points[-1]
    assert {v for _, v in kept} >= {0.0, 6.0}
    assert downsample(points[:10], 50) == (points[:10], False)


def test_compare_reports_summaries_and_the_config_diff(api: Api) -> None:
    a = api.post("/runs", json=STAGE1).json()["id"]
    b = api.post("/runs", json={"kind": "stage1", "config": {"stage": {"epochs": 8, "lr": 2e-4}}})
    b = b.json()["id"]
    got = api.get("/compare", params={"runs": f"{a},{b}"}).json()
    assert [r["id"] for r in got["runs"]] == [a, b]
    assert got["config_diff"] == {"stage.epochs": [4, 8], "stage.lr": [1e-4, 2e-4]}
    assert api.get("/compare", params={"runs": a}).status_code == 422
    assert api.get("/compare", params={"runs": f"{a},nope"}).status_code == 422
    assert api.get("/compare", params={"runs": f"{a},{b}"}, key=api.bob).status_code == 404
