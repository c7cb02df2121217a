"""The two tables, as SQLAlchemy 2 declarative models.

Core column types, with MariaDB/MySQL variants: ids and keys compare exactly there too
(binary NO PAD collation), values are ``LONGBLOB`` and times ``DATETIME(6)`` in UTC. The
package's own code runs Core statements on ``SessionRecord.__table__`` and
``SessionValue.__table__``; the ORM classes are there to describe the schema.
"""

from __future__ import annotations

from datetime import datetime
from typing import Any

from sqlalchemy import DateTime, ForeignKey, Index, LargeBinary, MetaData, String, func
from sqlalchemy.dialects import mysql
from sqlalchemy.ext.compiler import compiles
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column
from sqlalchemy.sql.functions import FunctionElement

from ._protocol import MAX_NAME_LENGTH

__all__ = [
    "Base",
    "ExactString",
    "SessionRecord",
    "SessionValue",
    "sessions_table",
    "utc_now",
    "values_table",
]

NAMING_CONVENTION = {
    "ix": "ix_%(table_name)s_%(column_0_N_name)s",
    "uq": "uq_%(table_name)s_%(column_0_N_name)s",
    "fk": "fk_%(table_name)s_%(column_0_name)s_%(referred_table_name)s",
    "pk": "pk_%(table_name)s",
}


class ExactString(String):
    """``VARCHAR`` whose values compare exactly, as on PostgreSQL: on MariaDB and MySQL in
    ``utf8mb4`` with its binary NO PAD collation (``"A" != "a"``, ``"e" != "é"``,
    ``"x" != "x "``), ``utf8mb4_nopad_bin`` on MariaDB, ``utf8mb4_0900_bin`` on MySQL 8;
    elsewhere a plain ``VARCHAR``."""

    cache_ok = True


@compiles(ExactString, "mysql")
@compiles(ExactString, "mariadb")
def _exact_varchar(type_: ExactString, compiler: Any, **kw: Any) -> str:
    collation = "utf8mb4_nopad_bin" if compiler.dialect.is_mariadb else "utf8mb4_0900_bin"
    return f"VARCHAR({type_.length}) CHARACTER SET utf8mb4 COLLATE {collation}"


class utc_now(FunctionElement[datetime]):
    """The database's current time: ``now()`` (PostgreSQL), ``CURRENT_TIMESTAMP`` (SQLite,
    UTC), ``UTC_TIMESTAMP(6)`` on MariaDB/MySQL, whose ``now()`` is in the connection's time
    zone."""

    type = DateTime(timezone=True)
    inherit_cache = True


@compiles(utc_now)
def _now(element: utc_now, compiler: Any, **kw: Any) -> str:
    return str(compiler.process(func.now(), **kw))


@compiles(utc_now, "mysql")
@compiles(utc_now, "mariadb")
def _utc_timestamp(element: utc_now, compiler: Any, **kw: Any) -> str:
    # Parenthesized: MySQL 8 takes an expression as a column DEFAULT only in parentheses, and
    # SQLAlchemy adds them only when it knows the server's version (not for offline SQL).
    return "(UTC_TIMESTAMP(6))"


#: A creation or expiry time: ``DATETIME(6)`` (naive, UTC, microseconds) on MariaDB/MySQL.
TIME = DateTime(timezone=True).with_variant(mysql.DATETIME(fsp=6), "mysql", "mariadb")
#: A value: ``LONGBLOB`` on MariaDB/MySQL, whose ``BLOB`` holds 64 KB.
BYTES = LargeBinary().with_variant(mysql.LONGBLOB(), "mysql", "mariadb")


class Base(DeclarativeBase):
    """Declarative base holding only sessions_sql's tables (its own ``MetaData``)."""

    metadata = MetaData(naming_convention=NAMING_CONVENTION)


class SessionRecord(Base):
    """One session: its id, its creation time (set once by the database clock) and when it
    expires (``NULL``: never)."""

    __tablename__ = "sessions"

    id: Mapped[str] = mapped_column(ExactString(MAX_NAME_LENGTH), primary_key=True)
    created_at: Mapped[datetime] = mapped_column(TIME, server_default=utc_now(), index=True)
    expires_at: Mapped[datetime | None] = mapped_column(TIME)

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
        ExactString(MAX_NAME_LENGTH),  # the parent's charset and collation, as MySQL requires
        ForeignKey(SessionRecord.id, ondelete="CASCADE"),
        primary_key=True,
    )
    key: Mapped[str] = mapped_column(ExactString(MAX_NAME_LENGTH), primary_key=True)
    value: Mapped[bytes] = mapped_column(BYTES)


#: The ``sessions`` table, for Core statements.
sessions_table = Base.metadata.tables["sessions"]
#: The ``session_values`` table, for Core statements.
values_table = Base.metadata.tables["session_values"]
