"""What the REST API needs: the outbox column, a stage's batch run, webhooks, idempotency keys,
dataset owners (and dataset names unique per owner).

Revision ID: 0002
Revises: 0001
Create Date: 2026-11-25

Column and constraint changes go through batch_alter_table: SQLite cannot ALTER a table to add a
foreign key, so Alembic rebuilds it there (on Postgres the same calls are plain ALTERs).
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op
from sqlalchemy.dialects import postgresql

revision: str = "0002"
down_revision: str | None = "0001"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

JSON = sa.JSON().with_variant(postgresql.JSONB(astext_type=sa.Text()), "postgresql")


def upgrade() -> None:
    op.create_table(
        "idempotency_keys",
        sa.Column("owner_id", sa.Uuid(), nullable=False),
        sa.Column("key", sa.String(length=200), nullable=False),
        sa.Column("request_sha256", sa.String(length=64), nullable=False),
        sa.Column("status_code", sa.Integer(), nullable=False),
        sa.Column("response", JSON, nullable=False),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.ForeignKeyConstraint(
            ["owner_id"],
            ["api_keys.id"],
            name=op.f("fk_idempotency_keys_owner_id_api_keys"),
            ondelete="CASCADE",
        ),
        sa.PrimaryKeyConstraint("owner_id", "key", name=op.f("pk_idempotency_keys")),
    )
    with op.batch_alter_table("datasets") as batch:
        batch.add_column(sa.Column("owner_id", sa.Uuid(), nullable=True))
        batch.create_foreign_key(
            op.f("fk_datasets_owner_id_api_keys"), "api_keys", ["owner_id"], ["id"]
        )
        # names become unique per owner: another key's upload does not take (or reveal) a name
        batch.drop_constraint(op.f("uq_datasets_name"), type_="unique")
        batch.create_unique_constraint(op.f("uq_datasets_owner_id_name"), ["owner_id", "name"])
    with op.batch_alter_table("runs") as batch:
        batch.add_column(sa.Column("batch_run_id", sa.Uuid(), nullable=True))
        batch.add_column(sa.Column("enqueued_at", sa.DateTime(timezone=True), nullable=True))
        batch.add_column(sa.Column("notify_url", sa.String(length=2048), nullable=True))
        batch.create_index(op.f("ix_runs_batch_run_id"), ["batch_run_id"], unique=False)
        batch.create_foreign_key(
            op.f("fk_runs_batch_run_id_runs"), "runs", ["batch_run_id"], ["id"], ondelete="CASCADE"
        )


def downgrade() -> None:
    with op.batch_alter_table("runs") as batch:
        batch.drop_constraint(op.f("fk_runs_batch_run_id_runs"), type_="foreignkey")
        batch.drop_index(op.f("ix_runs_batch_run_id"))
        batch.drop_column("notify_url")
        batch.drop_column("enqueued_at")
        batch.drop_column("batch_run_id")
    with op.batch_alter_table("datasets") as batch:
        batch.drop_constraint(op.f("uq_datasets_owner_id_name"), type_="unique")
        batch.create_unique_constraint(op.f("uq_datasets_name"), ["name"])
        batch.drop_constraint(op.f("fk_datasets_owner_id_api_keys"), type_="foreignkey")
        batch.drop_column("owner_id")
    op.drop_table("idempotency_keys")
