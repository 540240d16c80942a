"""Run detail: live KL budget, entropy collapse and accuracy charts (a fragment polls only the
points written since its last read), the stage's diagnostics, and the run's config, lineage,
events and checkpoints."""

from __future__ import annotations

import uuid
from collections.abc import Callable

import streamlit as st

from dashboard import analysis, charts, state
from dashboard.series import RunSeries
from erpd import metrics as M
from erpd_hub.client import ApiError

api, url, key = state.connect()


def pick_run() -> str:
    """The run in the URL (`?run=<id>`), or one picked from the latest."""
    chosen = st.query_params.get("run")
    if chosen:
        try:
            return str(uuid.UUID(chosen))  # only an id ever reaches the API's path
        except ValueError:
            st.error(f"`{chosen[:40]}` is not a run id.")
            st.stop()
    recent = state.runs(url, key, (), 50)
    if not recent:
        st.info("No runs yet.")
        st.stop()
    labels = {f"{r['name']} · {r['status']} · {state.short(r['id'])}": r["id"] for r in recent}
    return str(labels[st.selectbox("Run", list(labels))])


run_id = pick_run()
try:
    run = api.run(run_id)
    catalogue = state.catalogue(url, key)
except ApiError as exc:
    state.show_error(exc)
    st.stop()

st.title(run["name"])


def header(now: dict) -> None:
    head = st.columns(5)
    head[0].metric("Status", now["status"])
    head[1].metric("Kind", f"{now['kind']} r{now['round']}")
    head[2].metric("Attempt", f"{now['attempt']}/{now['max_attempts']}")
    acc, kl = now["final_accuracy"], now["kl_spent"]
    head[3].metric("Accuracy", "–" if acc is None else f"{acc:.3f}")
    head[4].metric("KL spent", "–" if kl is None else f"{kl:.4f}")
    if now["error"]:
        st.error(now["error"])


LIVE = run["status"] in ("queued", "running")
STAGE = run["config"].get("stage", {})
KL = [M.KL_EXACT, M.KL_K3, M.KL_K1]
ENTROPY = [M.ENTROPY_BATCH, M.ENTROPY_TOKEN]
ACCURACY = [M.ACC_EVAL, M.ACC_TRAIN_BATCH]
RATIOS = [M.RATIO_P01, M.RATIO_P99, M.RATIO_CLIP_FRAC]
DRIFT = [M.DRIFT_CORRECT, M.DRIFT_INCORRECT]
CHARTED = [*KL, *ENTROPY, *ACCURACY, *RATIOS, *DRIFT, M.SELECTED_FRAC]


def about(names: list[str]) -> str:
    """A chart's tooltip: each metric's estimator and direction, from the API's catalogue."""
    rows = []
    for name in names:
        info = catalogue.get(name)
        if info:
            rows.append(f"**{name}**: {info['estimator']} ({info['direction']})")
    return "  \n".join(rows)


