"""Server settings: one class, read from `ERPD_*` environment variables (and `.env`).

The embedded default needs no service: a SQLite file under the data dir (`ERPD_HOME`, default
`./.erpd`). Production sets `ERPD_DATABASE_URL=postgresql+psycopg://...`.
"""

from __future__ import annotations

from functools import lru_cache
from pathlib import Path

from pydantic import Field, SecretStr, field_validator
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

    broker_url: str | None = Field(
        None,
        description="Celery broker; unset = Celery's SQLAlchemy transport on "
        "`<home>/broker.db` (no service needed). Production: redis://host:6379/0.",
    )
    queue: str = Field("gpu", pattern=r"^[A-Za-z0-9_.-]{1,64}$", description="Queue of stage runs.")
    housekeeping_queue: str = Field(
        "cpu",
        pattern=r"^[A-Za-z0-9_.-]{1,64}$",
        description="Queue of housekeeping tasks (webhooks).",
    )
    stop_grace_s: float = Field(
        120.0,
        gt=0,
        description="How long `erpd-hub up` gives its processes to stop before killing them: a "
        "worker finishes its optimizer step, saves a resume point and requeues its run. Cover "
        "one step plus one save of your largest model (compose: the worker's "
        "`stop_grace_period`).",
    )
    host: str = Field("127.0.0.1", description="API bind address (loopback unless configured).")
    port: int = Field(8000, ge=1, le=65535, description="API port.")
    api_workers: int = Field(
        1,
        ge=1,
        le=64,
        description="API processes `erpd-hub serve` starts (uvicorn workers): one per core the "
        "API may use. With more than one, GET /metrics (Prometheus) counts one process's "
        "requests per scrape.",
    )
    max_body_bytes: int = Field(
        1 << 20, ge=1024, description="Largest JSON request body (413 above it)."
    )
    max_upload_bytes: int = Field(
        64 << 20, ge=1024, description="Largest dataset upload (413 above it)."
    )
    max_active_runs: int = Field(
        100, ge=1, description="Queued + running runs one API key may have (429 above it)."
    )
    webhook_hosts: list[str] = Field(
        default_factory=list,
        description="Hosts a run's notify_url may point at (JSON list); empty = no webhooks.",
    )
    webhook_secret: SecretStr | None = Field(
        None,
        description="Key that signs webhooks (Standard Webhooks: `whsec_` + base64 of 24-64 "
        "random bytes); unset = one generated once into `<home>/webhook-secret` (mode 0600).",
    )
    webhook_attempts: int = Field(
        8, ge=1, le=30, description="Deliveries of one webhook before it is given up."
    )
    webhook_backoff_s: float = Field(
        2.0,
        gt=0,
        le=3600,
        description="First retry delay of a webhook; doubled each attempt, with random jitter.",
    )
    webhook_backoff_max_s: float = Field(
        900.0, gt=0, le=86400, description="The longest wait between two webhook deliveries."
    )
    webhook_timeout_s: float = Field(
        10.0, gt=0, le=120, description="How long one webhook delivery waits for the receiver."
    )
    retention_failed_days: float = Field(
        14.0,
        ge=0,
        description="The reaper deletes the files (checkpoints, resume points, batch) of failed "
        "and cancelled runs that ended this long ago; their rows, events and metrics stay. "
        "0 = keep them for ever.",
    )
    retention_resume_days: float = Field(
        1.0,
        ge=0,
        description="The reaper deletes the resume points of runs that succeeded this long ago "
        "(a succeeded run never resumes). 0 = keep them for ever.",
    )
    idempotency_ttl_hours: float = Field(
        24.0,
        ge=0,
        description="How long an Idempotency-Key is remembered; after it, the key may be used "
        "for a new request. 0 = for ever.",
    )
    heartbeat_s: float = Field(5.0, gt=0, description="How often a running stage heartbeats.")
    worker_gpus: int = Field(
        1,
        ge=1,
        le=64,
        description="GPUs this worker owns (set by `erpd-hub worker --group`): the most "
        "runtime.gpus it launches a stage on.",
    )
    heartbeat_timeout_s: float = Field(
        120.0, gt=0, description="The reaper requeues a run whose heartbeat is this old."
    )
    republish_after_s: float = Field(
        300.0,
        gt=0,
        description="The reaper republishes a queued run published this long ago when its queue "
        "is empty (its message was lost, e.g. with a worker killed before it claimed the run).",
    )
    public_docs: bool = Field(
        False,
        description="Serve the OpenAPI document and /docs without a key (off: they need one too).",
    )
    operator_keys: list[str] = Field(
        default_factory=list,
        description="Names of API keys that may read /metrics (counts across all users).",
    )
    stream_poll_s: float = Field(
        0.5, gt=0, le=10, description="How often /stream looks for new points and statuses."
    )
    # every wait of the API on a dependency is bounded (docs/operations.md, "Bounded waits")
    broker_timeout_s: float = Field(
        2.0,
        gt=0,
        le=60,
        description="The API's broker calls (publish, readiness, queue depth): connect and "
        "socket read timeout.",
    )
    db_statement_timeout_s: float = Field(
        10.0,
        gt=0,
        le=600,
        description="The API's database statements: Postgres `statement_timeout`, SQLite busy "
        "timeout; a request over it gets 503.",
    )
    db_connect_timeout_s: float = Field(
        3.0, gt=0, le=60, description="The API's database connect timeout."
    )
    db_pool_timeout_s: float = Field(
        5.0,
        gt=0,
        le=60,
        description="How long an API request waits for a free database connection (503 after).",
    )
    readyz_timeout_s: float = Field(
        2.0, gt=0, le=30, description="/readyz: the most each dependency check may take."
    )
    outbox_interval_s: float = Field(
        5.0,
        gt=0,
        le=3600,
        description="How often the API publishes what its outbox holds (runs accepted while "
        "the broker was away) besides right after each submission.",
    )
    metric_read_slots: int = Field(
        2,
        ge=1,
        le=64,
        description="Metric series reads one API process serves at once; the others wait "
        "(503 after `db_statement_timeout_s`), so they never take every request thread.",
    )

    @field_validator("database_url")
    @classmethod
    def _known_backend(cls, url: str | None) -> str | None:
        if url is not None and not url.startswith(("sqlite", "postgresql")):
            raise ValueError("must be a sqlite:/// or postgresql+psycopg:// URL")
        return url

    @property
    def artifacts(self) -> Path:
        """Where checkpoints live: `<home>/artifacts/<key>`, the key built from ids."""
        return self.home / "artifacts"

    @property
    def broker(self) -> str:
        if self.broker_url:
            return self.broker_url
        return f"sqla+sqlite:///{(self.home / 'broker.db').resolve()}"

    @property
    def db_url(self) -> str:
        if self.database_url:
            return self.database_url
        return f"sqlite:///{(self.home / 'erpd.db').resolve()}"


@lru_cache
def get_settings() -> Settings:
    return Settings()
