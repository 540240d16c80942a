"""What every page shares: the API connection (settings, or the sidebar for this session) and
cached reads. Reads are cached for a couple of seconds, keyed by the connection, so a rerun of the
page (a click, a filter) does not call the API again."""

from __future__ import annotations

from typing import Any
from urllib.parse import urlencode

import streamlit as st
from streamlit.errors import StreamlitAPIException

from dashboard.settings import DashboardSettings
from erpd_hub.client import ApiClient, ApiError

SETTINGS = DashboardSettings()
TTL = SETTINGS.cache_ttl_s

STATUS_BADGE = {
    "queued": "⏳ queued",
    "running": "🔵 running",
    "succeeded": "🟢 succeeded",
    "failed": "🔴 failed",
    "cancelled": "⚪ cancelled",
}


def connection() -> tuple[str, str | None]:
    """The sidebar's URL and key for this session, if a key was typed there; else the configured
    ones. The configured key only ever goes to the configured URL (never to a URL typed by a
    visitor), and it is never sent to the browser."""
    typed = st.session_state.get("api_key")
    if typed:
        return st.session_state.get("api_url") or SETTINGS.api_url, typed
    return SETTINGS.api_url, SETTINGS.api_key


def link(page: str, label: str, **query: str) -> None:
    """A link to another page that stays in this tab (and session, with its sidebar key)."""
    try:
        st.page_link(f"views/{page}.py", label=label, query_params=query)
    except StreamlitAPIException:  # a page run on its own (AppTest): a plain link
        st.markdown(f"[{label}]({page}?{urlencode(query)})")


@st.cache_resource(show_spinner=False)
def _client(url: str, key: str) -> ApiClient:
    return ApiClient(url, key)


def connect() -> tuple[ApiClient, str, str]:
    """(client, API URL, key) for a page, or a message and a stopped page when no key is set."""
    url, key = connection()
    if not key:
        st.info("Enter an API key in the sidebar (or set ERPD_DASHBOARD_API_KEY).")
        st.stop()
    return _client(url, key), url, key


def show_error(exc: ApiError) -> None:
    where = f" (field `{exc.field}`)" if exc.field else ""
    st.error(f"{exc.message}{where}", icon="⚠️")


@st.cache_data(ttl=TTL, show_spinner=False)
def runs(url: str, key: str, filters: tuple[tuple[str, Any], ...], limit: int) -> list[dict]:
    return list(_client(url, key).all_runs(limit=limit, **dict(filters)))


@st.cache_data(ttl=TTL, show_spinner=False)
def run(url: str, key: str, run_id: str) -> dict[str, Any]:
    return _client(url, key).run(run_id)


@st.cache_data(ttl=TTL, show_spinner=False)
def values_at(
    url: str, key: str, run_id: str, names: tuple[str, ...], step: int
) -> dict[str, float]:
    return _client(url, key).values_at(run_id, names, step)


@st.cache_data(ttl=300, show_spinner=False)
def catalogue(url: str, key: str) -> dict[str, dict[str, Any]]:
    return _client(url, key).catalogue()


@st.cache_data(ttl=60, show_spinner=False)
def registry(url: str, key: str) -> tuple[list[dict], list[dict]]:
    c = _client(url, key)
    return c.models(), c.datasets()


@st.cache_data(ttl=TTL, show_spinner=False)
def compare(url: str, key: str, run_ids: tuple[str, ...]) -> dict[str, Any]:
    return _client(url, key).compare(list(run_ids))


def names_by_id(url: str, key: str) -> dict[str, str]:
    """Model and dataset names by id (runs carry ids)."""
    models, datasets = registry(url, key)
    return {m["id"]: m["name"] for m in [*models, *datasets]}


def short(run_id: str | None) -> str:
    return run_id[:8] if run_id else ""
