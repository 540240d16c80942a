"""Runs: every run of this key with its status, progress and headline numbers; filters; cancel
and retry (each asks for confirmation)."""

from __future__ import annotations

from datetime import UTC, datetime

import pandas as pd
import streamlit as st

from dashboard import state
from dashboard.analysis import action_outcome, eta_seconds
from erpd_hub.client import ApiError

st.title("Runs")
api, url, key = state.connect()

cols = st.columns([2, 2, 1.5, 2, 1])
status = cols[0].multiselect("Status", list(state.STATUS_BADGE), key="f_status")
kind = cols[1].multiselect("Kind", ["sample", "stage1", "stage2"], key="f_kind")
tag = cols[2].text_input("Tag", key="f_tag").strip()
pipeline = cols[3].text_input("Pipeline id", key="f_pipeline").strip()
limit = cols[4].selectbox("Show", [50, 200, 500], index=1, key="f_limit")

filters = (("status", tuple(status)), ("kind", tuple(kind)), ("tag", tag), ("pipeline", pipeline))
try:
    runs = state.runs(url, key, filters, limit)
    names = state.names_by_id(url, key)
except ApiError as exc:
    state.show_error(exc)
    st.stop()

if not runs:
    st.info("No runs match. Submit a pipeline on the Submit page.")
    st.stop()

now = datetime.now(UTC)


def progress(run: dict) -> str:
    p = run["progress"]
    if p["step"] is None or not p["total"]:
        return ""
    eta = eta_seconds(run["started_at"], p["step"], p["total"], now)
    left = f" · ETA {eta / 60:.1f} min" if eta is not None and run["status"] == "running" else ""
    return f"{p['step']}/{p['total']}{left}"


table = pd.DataFrame(
    {
        "status": [state.STATUS_BADGE.get(r["status"], r["status"]) for r in runs],
        "name": [r["name"] for r in runs],
        "kind": [r["kind"] for r in runs],
        "pipeline": [state.short(r["pipeline"]) for r in runs],
        "round": [r["round"] for r in runs],
        "model": [names.get(r["model"], state.short(r["model"])) for r in runs],
        "task": [names.get(r["dataset"], state.short(r["dataset"])) for r in runs],
        "progress": [progress(r) for r in runs],
        "accuracy": [r["final_accuracy"] for r in runs],
        "KL spent": [r["kl_spent"] for r in runs],
        "tags": [", ".join(r["tags"]) for r in runs],
        "detail": [f"run?run={r['id']}" for r in runs],
    }
)
st.dataframe(
    table,
    hide_index=True,
    column_config={
        "accuracy": st.column_config.NumberColumn(format="%.3f", help="acc/eval at the end"),
        "KL spent": st.column_config.NumberColumn(format="%.4f", help="kl/exact_batch at the end"),
        "detail": st.column_config.LinkColumn(display_text="open"),
    },
    key="runs_table",
)
st.caption(f"{len(runs)} runs, newest first.")

# --- actions: pick a run, then confirm ---------------------------------------------------------
st.subheader("Open, cancel or retry")
by_label = {f"{r['name']} · {r['status']} · {state.short(r['id'])}": r for r in runs}
label = st.selectbox("Run", list(by_label), key="action_run")
chosen = by_label[label]
state.link("run", f"Open {chosen['name']}", run=chosen["id"])
left, right = st.columns(2)
if left.button("Cancel run", disabled=chosen["status"] not in ("queued", "running")):
    st.session_state["pending"] = ("cancel", chosen["id"], chosen["name"])
if right.button("Retry run", disabled=chosen["status"] not in ("failed", "cancelled")):
    st.session_state["pending"] = ("retry", chosen["id"], chosen["name"])

pending = st.session_state.get("pending")
if pending:
    action, run_id, name = pending
    st.warning(f"{action.capitalize()} run {name}?")
    yes, no = st.columns(2)
    if yes.button(f"Yes, {action}", type="primary"):
        st.session_state.pop("pending")
        try:
            done = api.cancel(run_id) if action == "cancel" else api.retry(run_id)
        except ApiError as exc:
            state.show_error(exc)
        else:
            state.runs.clear()
            st.success(action_outcome(action, name, done))
    if no.button("No"):
        st.session_state.pop("pending")
        st.rerun()
