"""Downstream evaluation: teacher scores stored once per key, and two job columns.

Revision ID: 0008
Revises: 0006
Create Date: 2026-12-04

Reviewed by hand: one new table (`teacher_scores`, unique per team and key) and two nullable
columns on `jobs` (`teacher_digest`, indexed for the leaderboard; `evaluation_error`); nothing
existing is altered.
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op
from sqlalchemy.dialects import postgresql

revision: str = "0008"
down_revision: str | None = "0006"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

TS = sa.DateTime(timezone=True)
JSON = sa.JSON().with_variant(postgresql.JSONB(), "postgresql")


def upgrade() -> None:
    with op.batch_alter_table("jobs") as batch:
        batch.add_column(sa.Column("teacher_digest", sa.String(length=64), nullable=True))
        batch.add_column(sa.Column("evaluation_error", JSON, nullable=True))
    op.create_index(op.f("ix_jobs_teacher_digest"), "jobs", ["teacher_digest"], unique=False)
    op.create_table(
        "teacher_scores",
        sa.Column("id", sa.Integer(), autoincrement=True, nullable=False),
        sa.Column("team_id", sa.String(length=32), nullable=False),
        sa.Column("key", sa.String(length=64), nullable=False),
        sa.Column("teacher_digest", sa.String(length=64), nullable=False),
        sa.Column("scores", JSON, nullable=False),
        sa.Column("meta", JSON, nullable=False),
        sa.Column("computed_by_job_id", sa.String(length=32), nullable=True),
        sa.Column("created_at", TS, nullable=False),
        sa.ForeignKeyConstraint(
            ["team_id"],
            ["teams.id"],
            name=op.f("fk_teacher_scores_team_id_teams"),
            ondelete="CASCADE",
        ),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_teacher_scores")),
        sa.UniqueConstraint("team_id", "key", name=op.f("uq_teacher_scores_team_id_key")),
    )
    op.create_index(
        "ix_teacher_scores_team_id_teacher_digest",
        "teacher_scores",
        ["team_id", "teacher_digest"],
        unique=False,
    )


def downgrade() -> None:
    op.drop_index("ix_teacher_scores_team_id_teacher_digest", table_name="teacher_scores")
    op.drop_table("teacher_scores")
    op.drop_index(op.f("ix_jobs_teacher_digest"), table_name="jobs")
    with op.batch_alter_table("jobs") as batch:
        batch.drop_column("evaluation_error")
        batch.drop_column("teacher_digest")
