"""per-organization usage-alert thresholds

Revision ID: 0007_alert_thresholds
Revises: 0006_usage_rollups
Create Date: 2026-11-22 03:00:00.000000
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0007_alert_thresholds"
down_revision = "0006_usage_rollups"
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table("organizations", schema=None) as batch_op:
        batch_op.add_column(sa.Column("alert_thresholds", sa.String(200), nullable=True))


def downgrade() -> None:
    with op.batch_alter_table("organizations", schema=None) as batch_op:
        batch_op.drop_column("alert_thresholds")
