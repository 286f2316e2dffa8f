"""narrow usage rollups (one dimension at a time, per hour, day and billing period), filled from the ledger

Revision ID: 0006_usage_rollups
Revises: 0005_alerts
Create Date: 2026-11-22 02:30:00.000000
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

from meterline.storage import usage_rollups
from meterline.storage.tables import NARROW_MEASURES

revision = "0006_usage_rollups"
down_revision = "0005_alerts"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "usage_rollups",
        sa.Column("organization_id", sa.String(40), nullable=False),
        sa.Column("workspace_id", sa.String(40), nullable=False),
        sa.Column("dimension", sa.String(16), nullable=False),
        sa.Column("grain", sa.String(1), nullable=False),
        sa.Column("bucket", sa.BigInteger(), nullable=False),
        sa.Column("value", sa.String(200), nullable=False),
        *(sa.Column(name, sa.BigInteger(), nullable=False) for name in NARROW_MEASURES),
        sa.PrimaryKeyConstraint(*usage_rollups.KEY, name="pk_usage_rollups"),
        sqlite_with_rowid=False,
    )
    # A database with a ledger already: the new projection starts equal to it (as `reconcile --rebuild`).
    usage_rollups.rebuild(op.get_bind())


def downgrade() -> None:
    op.drop_table("usage_rollups")
