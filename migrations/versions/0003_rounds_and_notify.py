"""Pipelines past round 0 and webhooks from workers: a run's base run (the previous round's
student, pinned by sha256 when it succeeds), the webhook outbox column, and a run's GPU pin.

Revision ID: 0003
Revises: 0002
Create Date: 2026-12-01
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0003"
down_revision: str | None = "0002"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    with op.batch_alter_table("runs") as batch:
        batch.add_column(sa.Column("base_run_id", sa.Uuid(), nullable=True))
        batch.add_column(sa.Column("base_sha256", sa.String(length=64), nullable=True))
        batch.add_column(sa.Column("notify_enqueued_at", sa.DateTime(timezone=True), nullable=True))
        batch.add_column(sa.Column("gpu", sa.Integer(), nullable=True))
        batch.create_check_constraint(op.f("ck_runs_gpu_nonnegative"), "gpu >= 0")
        batch.create_index(op.f("ix_runs_base_run_id"), ["base_run_id"], unique=False)
        batch.create_foreign_key(
            op.f("fk_runs_base_run_id_runs"), "runs", ["base_run_id"], ["id"], ondelete="CASCADE"
        )
    # runs that ended before webhooks had an outbox: theirs was sent (or never will be); without
    # this the first reconcile after the upgrade would re-send every historical webhook
    op.execute(
        "UPDATE runs SET notify_enqueued_at = finished_at "
        "WHERE status IN ('succeeded', 'failed', 'cancelled') AND notify_url IS NOT NULL"
    )


def downgrade() -> None:
    with op.batch_alter_table("runs") as batch:
        batch.drop_constraint(op.f("fk_runs_base_run_id_runs"), type_="foreignkey")
        batch.drop_index(op.f("ix_runs_base_run_id"))
        batch.drop_constraint(op.f("ck_runs_gpu_nonnegative"), type_="check")
        batch.drop_column("gpu")
        batch.drop_column("notify_enqueued_at")
        batch.drop_column("base_sha256")
        batch.drop_column("base_run_id")
