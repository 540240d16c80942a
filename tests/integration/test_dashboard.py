"""Every dashboard page through streamlit's AppTest, against the real API (uvicorn, Postgres,
Redis) holding a pipeline whose runs were driven through the service layer with metric series
shaped like ERPD's (KL rising towards its budget, entropy collapsing, accuracy rising)."""

from __future__ import annotations

import json
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from sqlalchemy.orm import Session, sessionmaker
from streamlit.testing.v1 import AppTest

from erpd import metrics as M
from server.db import CheckpointRole, RunKind, make_engine, session_factory
from server.services import Point, claim_run, complete_run, record_metrics, register_checkpoint
from tests.integration.conftest import Databases, Live, start_live

PAGES = Path(__file__).resolve().parents[2] / "dashboard" / "views"
STEPS = 60
COLLAPSE_FROM = 30  # entropy falls from here
BASE_ACC = 0.25  # the base as its teachers measure it at step 0


def series(kind: RunKind, scale: float) -> list[Point]:
    points = []
    for s in range(STEPS):
        entropy = 2.0 if s < COLLAPSE_FROM else max(0.05, 2.0 - 0.15 * (s - COLLAPSE_FROM))
        points += [
            Point(s, M.KL_EXACT, scale * 0.002 * s, 0.0),
            Point(s, M.KL_K3, scale * 0.0025 * s, 0.0),
            Point(s, M.KL_K1, scale * 0.0015 * s, 0.0),
            Point(s, M.ENTROPY_TOKEN, entropy, 0.0),
            Point(s, M.ACC_TRAIN_BATCH, min(1.0, 0.3 + 0.01 * s), 0.0),
            Point(s, M.LOSS, 1.0 / (1 + s), 0.0),
            Point(s, M.RATIO_P99, 1.0 + 0.01 * s, 0.0),
        ]
        if s % 10 == 9:
            points += [
                Point(s, M.ENTROPY_BATCH, entropy, 0.0),
                Point(s, M.ACC_EVAL, min(1.0, 0.3 + 0.008 * s), 0.0),
                Point(s, M.ACC_EVAL_SE, 0.01 + 0.0001 * s, 0.0),
            ]
        if kind is RunKind.STAGE2:
            points.append(Point(s, M.SELECTED_FRAC, 0.2, 0.0))
    if kind is RunKind.STAGE1:  # a teacher measures its round's base before its first update
        points.append(Point(0, M.ACC_EVAL, BASE_ACC, 0.0))
    return points


def finish(factory: sessionmaker[Session], run_id: uuid.UUID, kind: RunKind, scale: float) -> None:
    with factory.begin() as s:
        run = claim_run(s, run_id=run_id, worker="w", device="cpu")
        assert run is not None
    with factory.begin() as s:
        record_metrics(s, run_id=run_id, points=series(kind, scale), attempt=1)
        if kind is not RunKind.SAMPLE:
            role = CheckpointRole.TEACHER if kind is RunKind.STAGE1 else CheckpointRole.STUDENT
            for step in (20, STEPS - 1):
                register_checkpoint(
                    s,
                    run_id=run_id,
                    attempt=1,
                    role=role,
                    step=step,
                    key=f"runs/{run_id.hex}/ckpt-{step}",
                    size=1000,
                    sha256=f"{step:064x}",
                    manifest={},
                )
        summary = {M.REWARD_MEAN: 0.3}
        if kind is not RunKind.SAMPLE:
            summary = {
                M.ACC_EVAL: 0.3 + 0.1 * scale,
                M.KL_EXACT_BATCH: 0.002 * STEPS * scale,
                M.ENTROPY_BATCH: 0.05,
            }
        complete_run(s, run_id=run_id, attempt=1, summary=summary, actor="w")


@dataclass
class Seeded:
    live: Live
    pipeline: str
    sample: str
    teachers: list[str]
    student: str


