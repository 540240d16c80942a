"""erpd-hub dashboard: the entry file only routes (`erpd-hub dashboard` runs it).

Pages are plain scripts under views/ that read the REST API through erpd_hub/client.py. Not
pages/: Streamlit serves a folder of that name by itself, without this file's layout and sidebar.
"""

from __future__ import annotations

import streamlit as st

from dashboard.state import SETTINGS

st.set_page_config(page_title="erpd-hub", page_icon="🧪", layout="wide")

with st.sidebar:
    st.text_input("API URL", value=SETTINGS.api_url, key="api_url")
    st.text_input(
        "API key",
        key="api_key",
        type="password",
        placeholder="configured on the server" if SETTINGS.api_key else "required",
        help="An erpd-hub key (`erpd-hub create-key NAME`), kept for this browser session. "
        "Empty: the server's configured key, for the configured API URL only.",
    )

navigation = st.navigation(
    [
        st.Page("views/runs.py", title="Runs", icon="📋", url_path="runs", default=True),
        st.Page("views/run.py", title="Run detail", icon="📈", url_path="run"),
        st.Page("views/pipeline.py", title="Pipeline", icon="🔁", url_path="pipeline"),
        st.Page("views/compare.py", title="Compare", icon="⚖️", url_path="compare"),
        st.Page("views/submit.py", title="Submit", icon="🚀", url_path="submit"),
    ]
)
navigation.run()
