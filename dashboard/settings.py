"""Dashboard settings, from `ERPD_DASHBOARD_*` environment variables (the sidebar can override
the API URL and key for one browser session)."""

from __future__ import annotations

from pydantic import Field
from pydantic_settings import BaseSettings, SettingsConfigDict


class DashboardSettings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="ERPD_DASHBOARD_", env_file=".env", extra="ignore")

    api_url: str = Field(
        "http://127.0.0.1:8000/api/v1", description="The REST API the dashboard reads."
    )
    api_key: str | None = Field(None, description="API key; unset = asked for in the sidebar.")
    refresh_s: float = Field(
        3.0, gt=0, description="How often a running run's charts fetch new points."
    )
    cache_ttl_s: float = Field(2.0, ge=0, description="How long an API read is reused.")
    max_points: int = Field(
        2_000, ge=100, le=100_000, description="Points per series per chart (the API downsamples)."
    )
