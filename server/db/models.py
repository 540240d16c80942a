"""The run store's tables. Postgres is the source of truth for every run; the broker never is.

Ids are random UUIDs (they appear in URLs, so they must not be guessable or enumerable); every
timestamp is UTC; enums are stored as short strings with a CHECK constraint rather than native
Postgres enums, so adding a value later is a one-line migration on both backends.
"""

from __future__ import annotations

import enum
import uuid
from datetime import datetime
from typing import Any

from sqlalchemy import (
    BigInteger,
    CheckConstraint,
    Double,
    Enum,
    ForeignKey,
    Index,
    Integer,
    String,
    Text,
    UniqueConstraint,
)
from sqlalchemy.orm import Mapped, mapped_column, relationship

from server.db.base import Base, JSONType, utcnow

# SQLite only auto-increments an INTEGER PRIMARY KEY, never a BIGINT one.
BigIntPK = BigInteger().with_variant(Integer(), "sqlite")


class RunKind(enum.StrEnum):
    SAMPLE = "sample"
    STAGE1 = "stage1"
    STAGE2 = "stage2"


class RunStatus(enum.StrEnum):
    QUEUED = "queued"
    RUNNING = "running"
    SUCCEEDED = "succeeded"
    FAILED = "failed"
    CANCELLED = "cancelled"

    @property
    def finished(self) -> bool:
        return self in FINISHED


FINISHED = frozenset({RunStatus.SUCCEEDED, RunStatus.FAILED, RunStatus.CANCELLED})


class EventKind(enum.StrEnum):
    """What happened to a run; `from_status -> to_status` on the event says how its state moved."""

    CREATED = "created"
    CLAIMED = "claimed"
    SUCCEEDED = "succeeded"
    FAILED = "failed"
    CANCELLED = "cancelled"
    CANCEL_REQUESTED = "cancel_requested"
    REQUEUED = "requeued"
    RETRIED = "retried"


class CheckpointRole(enum.StrEnum):
    TEACHER = "teacher"
    STUDENT = "student"
    BASE = "base"
    RESUME = "resume"


class RegistryKind(enum.StrEnum):
    BUILTIN = "builtin"
    REGISTERED = "registered"
    UPLOADED = "uploaded"


def _enum(cls: type[enum.StrEnum], name: str) -> Enum:
    return Enum(
        cls,
        name=name,
        native_enum=False,
        create_constraint=True,
        length=16,
        values_callable=lambda e: [m.value for m in e],
        validate_strings=True,
    )


class ApiKey(Base):
    """An API key, stored as the sha256 of the secret.

    The secret is 32 random bytes, so a fast hash is enough (nothing to brute-force); `prefix` is
    the first characters of the secret, shown in listings so an operator can tell keys apart.
    """

    __tablename__ = "api_keys"

    id: Mapped[uuid.UUID] = mapped_column(primary_key=True, default=uuid.uuid4)
    name: Mapped[str] = mapped_column(String(100))
    key_hash: Mapped[str] = mapped_column(String(64), unique=True)
    prefix: Mapped[str] = mapped_column(String(16), index=True)
    created_at: Mapped[datetime] = mapped_column(default=utcnow)
    revoked_at: Mapped[datetime | None]


class _Registered:
    """Shared columns of the model and dataset registries.

    `location` is server-side only: a built-in name, or a directory an operator registered, or a
    file the server stored under a generated name. A request names the row, never the location.
    """

    id: Mapped[uuid.UUID] = mapped_column(primary_key=True, default=uuid.uuid4)
    name: Mapped[str] = mapped_column(String(100))
    kind: Mapped[RegistryKind] = mapped_column(_enum(RegistryKind, "registry_kind"))
    location: Mapped[str] = mapped_column(String(1024))
    meta: Mapped[dict[str, Any]] = mapped_column("metadata", JSONType, default=dict)
    created_at: Mapped[datetime] = mapped_column(default=utcnow)


