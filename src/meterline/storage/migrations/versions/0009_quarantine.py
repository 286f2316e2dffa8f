"""quarantine: work that could not be settled, kept with its error until an operator resolves it

Revision ID: 0009_quarantine
Revises: 0008_identifier_rollup_index
Create Date: 2026-12-04 14:40:00.000000
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0009_quarantine"
down_revision = "0008_identifier_rollup_index"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "quarantine",
        sa.Column("id", sa.String(40), primary_key=True),
        sa.Column("organization_id", sa.String(40), nullable=False, index=True),
        sa.Column("reservation_id", sa.String(40), nullable=False, unique=True),
        sa.Column("record_json", sa.Text, nullable=False),
        sa.Column("meters_json", sa.Text, nullable=False),
        sa.Column("error", sa.Text, nullable=False),
        sa.Column("created_at_us", sa.BigInteger, nullable=False),
        sa.Column("resolution", sa.String(16)),
        sa.Column("resolved_at_us", sa.BigInteger),
        sa.Column("ledger_id", sa.String(40)),
        sa.Column("note", sa.Text),
    )


def downgrade() -> None:
    op.drop_table("quarantine")
