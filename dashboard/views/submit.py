"""Submit a pipeline: the form posts to POST /pipelines; the API validates (the form does not
second-guess it), and a 422 is shown under the field it names."""

from __future__ import annotations

import typing

import streamlit as st

from dashboard import state
from erpd.config import Stage1Config, Stage2Config
from erpd_hub.client import ApiError

st.title("Submit a pipeline")
api, url, key = state.connect()

try:
    models, datasets = state.registry(url, key)
except ApiError as exc:
    state.show_error(exc)
    st.stop()

OBJECTIVES = list(typing.get_args(Stage1Config.model_fields["objective"].annotation))
SIGNALS = list(typing.get_args(Stage2Config.model_fields["signal"].annotation))
REGIONS = list(typing.get_args(Stage2Config.model_fields["region"].annotation))
defaults = Stage2Config()

with st.form("pipeline"):
    general = st.columns(4)
    name = general[0].text_input("Name", placeholder="optional")
    model = general[1].selectbox("Model", [m["name"] for m in models])
    dataset = general[2].selectbox("Task / dataset", [d["name"] for d in datasets])
    rounds = general[3].number_input("Rounds", value=1, step=1)
    errors_general = st.empty()

    st.markdown("**Fixed batch** (sampled once per round from pi_k)")
    sample = st.columns(2)
    num_prompts = sample[0].number_input("Prompts", value=128, step=1)
    group_size = sample[1].number_input("Responses per prompt", value=8, step=1)
    errors_sample = st.empty()

    st.markdown("**Stage 1: teachers**")
    teach = st.columns(2)
    objectives = teach[0].multiselect("Objectives (one teacher each)", OBJECTIVES, ["sapo"])
    teacher_epochs = teach[1].number_input("Epochs on the fixed batch", value=20, step=1)
    errors_teachers = st.empty()

    st.markdown("**Stage 2: distil into pi_k under a trust region**")
    distil = st.columns(5)
    signal = distil[0].selectbox("Signal", SIGNALS)
    region = distil[1].selectbox("Region", REGIONS)
    top_frac = distil[2].number_input(
        "Top fraction", value=defaults.top_frac, format="%.3f", key="top_frac"
    )
    kl_coef = distil[3].number_input("KL coefficient", value=defaults.kl_coef, format="%.4f")
    kl_budget = distil[4].number_input(
        "KL budget (0 = none)", value=defaults.kl_budget or 0.0, format="%.4f"
    )
    errors_stage2 = st.empty()
    tags = st.text_input("Tags (comma-separated)")
    errors_tags = st.empty()
    submitted = st.form_submit_button("Submit", type="primary")

if submitted:
    body = {
        "model": model,
        "dataset": dataset,
        "rounds": int(rounds),
        "sample": {"num_prompts": int(num_prompts), "group_size": int(group_size)},
        "teachers": [{"objective": o, "epochs": int(teacher_epochs)} for o in objectives],
        "stage2": {
            "signal": signal,
            "region": region,
            "top_frac": top_frac,
            "kl_coef": kl_coef,
            "kl_budget": kl_budget or None,
        },
        "tags": [t.strip() for t in tags.split(",") if t.strip()],
    }
    if name.strip():
        body["name"] = name.strip()
    try:
        made = api.submit_pipeline(body)
    except ApiError as exc:
        field = exc.field or ""
        place = {
            "sample": errors_sample,
            "teachers": errors_teachers,
            "stage2": errors_stage2,
            "tags": errors_tags,
        }.get(field.split(".")[0], errors_general)
        place.error(f"{exc.message}" + (f" (field `{field}`)" if field else ""), icon="⚠️")
    else:
        state.runs.clear()
        st.success(f"Pipeline {made['name']} submitted: {len(made['runs'])} runs.")
        state.link("pipeline", "Open the pipeline", pipeline=made["id"])
