"""stream progress: what an open reservation has consumed so far (seed 002: credits drop while a
response streams, visible before the stream ends)

Revision ID: 0004_stream_progress
Revises: 0003_receipts
Create Date: 2026-11-21 12:00:00.000000
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0004_stream_progress"
down_revision = "0003_receipts"
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table("reservations") as batch:
        batch.add_column(
            sa.Column("progress_credits_nanos", sa.BigInteger(), nullable=False, server_default="0")
        )
        batch.add_column(
            sa.Column("progress_cost_nanos", sa.BigInteger(), nullable=False, server_default="0")
        )


def downgrade() -> None:
    with op.batch_alter_table("reservations") as batch:
        batch.drop_column("progress_cost_nanos")
        batch.drop_column("progress_credits_nanos")
