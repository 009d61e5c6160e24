"""Resumable upload sessions; per-team cache budgets and the caches' last use.

Revision ID: 0011
Revises: 0010
Create Date: 2026-12-04

Reviewed by hand: one nullable column on teams (existing teams keep the deployment's
default budget), three new tables. ``upload_sessions.upload_id`` is SET NULL on delete (a
session's record outlives the upload it became); cache rows go with their team, uses with
their job.
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op
from sqlalchemy.dialects import postgresql

revision: str = "0011"
down_revision: str | None = "0010"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

TS = sa.DateTime(timezone=True)
JSON = sa.JSON().with_variant(postgresql.JSONB(), "postgresql")


def upgrade() -> None:
    op.add_column("teams", sa.Column("cache_budget_bytes", sa.BigInteger(), nullable=True))
    op.create_table(
        "upload_sessions",
        sa.Column("id", sa.String(length=32), nullable=False),
        sa.Column("team_id", sa.String(length=32), nullable=False),
        sa.Column("filename", sa.String(length=255), nullable=False),
        sa.Column("format", sa.String(length=16), nullable=False),
        sa.Column("size", sa.BigInteger(), nullable=False),
        sa.Column("sha256", sa.String(length=64), nullable=False),
        sa.Column("part_size", sa.BigInteger(), nullable=False),
        sa.Column("received", sa.BigInteger(), server_default="0", nullable=False),
        sa.Column("status", sa.String(length=16), server_default="open", nullable=False),
        sa.Column("store_key", sa.Text(), nullable=False),
        sa.Column("multipart_id", sa.Text(), nullable=True),
        sa.Column("parts", JSON, nullable=False),
        sa.Column("upload_id", sa.String(length=32), nullable=True),
        sa.Column("created_at", TS, nullable=False),
        sa.Column("updated_at", TS, nullable=False),
        sa.Column("expires_at", TS, nullable=False),
        sa.CheckConstraint(
            "status IN ('open', 'completed', 'aborted')", name=op.f("ck_upload_sessions_status")
        ),
        sa.CheckConstraint(
            "received >= 0 AND received <= size",
            name=op.f("ck_upload_sessions_received_in_size"),
        ),
        sa.ForeignKeyConstraint(
            ["team_id"],
            ["teams.id"],
            name=op.f("fk_upload_sessions_team_id_teams"),
            ondelete="CASCADE",
        ),
        sa.ForeignKeyConstraint(
            ["upload_id"],
            ["uploads.id"],
            name=op.f("fk_upload_sessions_upload_id_uploads"),
            ondelete="SET NULL",
        ),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_upload_sessions")),
    )
    op.create_index(
        "ix_upload_sessions_team_id_sha256", "upload_sessions", ["team_id", "sha256"], unique=False
    )
    op.create_table(
        "cache_entries",
        sa.Column("id", sa.Integer(), autoincrement=True, nullable=False),
        sa.Column("team_id", sa.String(length=32), nullable=False),
        sa.Column("kind", sa.String(length=16), nullable=False),
        sa.Column("key", sa.String(length=64), nullable=False),
        sa.Column("bytes", sa.BigInteger(), server_default="0", nullable=False),
        sa.Column("created_at", TS, nullable=False),
        sa.Column("last_used_at", TS, nullable=False),
        sa.ForeignKeyConstraint(
            ["team_id"],
            ["teams.id"],
            name=op.f("fk_cache_entries_team_id_teams"),
            ondelete="CASCADE",
        ),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_cache_entries")),
        sa.UniqueConstraint(
            "team_id", "kind", "key", name=op.f("uq_cache_entries_team_id_kind_key")
        ),
    )
    op.create_index(
        "ix_cache_entries_team_id_last_used_at",
        "cache_entries",
        ["team_id", "last_used_at"],
        unique=False,
    )
    op.create_table(
        "cache_entry_uses",
        sa.Column("entry_id", sa.Integer(), nullable=False),
        sa.Column("job_id", sa.String(length=32), nullable=False),
        sa.Column("used_at", TS, nullable=False),
        sa.ForeignKeyConstraint(
            ["entry_id"],
            ["cache_entries.id"],
            name=op.f("fk_cache_entry_uses_entry_id_cache_entries"),
            ondelete="CASCADE",
        ),
        sa.ForeignKeyConstraint(
            ["job_id"],
            ["jobs.id"],
            name=op.f("fk_cache_entry_uses_job_id_jobs"),
            ondelete="CASCADE",
        ),
        sa.PrimaryKeyConstraint("entry_id", "job_id", name=op.f("pk_cache_entry_uses")),
    )


def downgrade() -> None:
    op.drop_table("cache_entry_uses")
    op.drop_index("ix_cache_entries_team_id_last_used_at", table_name="cache_entries")
    op.drop_table("cache_entries")
    op.drop_index("ix_upload_sessions_team_id_sha256", table_name="upload_sessions")
    op.drop_table("upload_sessions")
    with op.batch_alter_table("teams") as batch:  # SQLite drops a column by copying the table
        batch.drop_column("cache_budget_bytes")
