"""Pipeline: base -> teacher(s) -> student for each round, side by side, and the paper's
headline comparison: the student's accuracy at a fraction of the teachers' KL."""

from __future__ import annotations

import uuid

import pandas as pd
import streamlit as st

from dashboard import charts, state
from erpd import metrics as M
from erpd_hub.client import ApiError

st.title("Pipeline")
api, url, key = state.connect()

try:
    recent = state.runs(url, key, (), 500)
except ApiError as exc:
    state.show_error(exc)
    st.stop()
pipelines: dict[str, str] = {}
for r in recent:
    if r["pipeline"] and r["pipeline"] not in pipelines:
        pipelines[r["pipeline"]] = r["name"].split("/")[0]
chosen = st.query_params.get("pipeline")
if chosen:
    try:
        chosen = str(uuid.UUID(chosen))  # any pipeline of this key, not only the latest ones
    except ValueError:
        st.error(f"`{chosen[:40]}` is not a pipeline id.")
        st.stop()
elif pipelines:
    chosen = st.selectbox(
        "Pipeline", list(pipelines), format_func=lambda p: f"{pipelines[p]} · {state.short(p)}"
    )
if not chosen:
    st.info("No pipelines yet. Submit one on the Submit page.")
    st.stop()
try:
    runs = sorted(
        state.runs(url, key, (("pipeline", chosen),), 500),
        key=lambda r: (r["round"], ["sample", "stage1", "stage2"].index(r["kind"]), r["name"]),
    )
except ApiError as exc:
    state.show_error(exc)
    st.stop()
if not runs:
    st.warning("This pipeline has no runs you can see.")
    st.stop()
st.caption(f"pipeline {chosen}")

ROLE = {"sample": "base", "stage1": "teacher", "stage2": "student"}
rows = []
for r in runs:
    accuracy = r["final_accuracy"]
    if r["kind"] == "sample":  # pi_k's reward on its own fixed batch: the round's starting point
        accuracy = r["summary"].get(M.REWARD_MEAN)
    rows.append(
        {
            "round": r["round"],
            "role": ROLE[r["kind"]],
            "run": r["name"].split("/")[-1],
            "status": state.STATUS_BADGE.get(r["status"], r["status"]),
            "accuracy": accuracy,
            "kl": r["kl_spent"],
            "detail": f"run?run={r['id']}",
        }
    )

st.plotly_chart(charts.rounds(rows), key="rounds_chart")
st.dataframe(
    pd.DataFrame(rows),
    hide_index=True,
    column_config={
        "accuracy": st.column_config.NumberColumn(
            format="%.3f", help="acc/eval; for the base, reward/mean on its fixed batch"
        ),
        "kl": st.column_config.NumberColumn("KL spent", format="%.4f"),
        "detail": st.column_config.LinkColumn(display_text="open"),
    },
)

st.subheader("Student vs teachers")
for k in sorted({r["round"] for r in rows}):
    teachers = [r for r in rows if r["round"] == k and r["role"] == "teacher" and r["kl"]]
    student = next((r for r in rows if r["round"] == k and r["role"] == "student"), None)
    if not teachers or student is None or student["kl"] is None or student["accuracy"] is None:
        st.caption(f"Round {k}: waiting for its teachers and student to finish.")
        continue
    best = max(teachers, key=lambda t: t["accuracy"] or 0.0)
    fraction = student["kl"] / best["kl"]
    st.markdown(
        f"**Round {k}:** the student reaches accuracy **{student['accuracy']:.3f}** "
        f"(best teacher {best['accuracy']:.3f}) at **{fraction:.1%}** of that teacher's KL "
        f"({student['kl']:.4f} vs {best['kl']:.4f})."
    )
