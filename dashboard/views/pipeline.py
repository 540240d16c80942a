"""Pipeline: base -> teacher(s) -> student for each round, side by side, the paper's headline
comparison (the student's accuracy at a fraction of the teachers' KL) and, for a pipeline with
matched controls, the student against each with 95% intervals (GET /pipelines/{id})."""

from __future__ import annotations

import uuid
from typing import Any

import pandas as pd
import plotly.graph_objects as go
import streamlit as st

from dashboard import analysis, charts, state
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

try:
    detail: dict[str, Any] = api.get(f"/pipelines/{chosen}")
except ApiError as exc:
    state.show_error(exc)
    st.stop()
# roles as the pipeline planned them: a control is neither a teacher nor the student
planned = {
    run["id"]: f"control {run['control']}" if run["control"] else run["role"]
    for r in detail["by_round"]
    for run in r["runs"]
    if run["role"] != "sample"  # shown as the round's base
}


def base_accuracy(round_index: int) -> float | None:
    """The round's base (pi_k) measured like every other bar: greedy held-out accuracy, read
    from the round's first teacher at step 0, before its first update (None until logged)."""
    teacher = next((r for r in runs if r["round"] == round_index and r["kind"] == "stage1"), None)
    if teacher is None:
        return None
    try:
        return state.values_at(url, key, teacher["id"], (M.ACC_EVAL,), 0).get(M.ACC_EVAL)
    except ApiError:
        return None


ROLE = {"sample": "base", "stage1": "teacher", "stage2": "student"}
rows = []
for r in runs:
    base = r["kind"] == "sample"  # the round's pi_k, at KL 0 to itself
    rows.append(
        {
            "round": r["round"],
            "role": planned.get(r["id"], ROLE[r["kind"]]),
            "run": r["name"].split("/")[-1],
            "status": state.STATUS_BADGE.get(r["status"], r["status"]),
            "accuracy": base_accuracy(r["round"]) if base else r["final_accuracy"],
            "kl": 0.0 if base else r["kl_spent"],
            "detail": f"run?run={r['id']}",
        }
    )

st.plotly_chart(charts.rounds(rows), key="rounds_chart")
st.dataframe(
    pd.DataFrame(rows),
    hide_index=True,
    column_config={
        "accuracy": st.column_config.NumberColumn(
            format="%.3f",
            help="Greedy held-out accuracy (acc/eval) of every row; the base is measured by its "
            "round's first teacher at step 0, before any update",
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


def _accuracy_chart(k: int, arms: list[dict[str, Any]]) -> go.Figure:
    """Each arm's greedy and sampled accuracy, with 95% error bars (1.96 standard errors)."""
    fig = go.Figure()
    names = [a["name"] for a in arms]
    for label, key in (
        ("greedy (acc/eval)", "acc_eval"),
        ("sampled (acc/eval_sampled)", "acc_eval_sampled"),
    ):
        fig.add_trace(
            go.Bar(
                x=names,
                y=[a[key] for a in arms],
                name=label,
                error_y={
                    "type": "data",
                    "array": [analysis.Z95 * (a[f"{key}_se"] or 0.0) for a in arms],
                },
            )
        )
    fig.update_layout(
        title=f"Round {k}: accuracy of the student and each control (95% error bars)",
        yaxis_title="accuracy",
        barmode="group",
        height=380,
        legend={"orientation": "h", "y": -0.2},
    )
    return fig


def _difference_chart(k: int, comparisons: list[dict[str, Any]]) -> go.Figure:
    """Student minus each control with its 95% interval; the line at 0 is 'no difference'."""
    fig = go.Figure()
    for label, key, shift in (("greedy", "greedy", -0.1), ("sampled", "sampled", 0.1)):
        shown = [c for c in comparisons if c[key]["ci95"] is not None]
        fig.add_trace(
            go.Scatter(
                x=[i + shift for i, c in enumerate(comparisons) if c[key]["ci95"] is not None],
                y=[c[key]["diff"] for c in shown],
                mode="markers",
                name=f"{label}: student - control",
                marker={"size": 10},
                error_y={
                    "type": "data",
                    "symmetric": False,
                    "array": [c[key]["ci95"][1] - c[key]["diff"] for c in shown],
                    "arrayminus": [c[key]["diff"] - c[key]["ci95"][0] for c in shown],
                },
                text=[c[key]["verdict"] for c in shown],
                hovertemplate="%{y:+.3f} (%{text})<extra></extra>",
            )
        )
    fig.add_hline(y=0, line_dash="dash", line_color="gray")
    fig.update_layout(
        title=f"Round {k}: student minus control, 95% intervals",
        xaxis={
            "tickmode": "array",
            "tickvals": list(range(len(comparisons))),
            "ticktext": [c["control"] for c in comparisons],
        },
        yaxis_title="accuracy difference",
        height=380,
        legend={"orientation": "h", "y": -0.2},
    )
    return fig


if any(r["comparisons"] for r in detail["by_round"]):
    st.subheader("Student vs matched controls")
    st.caption(
        "Each arm is read at its final eval point (early_stop at its first eval point at or past "
        "the student's KL). Intervals: diff ± 1.96·sqrt(se_student² + se_control²), the "
        "evaluation-sampling error of one seed; both arms are scored on the same problems, so "
        "they are conservative. A verdict claims a direction only where the intervals show it."
    )
for r in detail["by_round"]:
    if not r["comparisons"]:
        continue
    st.plotly_chart(_accuracy_chart(r["round"], r["arms"]), key=f"arms_{r['round']}")
    st.plotly_chart(_difference_chart(r["round"], r["comparisons"]), key=f"diffs_{r['round']}")
    lines = []
    for c in r["comparisons"]:
        verdict = c["verdict"] or "not available yet"
        lines.append(f"- **{c['control']}**: {verdict} ({c['note']})")
    st.markdown(f"**Round {r['round']}**\n" + "\n".join(lines))
