"""Create the sessions and session_values tables.

Revision ID: 0001
Revises:
Create Date: 2026-11-30
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

# The same SQL as sa.String(255), sa.DateTime(timezone=True), sa.func.now() and
# sa.LargeBinary() on PostgreSQL and SQLite; exact comparison, DATETIME(6) in UTC and LONGBLOB
# on MariaDB/MySQL.
from sessions_sql.models import BYTES, TIME, ExactString, utc_now

revision = "0001"
down_revision = None
branch_labels = ("sessions_sql",)
depends_on = None


def upgrade() -> None:
    context = op.get_context()
    schema = context.version_table_schema
    op.create_table(
        "sessions",
        sa.Column("id", ExactString(255), nullable=False),
        sa.Column("created_at", TIME, server_default=utc_now(), nullable=False),
        sa.PrimaryKeyConstraint("id", name="pk_sessions"),
        schema=schema,
    )
    op.create_index("ix_sessions_created_at", "sessions", ["created_at"], schema=schema)
    op.create_table(
        "session_values",
        sa.Column("session_id", ExactString(255), nullable=False),
        sa.Column("key", ExactString(255), nullable=False),
        sa.Column("value", BYTES, nullable=False),
        sa.ForeignKeyConstraint(
            ["session_id"],
            [f"{schema}.sessions.id" if schema else "sessions.id"],
            name="fk_session_values_session_id_sessions",
            ondelete="CASCADE",
        ),
        sa.PrimaryKeyConstraint("session_id", "key", name="pk_session_values"),
        schema=schema,
    )
    if context.dialect.name == "postgresql":
        # Room on each page so that replacing a value stays a HOT update (no index write).
        quote = context.dialect.identifier_preparer.quote
        table = f"{quote(schema)}.session_values" if schema else "session_values"
        op.execute(f"ALTER TABLE {table} SET (fillfactor = 90)")


def downgrade() -> None:
    schema = op.get_context().version_table_schema
    op.drop_table("session_values", schema=schema)
    op.drop_index("ix_sessions_created_at", table_name="sessions", schema=schema)
    op.drop_table("sessions", schema=schema)
