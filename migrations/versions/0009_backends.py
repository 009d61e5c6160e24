"""Backends: the Slurm job id on a job's current attempt, and what a worker's backend offers.

Revision ID: 0009
Revises: 0006
Create Date: 2026-12-04

Reviewed by hand:
- ``jobs.backend_job_id``: the Slurm job (or PyTorchJob) that runs the current attempt,
  written by the supervisor right after ``sbatch`` (fenced by attempt). A worker that lost
  its supervisor adopts the job by this id instead of submitting it again. Nullable, no
  index: read by job id only.
- ``workers.backend`` / ``max_nodes`` / ``gpus_per_node`` / ``backend_info``: a Slurm pool's
  worker registers its partition, its nodes and their GPUs, so a submission that asks for
  more (nodes > 1 on a local pool, more GPUs per node than the nodes have, a partition that
  does not exist) is refused with a 422, and ``sharp admin workers list`` shows the nodes.
  Existing rows read as local single-node workers (server defaults).
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op
from sqlalchemy.dialects import postgresql

revision: str = "0009"
down_revision: str | None = "0008"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

JSONType = sa.JSON().with_variant(postgresql.JSONB(astext_type=sa.Text()), "postgresql")


def upgrade() -> None:
    op.add_column("jobs", sa.Column("backend_job_id", sa.String(length=64), nullable=True))
    op.add_column(
        "workers",
        sa.Column("backend", sa.String(length=16), server_default="local", nullable=False),
    )
    op.add_column(
        "workers", sa.Column("max_nodes", sa.Integer(), server_default="1", nullable=False)
    )
    op.add_column("workers", sa.Column("gpus_per_node", sa.Integer(), nullable=True))
    op.add_column("workers", sa.Column("backend_info", JSONType, nullable=True))


def downgrade() -> None:
    op.drop_column("workers", "backend_info")
    op.drop_column("workers", "gpus_per_node")
    op.drop_column("workers", "max_nodes")
    op.drop_column("workers", "backend")
    op.drop_column("jobs", "backend_job_id")
