"""Job plans: the pool's card and memory on each worker, the plan and measured peak memory on
each job, and the step-cost table plans estimate throughput from (docs/planning.md).

Revision ID: 0010
Revises: 0006
Create Date: 2026-12-04

Reviewed by hand: nullable columns added to workers and jobs (existing rows read as "no plan",
"card not declared"), one new table with no foreign key (a step cost outlives its job: it is
a measurement of the card, not part of the job).
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op
from sqlalchemy.dialects import postgresql

revision: str = "0010"
down_revision: str | None = "0009"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

TS = sa.DateTime(timezone=True)
JSON = sa.JSON().with_variant(postgresql.JSONB(), "postgresql")


def upgrade() -> None:
    op.add_column("workers", sa.Column("gpu_type", sa.String(length=32), nullable=True))
    op.add_column("workers", sa.Column("gpu_memory_bytes", sa.BigInteger(), nullable=True))
    op.add_column("jobs", sa.Column("plan", JSON, nullable=True))
    op.add_column("jobs", sa.Column("peak_mem_mb", sa.Double(), nullable=True))
    op.create_table(
        "step_costs",
        sa.Column("id", sa.Integer(), autoincrement=True, nullable=False),
        sa.Column("job_id", sa.String(length=32), nullable=False),
        sa.Column("gpu_type", sa.String(length=32), nullable=False),
        sa.Column("method", sa.String(length=32), nullable=False),
        sa.Column("student_params", sa.BigInteger(), nullable=False),
        sa.Column("seq_len", sa.Integer(), nullable=False),
        sa.Column("world_size", sa.Integer(), nullable=False),
        sa.Column("tokens_per_s", sa.Double(), nullable=False),
        sa.Column("flops_per_token", sa.Double(), nullable=False),
        sa.Column("mfu", sa.Double(), nullable=True),
        sa.Column("created_at", TS, nullable=False),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_step_costs")),
    )
    op.create_index("ix_step_costs_gpu_type_id", "step_costs", ["gpu_type", "id"], unique=False)


def downgrade() -> None:
    op.drop_index("ix_step_costs_gpu_type_id", table_name="step_costs")
    op.drop_table("step_costs")
    op.drop_column("jobs", "peak_mem_mb")
    op.drop_column("jobs", "plan")
    op.drop_column("workers", "gpu_memory_bytes")
    op.drop_column("workers", "gpu_type")
