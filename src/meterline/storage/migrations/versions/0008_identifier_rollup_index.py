"""usage_hourly indexed by (organization, identifier, hour): an identifier's reads cost its own entries

Revision ID: 0008_identifier_rollup_index
Revises: 0007_alert_thresholds
Create Date: 2026-11-22 03:10:00.000000
"""

from __future__ import annotations

from alembic import op

revision = "0008_identifier_rollup_index"
down_revision = "0007_alert_thresholds"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_index(
        "ix_usage_hourly_identifier_hour", "usage_hourly", ["organization_id", "identifier_id", "hour"]
    )


def downgrade() -> None:
    op.drop_index("ix_usage_hourly_identifier_hour", table_name="usage_hourly")
