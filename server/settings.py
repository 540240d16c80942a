"""Server settings: one class, read from `ERPD_*` environment variables (and `.env`).

The embedded default needs no service: a SQLite file under the data dir (`ERPD_HOME`, default
`./.erpd`). Production sets `ERPD_DATABASE_URL=postgresql+psycopg://...`.
"""

from __future__ import annotations

from functools import lru_cache
from pathlib import Path

from pydantic import Field, field_validator
from pydantic_settings import BaseSettings, SettingsConfigDict


class Settings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="ERPD_", env_file=".env", extra="ignore")

    home: Path = Field(
        Path(".erpd"), description="Data dir: the embedded SQLite DB, artifacts, uploads."
    )
    database_url: str | None = Field(
        None,
        description="SQLAlchemy URL of the run store; unset = SQLite file `<home>/erpd.db`.",
    )

    @field_validator("database_url")
    @classmethod
    def _known_backend(cls, url: str | None) -> str | None:
        if url is not None and not url.startswith(("sqlite", "postgresql")):
            raise ValueError("must be a sqlite:/// or postgresql+psycopg:// URL")
        return url

    @property
    def db_url(self) -> str:
        if self.database_url:
            return self.database_url
        return f"sqlite:///{(self.home / 'erpd.db').resolve()}"


@lru_cache
def get_settings() -> Settings:
    return Settings()