@st.fragment(run_every=state.SETTINGS.refresh_s if LIVE else None)
def live_charts() -> None:
    try:
        now = api.run(run_id) if LIVE else run
        checkpoints = api.checkpoints(run_id) if LIVE else CHECKPOINTS
    except ApiError as exc:
        state.show_error(exc)
        return
    if now["attempt"] != run["attempt"]:
        st.rerun()  # a new attempt rewrites steps: read its series afresh
    # per attempt: a resumed or retried run writes its steps again
    held: RunSeries = st.session_state.setdefault(f"series:{run_id}:{run['attempt']}", RunSeries())
    try:
        body = api.metrics(
            run_id, names=CHARTED, since_step=held.since(), max_points=state.SETTINGS.max_points
        )
    except ApiError as exc:
        state.show_error(exc)
        return
    held.merge(body)
    header(now)
    series = held.series
    p = now["progress"]
    if now["status"] == "running" and p["total"]:
        st.progress(min(1.0, (p["step"] or 0) / p["total"]), text=f"step {p['step']}/{p['total']}")
    st.caption(f"last step {held.last_step if held.last_step is not None else '–'}")

    left, middle, right = st.columns(3)
    with left:
        budget = STAGE.get("kl_budget")
        steps, values = series.get(M.KL_EXACT, ([], []))
        exhaustion = analysis.budget_exhaustion(
            steps, values, budget, running=now["status"] == "running"
        )
        st.subheader("KL budget", help=about(KL))
        st.plotly_chart(
            charts.kl_budget(series, KL, catalogue, budget=budget, exhaustion=exhaustion),
            key="kl_chart",
        )
        if budget is None:
            st.caption("No KL budget set for this stage.")
        elif exhaustion[0] is not None:
            verb = "reached" if exhaustion[1] else "would be exhausted"
            st.caption(f"Budget {budget:g} {verb} at step {exhaustion[0]}.")
    with middle:
        basis = (
            M.ENTROPY_BATCH
            if len(series.get(M.ENTROPY_BATCH, ([], []))[0]) >= 10
            else (M.ENTROPY_TOKEN)
        )
        collapse = analysis.collapse_point(*series.get(basis, ([], [])))
        healthy = analysis.last_healthy_checkpoint(checkpoints, collapse) if collapse else None
        st.subheader("Entropy collapse", help=about(ENTROPY))
        st.plotly_chart(
            charts.entropy(
                series,
                ENTROPY,
                catalogue,
                collapse=collapse,
                healthy=healthy["step"] if healthy else None,
            ),
            key="entropy_chart",
        )
        if collapse is not None:
            where = f"; last checkpoint before it: step {healthy['step']}" if healthy else ""
            st.caption(f"Collapse detected at step {collapse} ({basis}){where}.")
    with right:
        st.subheader("Accuracy", help=about(ACCURACY))
        st.plotly_chart(
            charts.lines(series, ACCURACY, catalogue, title="", y_title="accuracy"),
            key="acc_chart",
        )

    extra = [("Importance ratios", RATIOS), ("Log-prob drift", DRIFT)]
    if run["kind"] == "stage2":
        extra.append(("Selected tokens", [M.SELECTED_FRAC]))
    for column, (title, names) in zip(st.columns(len(extra)), extra, strict=True):
        with column:
            st.subheader(title, help=about(names))
            st.plotly_chart(
                charts.lines(series, names, catalogue, title="", y_title="value"),
                key=f"chart_{title}",
            )
    if LIVE and now["status"] not in ("queued", "running"):
        st.rerun()  # it just ended: draw the finished page once, and stop polling


try:
    CHECKPOINTS = api.checkpoints(run_id)
except ApiError as exc:
    state.show_error(exc)
    CHECKPOINTS = []
live_charts()

st.subheader("Lineage")
if run["pipeline"]:
    state.link("pipeline", f"pipeline {state.short(run['pipeline'])}", pipeline=run["pipeline"])
if run["base_run"]:
    state.link("run", f"base (pi_k): run {state.short(run['base_run'])}", run=run["base_run"])
if run["batch_run"]:
    state.link("run", f"fixed batch: run {state.short(run['batch_run'])}", run=run["batch_run"])
for t in run["teachers"]:
    pin = f"sha256 {t['sha256'][:16]}" if t["sha256"] else "not pinned yet"
    state.link("run", f"teacher: run {state.short(t['run'])} · {pin}", run=t["run"])
if not (run["pipeline"] or run["base_run"] or run["batch_run"] or run["teachers"]):
    st.caption("Trained from the registered model.")

st.subheader("Checkpoints")


def fetcher(checkpoint_id: str) -> Callable[[], bytes]:
    return lambda: api.download(checkpoint_id)  # fetched on click, not on page load


for ckpt in CHECKPOINTS:
    st.download_button(
        f"Download {ckpt['role']} · step {ckpt['step']} · {ckpt['bytes'] / 1e6:.1f} MB",
        data=fetcher(ckpt["id"]),
        file_name=f"{run['name'].replace('/', '_')}-{ckpt['role']}-{ckpt['step']}.tar",
        mime="application/x-tar",
        on_click="ignore",
        help=f"sha256 {ckpt['sha256']}",
        key=f"download_{ckpt['id']}",
    )
if not CHECKPOINTS:
    st.caption("No checkpoint registered (yet).")

with st.expander("Config"):
    st.json(run["config"])
with st.expander("Events"):
    try:
        st.dataframe(api.events(run_id), hide_index=True)
    except ApiError as exc:
        state.show_error(exc)
