"""Stored queue positions: each scheduling pass writes a waiting job's place and reason.

Revision ID: 0004
Revises: 0003
Create Date: 2026-11-28

Reviewed by hand:
- Two nullable columns, no default and no index: existing queued jobs read as "waiting for
  the next scheduling pass" until the first pass after the upgrade places them (a worker's
  periodic pass does within ``scheduler_interval_s``). Plain ``ADD COLUMN`` on both backends.
- Why stored: ``GET /v1/jobs/{id}`` replayed the whole queue to find one position (issue
  17); now it reads the row, and the pass that changes the queue writes the positions
  (`service.scheduler.refresh_positions`).
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0004"
down_revision: str | None = "0003"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.add_column("jobs", sa.Column("queue_position", sa.Integer(), nullable=True))
    op.add_column("jobs", sa.Column("queue_reason", sa.String(length=200), nullable=True))


def downgrade() -> None:
    op.drop_column("jobs", "queue_reason")
    op.drop_column("jobs", "queue_position")
