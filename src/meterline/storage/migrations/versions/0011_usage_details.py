"""usage details: the usage vector and unpriced requests per hour and model, filled from the ledger

Revision ID: 0011_usage_details
Revises: 0010_usage_vector
Create Date: 2026-12-04 22:00:00.000000
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

from meterline.storage import usage_details
from meterline.storage.tables import DETAIL_MEASURES

revision = "0011_usage_details"
down_revision = "0010_usage_vector"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "usage_details",
        sa.Column("organization_id", sa.String(40), nullable=False),
        sa.Column("workspace_id", sa.String(40), nullable=False),
        sa.Column("identifier_id", sa.String(200), nullable=False),
        sa.Column("hour", sa.BigInteger(), nullable=False),
        sa.Column("model", sa.String(200), nullable=False),
        *(sa.Column(name, sa.BigInteger(), nullable=False) for name in DETAIL_MEASURES),
        sa.PrimaryKeyConstraint(*usage_details.KEY, name="pk_usage_details"),
        sqlite_with_rowid=False,
    )
    op.create_index(
        "ix_usage_details_identifier_hour", "usage_details", ["organization_id", "identifier_id", "hour"]
    )
    # A database with a ledger already: the new projection starts equal to it (as `reconcile --rebuild`).
    usage_details.rebuild(op.get_bind())


def downgrade() -> None:
    op.drop_table("usage_details")