class Model(_Registered, Base):
    __tablename__ = "models"
    __table_args__ = (UniqueConstraint("name"),)


class Dataset(_Registered, Base):
    """Uploaded datasets belong to the key that uploaded them, built-in and registered ones to
    all (owner NULL). Names are unique per owner, so a name another key chose is not taken for
    you (and cannot be probed); a shared name cannot be reused by anyone."""

    __tablename__ = "datasets"
    __table_args__ = (UniqueConstraint("owner_id", "name"),)

    owner_id: Mapped[uuid.UUID | None] = mapped_column(ForeignKey("api_keys.id"))
    # set when its owner deleted it while finished runs still name it: the row stays for their
    # lineage, under a freed name, and its file is gone (a dataset no run names is deleted)
    deleted_at: Mapped[datetime | None]


class IdempotencyKey(Base):
    """A POST's Idempotency-Key: the same key and body replay the stored response; the same key
    with another body is a conflict. Scoped per API key."""

    __tablename__ = "idempotency_keys"

    owner_id: Mapped[uuid.UUID] = mapped_column(
        ForeignKey("api_keys.id", ondelete="CASCADE"), primary_key=True
    )
    key: Mapped[str] = mapped_column(String(200), primary_key=True)
    request_sha256: Mapped[str] = mapped_column(String(64))
    status_code: Mapped[int]
    response: Mapped[dict[str, Any]] = mapped_column(JSONType)
    created_at: Mapped[datetime] = mapped_column(default=utcnow)


class Pipeline(Base):
    """The runs of one ERPD pipeline: per round, the teachers' stage-1 runs and one stage-2 run."""

    __tablename__ = "pipelines"

    id: Mapped[uuid.UUID] = mapped_column(primary_key=True, default=uuid.uuid4)
    name: Mapped[str] = mapped_column(String(200))
    owner_id: Mapped[uuid.UUID | None] = mapped_column(ForeignKey("api_keys.id"), index=True)
    model_id: Mapped[uuid.UUID] = mapped_column(ForeignKey("models.id"))
    dataset_id: Mapped[uuid.UUID] = mapped_column(ForeignKey("datasets.id"))
    rounds: Mapped[int] = mapped_column(default=1)
    teacher_objectives: Mapped[list[str]] = mapped_column(JSONType, default=list)
    stage2: Mapped[dict[str, Any]] = mapped_column(JSONType, default=dict)
    config: Mapped[dict[str, Any]] = mapped_column(JSONType, default=dict)
    created_at: Mapped[datetime] = mapped_column(default=utcnow)

    # the database deletes a pipeline's runs (ON DELETE CASCADE); the ORM must not null them out
    runs: Mapped[list[Run]] = relationship(
        back_populates="pipeline",
        order_by="Run.created_at",
        cascade="all, delete-orphan",
        passive_deletes=True,
    )

    __table_args__ = (CheckConstraint("rounds >= 1", name="rounds_positive"),)


