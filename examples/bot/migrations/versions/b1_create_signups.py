"""Create signups.

Revision ID: b1
Revises:
Create Date: 2026-12-01
"""

import sqlalchemy as sa
from alembic import op

revision = "b1"
down_revision = None
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "signups",
        sa.Column("id", sa.Integer(), primary_key=True),
        sa.Column("telegram_user_id", sa.BigInteger(), nullable=False),
        sa.Column("name", sa.String(100), nullable=False),
        sa.Column("age", sa.Integer(), nullable=False),
    )
    op.create_index("ix_signups_telegram_user_id", "signups", ["telegram_user_id"])


def downgrade() -> None:
    op.drop_index("ix_signups_telegram_user_id", table_name="signups")
    op.drop_table("signups")
