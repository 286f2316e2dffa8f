"""quota counters in the database: shared by every process when there is no Redis

Revision ID: 0012_quota_counters
Revises: 0011_usage_details
Create Date: 2026-12-04 22:30:00.000000
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0012_quota_counters"
down_revision = "0011_usage_details"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "quota_counters",
        sa.Column("key", sa.String(1024), nullable=False),
        sa.Column("kind", sa.String(1), nullable=False),
        sa.Column("used", sa.BigInteger(), nullable=False),
        sa.Column("reserved", sa.BigInteger(), nullable=False),
        sa.Column("reset_s", sa.BigInteger(), nullable=False),
        sa.PrimaryKeyConstraint("key", "kind", name="pk_quota_counters"),
    )
    op.create_table(
        "quota_seconds",
        sa.Column("key", sa.String(1024), nullable=False),
        sa.Column("second", sa.BigInteger(), nullable=False),
        sa.Column("amount", sa.BigInteger(), nullable=False),
        sa.PrimaryKeyConstraint("key", "second", name="pk_quota_seconds"),
    )
    op.create_table(
        "quota_holds",
        sa.Column("id", sa.String(200), nullable=False),
        sa.Column("expires_us", sa.BigInteger(), nullable=False),
        sa.Column("second", sa.BigInteger(), nullable=False),
        sa.Column("lines", sa.Text(), nullable=False),
        sa.PrimaryKeyConstraint("id", name="pk_quota_holds"),
    )
    op.create_index("ix_quota_holds_expires_us", "quota_holds", ["expires_us"])
    op.create_table(
        "quota_tallies",
        sa.Column("key", sa.String(1024), nullable=False),
        sa.Column("minute", sa.BigInteger(), nullable=False),
        sa.Column("events", sa.BigInteger(), nullable=False),
        sa.PrimaryKeyConstraint("key", "minute", name="pk_quota_tallies"),
    )


def downgrade() -> None:
    op.drop_table("quota_tallies")
    op.drop_index("ix_quota_holds_expires_us", table_name="quota_holds")
    op.drop_table("quota_holds")
    op.drop_table("quota_seconds")
    op.drop_table("quota_counters")