class Run(Base):
    """One stage on one model. The state machine lives in server/services/runs.py."""

    __tablename__ = "runs"

    id: Mapped[uuid.UUID] = mapped_column(primary_key=True, default=uuid.uuid4)
    name: Mapped[str] = mapped_column(String(200))
    owner_id: Mapped[uuid.UUID | None] = mapped_column(ForeignKey("api_keys.id"))
    kind: Mapped[RunKind] = mapped_column(_enum(RunKind, "run_kind"))
    pipeline_id: Mapped[uuid.UUID | None] = mapped_column(
        ForeignKey("pipelines.id", ondelete="CASCADE")
    )
    round: Mapped[int] = mapped_column(default=0)
    status: Mapped[RunStatus] = mapped_column(
        _enum(RunStatus, "run_status"), default=RunStatus.QUEUED
    )
    # attempt counts claims; it is also the fencing token that stops a worker the reaper gave up on
    attempt: Mapped[int] = mapped_column(default=0)
    max_attempts: Mapped[int] = mapped_column(default=3)
    config: Mapped[dict[str, Any]] = mapped_column(JSONType)
    model_id: Mapped[uuid.UUID] = mapped_column(ForeignKey("models.id"))
    dataset_id: Mapped[uuid.UUID] = mapped_column(ForeignKey("datasets.id"))
    seed: Mapped[int | None]
    code_version: Mapped[str | None] = mapped_column(String(64))
    # the `sample` run whose fixed batch this stage trains on (teachers of a pipeline share one)
    batch_run_id: Mapped[uuid.UUID | None] = mapped_column(
        ForeignKey("runs.id", ondelete="CASCADE"), index=True
    )
    # pi_k of a later round: the previous round's stage-2 run (null = the registered model); its
    # student checkpoint's sha256 is pinned here when it succeeds, and the run waits until then
    base_run_id: Mapped[uuid.UUID | None] = mapped_column(
        ForeignKey("runs.id", ondelete="CASCADE"), index=True
    )
    base_sha256: Mapped[str | None] = mapped_column(String(64))
    # outbox: set once the run's message is on the broker; a queued, ready run without it is
    # republished by the reconciler (so a broker hiccup after the commit loses nothing)
    enqueued_at: Mapped[datetime | None]
    notify_url: Mapped[str | None] = mapped_column(String(2048))
    # the webhook's outbox: set once its `notify` message is on the broker
    notify_enqueued_at: Mapped[datetime | None]
    # pinned to the worker of GPU N (its message goes to queue `<ERPD_QUEUE>.N`); None = any
    gpu: Mapped[int | None]

    worker: Mapped[str | None] = mapped_column(String(255))
    device: Mapped[str | None] = mapped_column(String(64))
    heartbeat_at: Mapped[datetime | None]
    cancel_requested: Mapped[bool] = mapped_column(default=False)
    progress_step: Mapped[int | None]
    progress_total: Mapped[int | None]

    created_at: Mapped[datetime] = mapped_column(default=utcnow)
    started_at: Mapped[datetime | None]
    finished_at: Mapped[datetime | None]

    final_accuracy: Mapped[float | None] = mapped_column(Double)
    kl_spent: Mapped[float | None] = mapped_column(Double)
    entropy: Mapped[float | None] = mapped_column(Double)
    summary: Mapped[dict[str, Any]] = mapped_column(JSONType, default=dict)
    error: Mapped[str | None] = mapped_column(Text)

    pipeline: Mapped[Pipeline | None] = relationship(back_populates="runs")
    tag_rows: Mapped[list[RunTag]] = relationship(
        cascade="all, delete-orphan", lazy="selectin", order_by="RunTag.tag"
    )
    teachers: Mapped[list[RunTeacher]] = relationship(
        foreign_keys="RunTeacher.student_id",
        cascade="all, delete-orphan",
        lazy="selectin",
        order_by="RunTeacher.position",
    )

    __table_args__ = (
        Index("ix_runs_status_created_at", "status", "created_at"),
        Index("ix_runs_created_at_id", "created_at", "id"),
        Index("ix_runs_owner_id_created_at", "owner_id", "created_at"),
        Index("ix_runs_pipeline_id_round", "pipeline_id", "round"),
        CheckConstraint("attempt >= 0", name="attempt_nonnegative"),
        CheckConstraint("max_attempts >= 1", name="max_attempts_positive"),
        CheckConstraint("round >= 0", name="round_nonnegative"),
        CheckConstraint("gpu >= 0", name="gpu_nonnegative"),
    )

    @property
    def tags(self) -> list[str]:
        return [row.tag for row in self.tag_rows]


class RunTag(Base):
    __tablename__ = "run_tags"

    run_id: Mapped[uuid.UUID] = mapped_column(
        ForeignKey("runs.id", ondelete="CASCADE"), primary_key=True
    )
    tag: Mapped[str] = mapped_column(String(64), primary_key=True, index=True)


