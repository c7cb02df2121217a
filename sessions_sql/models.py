"""The two tables, as SQLAlchemy 2 declarative models.

Only core column types are used, so nothing here has to be imported by a host's migrations.
The package's own code runs Core statements on ``SessionRecord.__table__`` and
``SessionValue.__table__``; the ORM classes are there to describe the schema.
"""

from __future__ import annotations

from datetime import datetime

from sqlalchemy import DateTime, ForeignKey, Index, LargeBinary, MetaData, String, func
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column

from ._protocol import MAX_NAME_LENGTH

__all__ = ["Base", "SessionRecord", "SessionValue", "sessions_table", "values_table"]

NAMING_CONVENTION = {
    "ix": "ix_%(table_name)s_%(column_0_N_name)s",
    "uq": "uq_%(table_name)s_%(column_0_N_name)s",
    "fk": "fk_%(table_name)s_%(column_0_name)s_%(referred_table_name)s",
    "pk": "pk_%(table_name)s",
}


class Base(DeclarativeBase):
    """Declarative base holding only sessions_sql's tables (its own ``MetaData``)."""

    metadata = MetaData(naming_convention=NAMING_CONVENTION)


class SessionRecord(Base):
    """One session: its id, its creation time (set once by the database clock) and when it
    expires (``NULL``: never)."""

    __tablename__ = "sessions"

    id: Mapped[str] = mapped_column(String(MAX_NAME_LENGTH), primary_key=True)
    created_at: Mapped[datetime] = mapped_column(
        DateTime(timezone=True), server_default=func.now(), index=True
    )
    expires_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))

    __table_args__ = (
        # Only sessions that expire are indexed: the collector finds expired ones through it.
        Index(
            "ix_sessions_expires_at",
            "expires_at",
            postgresql_where=expires_at.is_not(None),
            sqlite_where=expires_at.is_not(None),
        ),
    )


class SessionValue(Base):
    """One named byte value of a session; removed with its session (``ON DELETE CASCADE``)."""

    __tablename__ = "session_values"

    session_id: Mapped[str] = mapped_column(
        String(MAX_NAME_LENGTH),
        ForeignKey(SessionRecord.id, ondelete="CASCADE"),
        primary_key=True,
    )
    key: Mapped[str] = mapped_column(String(MAX_NAME_LENGTH), primary_key=True)
    value: Mapped[bytes] = mapped_column(LargeBinary)


#: The ``sessions`` table, for Core statements.
sessions_table = Base.metadata.tables["sessions"]
#: The ``session_values`` table, for Core statements.
values_table = Base.metadata.tables["session_values"]
