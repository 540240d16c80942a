"""Compare runs: overlaid curves of one metric, accuracy against KL spent with the Pareto front,
and the config keys that differ."""

from __future__ import annotations

import pandas as pd
import streamlit as st

from dashboard import analysis, charts, state
from dashboard.series import RunSeries
from erpd import metrics as M
from erpd_hub.client import ApiError

st.title("Compare runs")
api, url, key = state.connect()

try:
    recent = state.runs(url, key, (), 500)
    catalogue = state.catalogue(url, key)
except ApiError as exc:
    state.show_error(exc)
    st.stop()
by_id = {r["id"]: r for r in recent if r["kind"] != "sample"}
preset = [r for r in st.query_params.get_all("runs") if r in by_id]
picked = st.multiselect(
    "Runs",
    list(by_id),
    default=preset,
    format_func=lambda i: f"{by_id[i]['name']} · {by_id[i]['status']} · {state.short(i)}",
    key="picked",
)

finished = [by_id[i] for i in by_id if by_id[i]["kl_spent"] is not None]
scatter = [r for r in finished if r["final_accuracy"] is not None]
if scatter:
    points = [(r["kl_spent"], r["final_accuracy"]) for r in scatter]
    st.plotly_chart(charts.pareto(scatter, analysis.pareto_front(points)), key="pareto_chart")
else:
    st.caption("No finished run with accuracy and KL yet.")

if len(picked) < 2:
    st.info("Pick two or more runs to overlay their curves and diff their configs.")
    st.stop()

metric = st.selectbox(
    "Metric",
    [M.KL_EXACT, M.ENTROPY_TOKEN, M.ACC_EVAL, M.ACC_TRAIN_BATCH, M.LOSS, M.KL_K3, M.RATIO_P99],
    format_func=lambda n: f"{n} — {catalogue.get(n, {}).get('estimator', '')}",
)
overlay: dict[str, tuple[list[int], list[float | None]]] = {}
for run_id in picked:
    held = RunSeries()
    try:
        held.merge(api.metrics(run_id, names=[metric], max_points=state.SETTINGS.max_points))
    except ApiError as exc:
        state.show_error(exc)
        continue
    if metric in held.series:  # names may repeat across runs: the id keeps curves apart
        overlay[f"{by_id[run_id]['name']} · {state.short(run_id)}"] = held.series[metric]
st.plotly_chart(
    charts.lines(overlay, list(overlay), {}, title=metric, y_title=metric), key="overlay_chart"
)

try:
    diff = state.compare(url, key, tuple(picked))
except ApiError as exc:
    state.show_error(exc)
    st.stop()
st.subheader("Config differences")
if diff["config_diff"]:
    names = [r["name"] for r in diff["runs"]]
    table = pd.DataFrame(
        {k: [str(v) for v in values] for k, values in diff["config_diff"].items()}, index=names
    ).T
    st.dataframe(table)
else:
    st.caption("The configs are identical.")
