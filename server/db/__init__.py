"""The run store: typed SQLAlchemy 2 models, engines/sessions and Alembic migrations.

Imported by the server and the worker, never by `erpd/` (which knows nothing of SQL).
"""

from server.db.base import Base, utcnow
from server.db.models import (
    FINISHED,
    ApiKey,
    Checkpoint,
    CheckpointRole,
    Dataset,
    EventKind,
    IdempotencyKey,
    MetricPoint,
    Model,
    Pipeline,
    RegistryKind,
    Run,
    RunEvent,
    RunKind,
    RunStatus,
    RunTag,
    RunTeacher,
)
from server.db.session import (
    make_engine,
    ping,
    read_session_factory,
    session_factory,
    transaction,
)

__all__ = [
    "FINISHED",
    "ApiKey",
    "Base",
    "Checkpoint",
    "CheckpointRole",
    "Dataset",
    "EventKind",
    "IdempotencyKey",
    "MetricPoint",
    "Model",
    "Pipeline",
    "RegistryKind",
    "Run",
    "RunEvent",
    "RunKind",
    "RunStatus",
    "RunTag",
    "RunTeacher",
    "make_engine",
    "ping",
    "read_session_factory",
    "session_factory",
    "transaction",
    "utcnow",
]