class RunTeacher(Base):
    """A stage-2 run's teacher. The checkpoint and its sha256 are pinned when the teacher succeeds;
    the worker refuses to distil from files whose hash no longer matches."""

    __tablename__ = "run_teachers"

    student_id: Mapped[uuid.UUID] = mapped_column(
        ForeignKey("runs.id", ondelete="CASCADE"), primary_key=True
    )
    # runs are deleted only with their pipeline (teachers and students together); no service
    # deletes a single run, which would have to refuse a teacher that still has students
    teacher_id: Mapped[uuid.UUID] = mapped_column(
        ForeignKey("runs.id", ondelete="CASCADE"), primary_key=True
    )
    position: Mapped[int]
    checkpoint_id: Mapped[uuid.UUID | None] = mapped_column(
        ForeignKey("checkpoints.id", ondelete="SET NULL")
    )
    sha256: Mapped[str | None] = mapped_column(String(64))

    __table_args__ = (
        UniqueConstraint("student_id", "position"),
        Index("ix_run_teachers_teacher_id", "teacher_id"),
    )


class RunEvent(Base):
    """The audit trail: one row per state transition (and per cancel request)."""

    __tablename__ = "run_events"

    id: Mapped[int] = mapped_column(BigIntPK, primary_key=True, autoincrement=True)
    run_id: Mapped[uuid.UUID] = mapped_column(ForeignKey("runs.id", ondelete="CASCADE"))
    at: Mapped[datetime] = mapped_column(default=utcnow)
    event: Mapped[EventKind] = mapped_column(_enum(EventKind, "event_kind"))
    from_status: Mapped[RunStatus | None] = mapped_column(_enum(RunStatus, "from_status"))
    to_status: Mapped[RunStatus] = mapped_column(_enum(RunStatus, "to_status"))
    attempt: Mapped[int]
    actor: Mapped[str] = mapped_column(String(255))
    reason: Mapped[str | None] = mapped_column(Text)

    __table_args__ = (Index("ix_run_events_run_id_id", "run_id", "id"),)


class MetricPoint(Base):
    """One value of one metric at one step. The primary key (run_id, name, step) is the unique
    key that makes a redelivered or resumed run overwrite its points instead of duplicating them,
    and the index of the hot read (one run's series by name, in step order). A non-finite value
    is stored as NULL, as the JSONL sink writes it (SQLite cannot store NaN)."""

    __tablename__ = "metric_points"

    run_id: Mapped[uuid.UUID] = mapped_column(
        ForeignKey("runs.id", ondelete="CASCADE"), primary_key=True
    )
    name: Mapped[str] = mapped_column(String(64), primary_key=True)
    step: Mapped[int] = mapped_column(BigInteger, primary_key=True)
    value: Mapped[float | None] = mapped_column(Double)
    wall_time: Mapped[float] = mapped_column(Double)


class Checkpoint(Base):
    """A committed checkpoint directory. `key` is built by the server from ids (never a request
    path); `sha256` is the manifest's hash, which pins the whole directory."""

    __tablename__ = "checkpoints"

    id: Mapped[uuid.UUID] = mapped_column(primary_key=True, default=uuid.uuid4)
    run_id: Mapped[uuid.UUID] = mapped_column(ForeignKey("runs.id", ondelete="CASCADE"))
    role: Mapped[CheckpointRole] = mapped_column(_enum(CheckpointRole, "checkpoint_role"))
    step: Mapped[int] = mapped_column(BigInteger)
    key: Mapped[str] = mapped_column(String(255), unique=True)
    bytes: Mapped[int] = mapped_column(BigInteger)
    sha256: Mapped[str] = mapped_column(String(64))
    manifest: Mapped[dict[str, Any]] = mapped_column(JSONType, default=dict)
    created_at: Mapped[datetime] = mapped_column(default=utcnow)

    __table_args__ = (
        UniqueConstraint("run_id", "role", "step"),
        CheckConstraint("bytes >= 0", name="bytes_nonnegative"),
    )
