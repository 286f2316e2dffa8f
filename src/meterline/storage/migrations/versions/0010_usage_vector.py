"""usage vector: every unit a provider bills, on each ledger row

Revision ID: 0010_usage_vector
Revises: 0009_quarantine
Create Date: 2026-12-04 20:00:00.000000
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0010_usage_vector"
down_revision = "0009_quarantine"
branch_labels = None
depends_on = None

# Parts of the four token columns (which keep their meaning) and per-call counts; 0 on older rows.
COUNTS = (
    "cache_write_1h_tokens",
    "input_audio_tokens",
    "cache_audio_read_tokens",
    "output_audio_tokens",
    "reasoning_tokens",
    "accepted_prediction_tokens",
    "rejected_prediction_tokens",
    "web_searches",
    "web_fetches",
)


def upgrade() -> None:
    with op.batch_alter_table("ledger") as batch:
        for name in COUNTS:
            batch.add_column(sa.Column(name, sa.BigInteger, nullable=False, server_default="0"))
        batch.add_column(sa.Column("service_tier", sa.String(32), nullable=True))
        batch.add_column(sa.Column("batch", sa.Boolean, nullable=False, server_default=sa.false()))


def downgrade() -> None:
    with op.batch_alter_table("ledger") as batch:
        batch.drop_column("batch")
        batch.drop_column("service_tier")
        for name in reversed(COUNTS):
            batch.drop_column(name)