@pytest.fixture(scope="module")
def seeded(databases: Databases, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Seeded]:
    servers = start_live(databases, tmp_path_factory.mktemp("dash"))
    live = next(servers)
    made = live.http.post(
        "/pipelines",
        json={
            "name": "exp",
            "teachers": [{"objective": "sapo"}, {"objective": "ce"}],
            "stage2": {"kl_budget": 0.1},
            "tags": ["dash"],
        },
    ).json()
    sample, t1, t2, student = made["runs"]
    factory = session_factory(make_engine(live.settings.db_url))
    # teachers spend much more KL than the student (the paper's headline shape)
    for run_id, kind, scale in (
        (sample, RunKind.SAMPLE, 1.0),
        (t1, RunKind.STAGE1, 10.0),
        (t2, RunKind.STAGE1, 6.0),
        (student, RunKind.STAGE2, 1.0),
    ):
        finish(factory, uuid.UUID(run_id), kind, scale)
    yield Seeded(live, made["id"], sample, [t1, t2], student)
    next(servers, None)


def page(seeded: Seeded, name: str, **query: str) -> AppTest:
    import streamlit as st

    st.cache_data.clear()  # the process-wide read cache would carry over from the last test
    at = AppTest.from_file(str(PAGES / f"{name}.py"), default_timeout=60)
    at.session_state["api_url"] = f"{seeded.live.base}/api/v1"
    at.session_state["api_key"] = seeded.live.secret
    for k, v in query.items():
        at.query_params[k] = v
    return at.run()


def no_errors(at: AppTest) -> None:
    assert not at.exception, [e.value for e in at.exception]
    assert not at.error, [e.value for e in at.error]


def test_runs_page_lists_runs_and_filters_them(seeded: Seeded) -> None:
    at = page(seeded, "runs")
    no_errors(at)
    at.text_input(key="f_tag").set_value("dash").run()  # the seeded pipeline's runs only
    table = at.dataframe[0].value
    assert len(table) == 4 and set(table["kind"]) == {"sample", "stage1", "stage2"}
    assert table["status"].str.contains("succeeded").all()
    at.multiselect(key="f_kind").set_value(["stage1"]).run()
    assert len(at.dataframe[0].value) == 2
    at.text_input(key="f_tag").set_value("nope").run()
    assert not at.dataframe and "No runs match" in at.info[0].value


def test_run_detail_draws_the_three_charts_with_their_annotations(seeded: Seeded) -> None:
    at = page(seeded, "run", run=seeded.student)
    no_errors(at)
    charts = at.get("plotly_chart")
    assert len(charts) >= 3
    titles = [s.value for s in at.subheader]
    assert {"KL budget", "Entropy collapse", "Accuracy", "Selected tokens"} <= set(titles)
    kl_help = next(s for s in at.subheader if s.value == "KL budget").help
    assert "kl/exact" in kl_help and "lower_is_better" in kl_help  # from /metrics/catalogue
    captions = " ".join(c.value for c in at.caption)
    # kl/exact = 0.002 s reaches the stage-2 budget of 0.1 at step 50
    assert "Budget 0.1 reached at step 50" in captions
    assert "Collapse detected at step" in captions
    collapse = int(captions.split("Collapse detected at step ")[1].split()[0])
    assert COLLAPSE_FROM < collapse < STEPS
    assert "last checkpoint before it: step 20" in captions
    assert len(at.get("download_button")) == 2
    links = [m.value for m in at.markdown] + [p.label for p in at.get("page_link")]
    lineage = " ".join(links)
    assert all(t[:8] in lineage for t in seeded.teachers) and "sha256" in lineage


def test_pipeline_page_shows_the_headline_comparison(seeded: Seeded) -> None:
    at = page(seeded, "pipeline", pipeline=seeded.pipeline)
    no_errors(at)
    assert len(at.get("plotly_chart")) == 1
    headline = " ".join(m.value for m in at.markdown)
    # student KL 0.12 vs the best teacher's (sapo, scale 10) 1.2: 10%
    assert "Round 0:" in headline and "**10.0%** of that teacher's KL" in headline


