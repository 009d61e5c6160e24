"""Scheduler: GPU pools with registered workers, job priority and GPU count, team quotas.

Revision ID: 0002
Revises: 0001
Create Date: 2026-11-28

Reviewed by hand:
- ``jobs.gpus`` / ``jobs.priority`` copy ``spec.resources`` into columns the scheduler can
  sum and sort on; existing rows get the spec defaults (1 GPU, priority 0) — close enough
  for jobs that ran before pools existed, and a queued one is re-read from its spec on retry.
- ``jobs.admitted_at`` is NULL for existing queued jobs: the scheduler admits them again,
  and any message already in the broker is refused by the claim until then (harmless).
- Plain ``ADD COLUMN`` on SQLite, no table rebuild: rebuilding ``jobs`` with foreign keys
  on would cascade-delete its events. So the new CHECK constraints are created on Postgres
  only (``alembic check`` does not compare CHECKs; the service validates the same bounds).
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0002"
down_revision: str | None = "0001"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

TS = sa.DateTime(timezone=True)


def _postgres() -> bool:
    return op.get_bind().dialect.name == "postgresql"


def upgrade() -> None:
    op.add_column("jobs", sa.Column("gpus", sa.Integer(), server_default="1", nullable=False))
    op.add_column("jobs", sa.Column("priority", sa.Integer(), server_default="0", nullable=False))
    op.add_column("jobs", sa.Column("admitted_at", TS, nullable=True))
    op.create_index("ix_jobs_status_queue", "jobs", ["status", "queue"], unique=False)

    op.add_column("teams", sa.Column("weight", sa.Double(), server_default="1", nullable=False))
    op.add_column("teams", sa.Column("max_running_gpus", sa.Integer(), nullable=True))
    op.add_column("teams", sa.Column("max_queued_jobs", sa.Integer(), nullable=True))

    op.create_table(
        "workers",
        sa.Column("name", sa.String(length=255), nullable=False),
        sa.Column("pool", sa.String(length=64), nullable=False),
        sa.Column("gpus", sa.Integer(), nullable=False),
        sa.Column("hostname", sa.String(length=255), nullable=False),
        sa.Column("started_at", TS, nullable=False),
        sa.Column("heartbeat_at", TS, nullable=False),
        sa.CheckConstraint("gpus >= 0", name=op.f("ck_workers_gpus_nonnegative")),
        sa.PrimaryKeyConstraint("name", name=op.f("pk_workers")),
    )
    op.create_index(
        "ix_workers_pool_heartbeat_at", "workers", ["pool", "heartbeat_at"], unique=False
    )

    if _postgres():
        op.create_check_constraint(op.f("ck_jobs_gpus_nonnegative"), "jobs", "gpus >= 0")
        op.create_check_constraint(op.f("ck_teams_weight_positive"), "teams", "weight > 0")
        op.create_check_constraint(
            op.f("ck_teams_max_running_gpus_nonnegative"), "teams", "max_running_gpus >= 0"
        )
        op.create_check_constraint(
            op.f("ck_teams_max_queued_jobs_nonnegative"), "teams", "max_queued_jobs >= 0"
        )
        # Jobs queued before this revision: take their GPU count and priority from the spec.
        op.execute(
            "UPDATE jobs SET gpus = COALESCE((spec->'resources'->>'gpus')::int, 1), "
            "priority = COALESCE((spec->'resources'->>'priority')::int, 0)"
        )


def downgrade() -> None:
    if _postgres():
        for name, table in (
            ("ck_teams_max_queued_jobs_nonnegative", "teams"),
            ("ck_teams_max_running_gpus_nonnegative", "teams"),
            ("ck_teams_weight_positive", "teams"),
            ("ck_jobs_gpus_nonnegative", "jobs"),
        ):
            op.drop_constraint(op.f(name), table, type_="check")
    op.drop_index("ix_workers_pool_heartbeat_at", table_name="workers")
    op.drop_table("workers")
    op.drop_column("teams", "max_queued_jobs")
    op.drop_column("teams", "max_running_gpus")
    op.drop_column("teams", "weight")
    op.drop_index("ix_jobs_status_queue", table_name="jobs")
    op.drop_column("jobs", "admitted_at")
    op.drop_column("jobs", "priority")
    op.drop_column("jobs", "gpus")
