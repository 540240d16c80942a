"""Alembic environment: the models' metadata, run on Postgres or SQLite.

The engine comes from the caller (`server.db.migrate`) or, for the plain `alembic` command, from
`ERPD_DATABASE_URL` via server.settings. Batch mode lets later migrations alter SQLite tables.
"""

from __future__ import annotations

from typing import Any

from alembic import context
from sqlalchemy import Engine

from server.db import Base
from server.db.base import UTCDateTime
from server.db.session import make_engine
from server.settings import get_settings

config = context.config
target_metadata = Base.metadata


def render_item(type_: str, obj: Any, autogen_context: Any) -> str | bool:
    # migrations must not import app types: spell UTCDateTime as the plain column it stores
    if type_ == "type" and isinstance(obj, UTCDateTime):
        return "sa.DateTime(timezone=True)"
    return False


def run_migrations_online() -> None:
    engine: Engine = config.attributes.get("engine") or make_engine(get_settings().db_url)
    with engine.connect() as connection:
        sqlite = connection.dialect.name == "sqlite"
        if sqlite:
            # batch migrations rebuild a table (copy, DROP, rename); with foreign keys on, the
            # DROP would cascade-delete or refuse the child rows. The pragma only takes effect
            # outside a transaction, hence the raw connection (isolation_level None).
            raw = connection.connection.driver_connection
            assert raw is not None
            raw.execute("PRAGMA foreign_keys=OFF")
        context.configure(
            connection=connection,
            target_metadata=target_metadata,
            compare_type=True,
            render_as_batch=connection.dialect.name == "sqlite",
            render_item=render_item,
        )
        migrated = False
        try:
            with context.begin_transaction():
                context.run_migrations()
                if sqlite:
                    broken = connection.exec_driver_sql("PRAGMA foreign_key_check").fetchall()
                    if broken:
                        raise RuntimeError(f"migration left dangling foreign keys: {broken[:5]}")
            # Alembic leaves the commit to us when the connection had already begun (it has:
            # reading the version table autobegins); the pragma below is a no-op inside one
            if connection.in_transaction():
                connection.commit()
            migrated = True
        finally:
            if connection.in_transaction():  # the migration failed: keep nothing of it
                connection.rollback()
            if sqlite:
                raw.execute("PRAGMA foreign_keys=ON")
                # this connection goes back to the pool: it must hold the app's settings again
                # (checked only after a success: a failed migration's own error comes first)
                if migrated and raw.execute("PRAGMA foreign_keys").fetchone() != (1,):
                    raise RuntimeError("foreign keys stayed off after the migration")


if context.is_offline_mode():
    raise SystemExit("offline (--sql) migrations are not supported; run against a database")
run_migrations_online()