def test_pipeline_bars_are_one_metric_and_the_base_is_measured_like_the_rest(
    seeded: Seeded,
) -> None:
    at = page(seeded, "pipeline", pipeline=seeded.pipeline)
    no_errors(at)
    figure = json.loads(at.get("plotly_chart")[0].proto.spec)
    bars = next(trace for trace in figure["data"] if trace["type"] == "bar")
    table = at.dataframe[0].value
    base = table[table["role"] == "base"]
    # the base is greedy held-out accuracy at the first teacher's step 0, not its batch's
    # reward/mean (0.3), and sits at KL 0
    assert base["accuracy"].tolist() == [pytest.approx(BASE_ACC)]
    assert base["kl"].tolist() == [0.0]
    assert bars["y"] == pytest.approx(table["accuracy"].tolist())
    assert "acc/eval" in bars["name"] and "acc/eval" in figure["layout"]["yaxis"]["title"]["text"]


def test_compare_page_overlays_runs_and_diffs_their_configs(seeded: Seeded) -> None:
    at = page(seeded, "compare")
    no_errors(at)
    assert len(at.get("plotly_chart")) == 1  # the Pareto scatter needs no selection
    at.multiselect(key="picked").set_value(seeded.teachers).run()
    no_errors(at)
    assert len(at.get("plotly_chart")) == 2
    finals = at.dataframe[0].value  # each run's last eval point with its 95% half-width
    assert len(finals) == len(seeded.teachers)
    last = STEPS - 1  # the last eval point is at step 59: SE 0.0159
    assert finals["greedy"].tolist() == [pytest.approx(0.3 + 0.008 * last)] * len(finals)
    assert finals["greedy ±"].tolist() == [pytest.approx(1.96 * (0.01 + 0.0001 * last))] * len(
        finals
    )
    assert finals["avg@k"].isna().all()  # never measured: empty, not 0
    diff = at.dataframe[1].value
    assert "stage.objective" in diff.index


def test_submit_shows_a_422_inline_and_then_creates_the_pipeline(seeded: Seeded) -> None:
    at = page(seeded, "submit")
    no_errors(at)
    at.number_input(key="top_frac").set_value(0.0)  # the API requires > 0
    at.button[0].click().run()
    assert len(at.error) == 1 and "stage2.top_frac" in at.error[0].value
    before = len(seeded.live.http.get("/runs").json()["items"])
    at.number_input(key="top_frac").set_value(0.3)
    at.button[0].click().run()
    no_errors(at)
    assert "submitted: 3 runs" in at.success[0].value  # sample, one sapo teacher, student
    assert len(seeded.live.http.get("/runs").json()["items"]) == before + 3


def test_cancel_asks_for_confirmation_then_cancels(seeded: Seeded) -> None:
    queued = seeded.live.http.post("/runs", json={"kind": "sample", "name": "to-cancel"}).json()
    at = page(seeded, "runs")
    label = next(o for o in at.selectbox(key="action_run").options if "to-cancel" in o)
    at.selectbox(key="action_run").set_value(label).run()
    next(b for b in at.button if b.label == "Cancel run").click().run()
    assert "Cancel run to-cancel?" in at.warning[0].value
    assert seeded.live.http.get(f"/runs/{queued['id']}").json()["status"] == "queued"
    next(b for b in at.button if b.label == "Yes, cancel").click().run()
    no_errors(at)
    assert seeded.live.http.get(f"/runs/{queued['id']}").json()["status"] == "cancelled"


def test_a_queued_run_without_points_and_a_bad_id_are_shown_plainly(seeded: Seeded) -> None:
    queued = seeded.live.http.post("/runs", json={"kind": "stage1", "name": "waiting"}).json()
    at = page(seeded, "run", run=queued["id"])
    no_errors(at)
    assert "No checkpoint registered (yet)." in [c.value for c in at.caption]
    at = page(seeded, "run", run="../checkpoints")
    assert not at.exception and "is not a run id" in at.error[0].value
