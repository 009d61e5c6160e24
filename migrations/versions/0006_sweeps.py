"""Sweeps: a sweep row per request and one row per cell, each cell an ordinary job.

Revision ID: 0006
Revises: 0005
Create Date: 2026-11-29

Reviewed by hand: two new tables, nothing existing is altered. A cell's job is a foreign key
(deleting a job deletes its cell); ``sweep_cells.job_id`` is unique, which is also the index
the job lifecycle's "is this job a sweep cell?" lookup uses.
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op
from sqlalchemy.dialects import postgresql

revision: str = "0006"
down_revision: str | None = "0005"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

TS = sa.DateTime(timezone=True)
JSON = sa.JSON().with_variant(postgresql.JSONB(), "postgresql")


def upgrade() -> None:
    op.create_table(
        "sweeps",
        sa.Column("id", sa.String(length=32), nullable=False),
        sa.Column("team_id", sa.String(length=32), nullable=False),
        sa.Column("name", sa.String(length=200), nullable=False),
        sa.Column("request", JSON, nullable=False),
        sa.Column("reference", sa.String(length=64), nullable=True),
        sa.Column("idempotency_key", sa.String(length=255), nullable=True),
        sa.Column("request_hash", sa.String(length=64), nullable=True),
        sa.Column("chosen", JSON, nullable=True),
        sa.Column("created_at", TS, nullable=False),
        sa.Column("cancel_requested_at", TS, nullable=True),
        sa.Column("final_started_at", TS, nullable=True),
        sa.Column("finished_at", TS, nullable=True),
        sa.ForeignKeyConstraint(
            ["team_id"], ["teams.id"], name=op.f("fk_sweeps_team_id_teams"), ondelete="CASCADE"
        ),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_sweeps")),
        sa.UniqueConstraint(
            "team_id", "idempotency_key", name=op.f("uq_sweeps_team_id_idempotency_key")
        ),
    )
    op.create_index("ix_sweeps_team_id_id", "sweeps", ["team_id", "id"], unique=False)
    op.create_table(
        "sweep_cells",
        sa.Column("sweep_id", sa.String(length=32), nullable=False),
        sa.Column("index", sa.Integer(), nullable=False),
        sa.Column("stage", sa.String(length=8), nullable=False),
        sa.Column("method", sa.String(length=64), nullable=False),
        sa.Column("config", sa.String(length=100), nullable=False),
        sa.Column("seed", sa.BigInteger(), nullable=False),
        sa.Column("overrides", JSON, nullable=False),
        sa.Column("job_id", sa.String(length=32), nullable=False),
        sa.CheckConstraint("stage IN ('tune', 'final')", name=op.f("ck_sweep_cells_stage")),
        sa.ForeignKeyConstraint(
            ["sweep_id"],
            ["sweeps.id"],
            name=op.f("fk_sweep_cells_sweep_id_sweeps"),
            ondelete="CASCADE",
        ),
        sa.ForeignKeyConstraint(
            ["job_id"], ["jobs.id"], name=op.f("fk_sweep_cells_job_id_jobs"), ondelete="CASCADE"
        ),
        sa.PrimaryKeyConstraint("sweep_id", "index", name=op.f("pk_sweep_cells")),
        sa.UniqueConstraint("job_id", name=op.f("uq_sweep_cells_job_id")),
    )


def downgrade() -> None:
    op.drop_table("sweep_cells")
    op.drop_index("ix_sweeps_team_id_id", table_name="sweeps")
    op.drop_table("sweeps")
