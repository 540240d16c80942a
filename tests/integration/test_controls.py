"""Matched controls for users: a pipeline that asks for `controls` runs them beside each round's
student on the same batch, and GET /pipelines/{id} compares the student with each (real
Postgres and Redis; the end-to-end test adds a real worker)."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml

from erpd.checkpoint import read_manifest
from tests.integration.conftest import Api, Databases, Live, make_api
from tests.integration.test_worker import Stack, register_model, start_live, with_reaper

ALL = ["advantage_region", "advantage_random", "placebo", "early_stop"]
BODY: dict[str, Any] = {
    "name": "ctl",
    "teachers": [{"objective": "sapo", "epochs": 4}, {"objective": "ce", "epochs": 3}],
    "stage2": {"signal": "logratio", "kl_budget": 0.08, "teacher_weights": [1.0, 2.0]},
    "sample": {"num_prompts": 16},
    "controls": ALL,
}


def error(response: Any) -> dict[str, Any]:
    return dict(response.json()["error"])


def test_controls_run_beside_the_student_on_the_same_batch(api: Api) -> None:
    made = api.post("/pipelines", json=BODY | {"rounds": 2})
    assert made.status_code == 201, made.text
    ids = made.json()["runs"]
    assert len(ids) == 2 * (1 + 2 + 1 + 4)
    runs = {
        r["id"]: r for r in api.get("/runs", params={"pipeline": made.json()["id"]}).json()["items"]
    }
    for k in range(2):
        sample, t1, t2, student, *controls = ids[k * 8 : (k + 1) * 8]
        named = {runs[c]["name"]: runs[c] for c in controls}
        assert set(named) == {f"ctl/r{k}/control-{c}" for c in ALL}
        assert runs[student]["name"] == f"ctl/r{k}/student"
        for run in named.values():
            assert run["batch_run"] == sample and run["round"] == k
            assert run["base_run"] == runs[student]["base_run"]  # the same pi_k
        region = named[f"ctl/r{k}/control-advantage_region"]
        assert region["kind"] == "stage2" and [t["run"] for t in region["teachers"]] == [t1, t2]
        assert region["config"]["stage"]["signal"] == "advantage"
        assert region["config"]["stage"]["kl_budget"] == 0.08
        placebo = named[f"ctl/r{k}/control-placebo"]
        assert placebo["config"]["stage"]["permute_delta"] is True and placebo["teachers"]
        rand = named[f"ctl/r{k}/control-advantage_random"]
        assert rand["kind"] == "stage2" and rand["teachers"] == []
        assert rand["config"]["stage"]["region"] == "random"
        assert rand["config"]["stage"]["teacher_weights"] is None
        early = named[f"ctl/r{k}/control-early_stop"]
        assert early["kind"] == "stage1" and early["teachers"] == []
        stage = early["config"]["stage"]
        assert stage["objective"] == "sapo" and stage["epochs"] == 4  # the first teacher's
        assert stage["lr"] == runs[student]["config"]["stage"]["lr"]  # stage 2's learning rate
        # past twice the student's budget: it can be read at whatever KL the student reached
        assert stage["kl_budget"] == 0.16 and max(stage["eval_at_kl"]) == 0.16
        assert min(stage["eval_at_kl"]) == pytest.approx(0.08 / 32)
    # the next round starts from the student, never from a control
    assert {runs[i]["base_run"] for i in ids[8:]} == {ids[3]}


def test_a_pipeline_without_controls_is_unchanged(api: Api) -> None:
    made = api.post("/pipelines", json={"sample": {"num_prompts": 16}})
    assert made.status_code == 201 and len(made.json()["runs"]) == 3
    detail = api.get(f"/pipelines/{made.json()['id']}").json()
    assert detail["controls"] == []
    [r0] = detail["by_round"]
    assert [r["role"] for r in r0["runs"]] == ["sample", "teacher", "student"]
    assert [a["name"] for a in r0["arms"]] == ["student"] and r0["comparisons"] == []


def test_bad_controls_are_refused_naming_the_field(api: Api) -> None:
    for controls, field in (
        (["nope"], "controls.0"),
        (["placebo", "nope"], "controls.1"),
        (["placebo", "placebo"], "controls"),
        ("placebo", "controls"),
    ):
        refused = api.post("/pipelines", json={"controls": controls})
        assert refused.status_code == 422, refused.text
        assert error(refused)["field"] == field, refused.text
    assert api.get("/runs").json()["items"] == []


def test_the_quota_counts_the_controls(databases: Databases, tmp_path: Path) -> None:
    small = make_api(databases, tmp_path, max_active_runs=6)
    api = next(small)
    try:
        # 1 sample + 1 teacher + 1 student = 3 fit; with 4 controls, 7 do not
        over = api.post("/pipelines", json={"controls": ALL})
        assert over.status_code == 429 and error(over)["code"] == "too_many_runs"
        assert api.get("/runs").json()["items"] == []
        fits = api.post(
            "/pipelines", json={"controls": ["placebo", "early_stop", "advantage_random"]}
        )
        assert fits.status_code == 201 and len(fits.json()["runs"]) == 6
    finally:
        next(small, None)


def test_the_summary_is_the_owner_s_and_shows_what_is_missing(api: Api) -> None:
    made = api.post("/pipelines", json=BODY).json()
    assert api.get(f"/pipelines/{made['id']}", key=api.bob).status_code == 404
    response = api.get(f"/pipelines/{made['id']}")
    assert response.status_code == 200, response.text
    detail = response.json()
    assert detail["name"] == "ctl" and detail["controls"] == ALL and detail["rounds"] == 1
    [r0] = detail["by_round"]
    roles = [(r["role"], r["control"]) for r in r0["runs"]]
    assert roles == [
        ("sample", None),
        ("teacher", None),
        ("teacher", None),
        ("student", None),
        *[("control", c) for c in ALL],
    ]
    assert [a["name"] for a in r0["arms"]] == ["student", *ALL]
    for arm in r0["arms"]:  # nothing ran: statuses, no numbers
        assert arm["status"] == "queued" and arm["acc_eval"] is None and arm["point"] == "queued"
    for c in r0["comparisons"]:
        assert c["verdict"] is None and c["greedy"]["ci95"] is None
    # renaming a control does not change what it is
    control = r0["runs"][-1]["id"]
    assert api.patch(f"/runs/{control}", json={"name": "renamed"}).status_code == 200
    again = api.get(f"/pipelines/{made['id']}").json()["by_round"][0]["runs"][-1]
    assert again["control"] == "early_stop" and again["name"] == "renamed"
    assert api.get("/pipelines/00000000-0000-0000-0000-000000000000").status_code == 404


def test_the_cli_submits_controls_and_shows_the_pipeline(live: Live, tmp_path: Path) -> None:
    exe = str(Path(sys.executable).with_name("erpd-hub"))
    env = os.environ | {"ERPD_API_URL": f"{live.base}/api/v1", "ERPD_API_KEY": live.secret}

    def cli(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run([exe, *args], env=env, capture_output=True, text=True, timeout=120)

    spec = tmp_path / "pipeline.yaml"
    spec.write_text("name: cli\nsample: {num_prompts: 8}\ncontrols: [placebo]\n")
    made = cli("submit", str(spec), "--control", "early_stop", "--control", "placebo")
    assert made.returncode == 0, made.stderr
    pipeline = made.stdout.split()[1]
    names = [line.split()[2] for line in made.stdout.splitlines()[1:]]
    assert names[3:] == ["cli/r0/control-placebo", "cli/r0/control-early_stop"]
    shown = cli("pipeline", pipeline)
    assert shown.returncode == 0, shown.stderr
    out = shown.stdout
    assert "controls placebo, early_stop" in out
    assert "control early_stop" in out and "queued" in out
    assert "student - placebo: not available" in out and "student - early_stop" in out
    as_json = json.loads(cli("pipeline", pipeline, "--json").stdout)
    assert as_json["id"] == pipeline and len(as_json["by_round"][0]["arms"]) == 3
    refused = cli("submit", str(spec), "--control", "nope")
    assert refused.returncode != 0 and "controls.1" in refused.stderr
    assert len(refused.stderr.strip().splitlines()) == 1
    missing = cli("pipeline", str(uuid.uuid4()))
    assert missing.returncode == 2 and "not found" in missing.stderr
    bad = cli("pipeline", "not-an-id")
    assert bad.returncode != 0 and len(bad.stderr.strip().splitlines()) == 1


# --- end to end, with a real worker -------------------------------------------------------------
# small, but a base right often enough that groups differ in reward: a base right on ~1% of
# problems gives every response a zero advantage, and no arm moves from pi_k at all
SHORT_BASE = {"target_acc": 0.25, "eval_size": 50}
TINY = {
    "model": "tiny-short",
    "sample": {"num_prompts": 32, "group_size": 8},
    # early_stop gets the first teacher's epochs at stage 2's learning rate and minibatch: 16
    # steps against the student's 8, so it spends the student's KL before it stops
    "teachers": [{"objective": "sapo", "epochs": 4, "eval_every_epochs": 4}],
    "stage2": {"epochs": 2, "minibatch_size": 64, "kl_budget": 0.05},
    "eval": {"size": 100, "pass_k": 4},
    "runtime": {"device": "cpu"},
    "controls": ALL,
}


@pytest.fixture(scope="module")
def stack(databases: Databases, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    servers = start_live(databases, tmp_path_factory.mktemp("controls"), heartbeat_s=1)
    live = next(servers)
    register_model(live.settings.db_url, "tiny-short", SHORT_BASE)
    yield from with_reaper(Stack(live))
    next(servers, None)


def finite(value: Any) -> bool:
    return isinstance(value, float | int) and math.isfinite(value)


@pytest.mark.slow
@pytest.mark.timeout(1500)  # the base's pretraining takes minutes on a loaded 2-core machine
def test_a_pipeline_with_every_control_runs_and_is_compared(stack: Stack) -> None:
    made = stack.live.http.post("/pipelines", json=TINY)
    assert made.status_code == 201, made.text
    ids = made.json()["runs"]
    for run_id in ids:
        assert stack.wait_until_finished(run_id) == "succeeded", run_id
    detail = stack.live.http.get(f"/pipelines/{made.json()['id']}").json()
    [r0] = detail["by_round"]
    arms = {a["name"]: a for a in r0["arms"]}
    assert set(arms) == {"student", *ALL}
    for arm in arms.values():
        assert arm["status"] == "succeeded" and arm["steps"] >= 1, arm
        for key in ("acc_eval", "acc_eval_se", "acc_eval_sampled", "acc_eval_sampled_se"):
            assert finite(arm[key]), (arm["name"], key, arm)
    student_kl = arms["student"]["kl_exact_batch"]
    assert finite(student_kl) and student_kl > 0
    early = arms["early_stop"]  # read where it first spent the student's KL
    assert early["kl_exact_batch"] >= student_kl and f"step {early['eval_step']}" in early["point"]
    for name in ("advantage_region", "advantage_random", "placebo"):  # their final eval point
        assert arms[name]["point"] == f"final eval point (step {arms[name]['eval_step']})"
    comparisons = {c["control"]: c for c in r0["comparisons"]}
    assert set(comparisons) == set(ALL)
    for c in comparisons.values():
        for which in ("greedy", "sampled"):
            d = c[which]
            low, high = d["ci95"]
            assert finite(d["diff"]) and low <= d["diff"] <= high
            assert d["verdict"] in ("student better", "control better", "no difference shown")
            assert (low > 0) == (d["verdict"] == "student better")
        assert c["verdict"] in ("student better", "control better", "no difference shown")
    # the dashboard's pipeline page draws both charts and names every control's verdict
    at = dashboard_page(stack, "pipeline", pipeline=made.json()["id"])
    assert not at.exception and not at.error, [*at.exception, *at.error]
    titles = [c.proto.spec for c in at.get("plotly_chart")]
    assert any("accuracy of the student and each control" in t for t in titles)
    assert any("student minus control, 95% intervals" in t for t in titles)
    shown = " ".join(m.value for m in at.markdown)
    for c in comparisons.values():
        assert f"**{c['control']}**: {c['verdict']}" in shown
    roles = set(at.dataframe[0].value["role"])
    assert {f"control {c}" for c in ALL} | {"student", "teacher", "base"} == roles


def dashboard_page(stack: Stack, name: str, **query: str) -> Any:
    from streamlit.testing.v1 import AppTest

    views = Path(__file__).resolve().parents[2] / "dashboard" / "views"
    at = AppTest.from_file(str(views / f"{name}.py"), default_timeout=60)
    at.session_state["api_url"] = f"{stack.live.base}/api/v1"
    at.session_state["api_key"] = stack.live.secret
    for k, v in query.items():
        at.query_params[k] = v
    return at.run()


# --- erpd pipeline, locally ---------------------------------------------------------------------
@pytest.mark.slow
@pytest.mark.timeout(1500)
def test_erpd_pipeline_adds_controls_to_a_finished_pipeline(tmp_path: Path) -> None:
    """The controls run beside the student (OUT/round-0/control-NAME/), and summary.json and the
    printed table compare them; added to a finished pipeline, only the controls train."""
    cfg = {k: v for k, v in TINY.items() if k not in ("model", "controls")}
    cfg["base"] = SHORT_BASE
    out = tmp_path / "out"

    def pipeline(controls: list[str]) -> subprocess.CompletedProcess[str]:
        config = tmp_path / "config.yaml"
        config.write_text(yaml.safe_dump(cfg | {"controls": controls}))
        proc = subprocess.run(
            [sys.executable, "-m", "erpd.cli", "pipeline", "--out", str(out), "-c", str(config)],
            capture_output=True,
            text=True,
            env={**os.environ, "COLUMNS": "200"},
            timeout=900,
        )
        assert proc.returncode == 0, proc.stderr[-3000:]
        return proc

    pipeline([])
    student = read_manifest(out / "round-0" / "student" / "checkpoint")["sha256"]
    assert json.loads((out / "summary.json").read_text())["controls"] == []
    printed = pipeline(ALL).stdout
    assert read_manifest(out / "round-0" / "student" / "checkpoint")["sha256"] == student
    summary = json.loads((out / "summary.json").read_text())
    controls = [r for r in summary["rows"] if r["role"] == "control"]
    assert [r["name"] for r in controls] == [f"round-0/control-{c}" for c in ALL]
    for c in ALL:
        assert (out / "round-0" / f"control-{c}" / "checkpoint" / "manifest.json").is_file()
    [table] = summary["controls"]
    arms = {a["name"]: a for a in table["arms"]}
    assert list(arms) == ["student", *ALL]
    for arm in arms.values():
        for key in ("acc_eval", "acc_eval_se", "acc_eval_sampled", "acc_eval_sampled_se"):
            assert finite(arm[key]), (arm["name"], key, arm)
    assert arms["early_stop"]["kl_exact_batch"] >= arms["student"]["kl_exact_batch"]
    for c in table["comparisons"]:
        low, high = c["greedy"]["ci95"]
        assert low <= c["greedy"]["diff"] <= high and c["verdict"] is not None
        assert f"student - {c['control']}: {c['verdict']}" in printed
