"""Metric reads over the API: catalogue, downsampled series that keep extremes, comparison."""

from __future__ import annotations

import math
import random
import uuid
from typing import cast

import pytest

from erpd import metrics as M
from server.db import make_engine, session_factory
from server.services import Point, record_metrics
from server.services.metrics import Series, downsample
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


def series(points: list[tuple[int, float | None]]) -> Series:
    return Series([s for s, _ in points], [v for _, v in points])


def test_downsample_keeps_bucket_extremes() -> None:
    points = series([(i, float(i % 7)) for i in range(1_000)])
    kept, thinned = downsample(points, 50)
    assert thinned and len(kept.steps) == len(kept.values) <= 50
    assert kept.steps[0] == 0 and kept.steps[-1] == 999 and kept.values[-1] == 999 % 7
    assert set(kept.values) >= {0.0, 6.0}
    short = Series(points.steps[:10], points.values[:10])
    assert downsample(short, 50) == (short, False)


def bucket_extremes(
    points: list[tuple[int, float | None]], max_points: int
) -> list[tuple[int, float | None]]:
    """The downsampling rule written plainly, one bucket at a time: the oracle."""
    inner = points[1:-1]
    size = math.ceil(len(inner) / max(1, (max_points - 2) // 2))
    kept = [points[0]]
    for start in range(0, len(inner), size):
        bucket = inner[start : start + size]
        finite = [p for p in bucket if p[1] is not None]
        chosen = set()
        if finite:
            chosen.add(min(finite, key=lambda p: cast(float, p[1])))
            chosen.add(max(finite, key=lambda p: cast(float, p[1])))
        chosen.update([p for p in bucket if p[1] is None][:1])
        kept.extend(sorted(chosen))
    return [*kept, points[-1]]


@pytest.mark.parametrize("seed", range(20))
def test_downsample_matches_the_plain_bucket_rule(seed: int) -> None:
    rng = random.Random(seed)
    n, max_points = rng.randint(60, 3_000), rng.randint(10, 50)
    # few distinct values (ties), missing points, runs of missing points
    points: list[tuple[int, float | None]] = [
        (step, None if rng.random() < 0.1 else float(rng.randint(-3, 3))) for step in range(n)
    ]
    for start in rng.sample(range(n), 3):
        points[start : start + 40] = [(s, None) for s, _ in points[start : start + 40]]
    kept, thinned = downsample(series(points), max_points)
    assert thinned and kept == series(bucket_extremes(points, max_points))


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
