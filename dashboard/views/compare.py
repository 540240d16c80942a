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
FINAL = [M.ACC_EVAL, M.ACC_EVAL_SE, M.ACC_EVAL_SAMPLED, M.ACC_EVAL_SAMPLED_SE]
overlay: dict[str, tuple[list[int], list[float | None]]] = {}
finals: dict[str, dict[str, float | None]] = {}
for run_id in picked:
    held = RunSeries()
    names = list(dict.fromkeys([metric, *FINAL]))
    try:
        held.merge(api.metrics(run_id, names=names, max_points=state.SETTINGS.max_points))
    except ApiError as exc:
        state.show_error(exc)
        continue
    label = f"{by_id[run_id]['name']} · {state.short(run_id)}"  # names may repeat across runs
    if metric in held.series:
        overlay[label] = held.series[metric]
    finals[label] = analysis.last_values(held.series, FINAL) | {
        "KL spent": by_id[run_id]["kl_spent"]
    }
st.plotly_chart(
    charts.lines(overlay, list(overlay), {}, title=metric, y_title=metric), key="overlay_chart"
)

st.subheader("Last eval point, with 95% intervals")
st.dataframe(analysis.interval_table(finals), key="finals_table")
st.caption(
    "± is 1.96 standard errors over the eval problems (greedy: 0/1 per problem; avg@k: the "
    "per-problem share of k samples): the noise of one measurement, not of the training seed. "
    "For a student against its matched controls on the same batch, with paired intervals, open "
    "its pipeline's page."
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
