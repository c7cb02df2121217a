"""The SQL the raw-driver baselines run, compiled from sessions_sql's own statements.

Every statement is taken from :mod:`sessions_sql._dialects` and compiled with the same
SQLAlchemy dialect the backend uses, so the raw driver sends byte-for-byte the SQL that
sessions_sql sends. The positional parameter order is checked at import: if the backend's
statements change shape, the benchmark fails loudly instead of measuring something else.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import cast

from sqlalchemy.dialects.postgresql.asyncpg import PGDialect_asyncpg
from sqlalchemy.dialects.sqlite.aiosqlite import SQLiteDialect_aiosqlite
from sqlalchemy.engine.interfaces import Dialect as SADialect
from sqlalchemy.sql.compiler import SQLCompiler
from sqlalchemy.sql.elements import ClauseElement

from sessions_sql._dialects import Script, dialect_for

__all__ = ["PG", "SQLITE", "PostgresSQL", "SQLiteSQL"]


def _compile(script: Script, dialect: SADialect, *expected: tuple[str, ...]) -> tuple[str, ...]:
    """Compile each statement of ``script``; check its positional parameters."""
    if len(script) != len(expected):
        raise RuntimeError(f"script has {len(script)} statements, expected {len(expected)}")
    texts = []
    for statement, names in zip(script, expected, strict=True):
        compiled = cast(SQLCompiler, cast(ClauseElement, statement).compile(dialect=dialect))
        got = tuple(compiled.positiontup or ())
        if got != names:
            raise RuntimeError(f"statement parameters changed: {got} != {names}: {compiled}")
        texts.append(str(compiled))
    return tuple(texts)


def _one(script: Script, dialect: SADialect, *names: str) -> str:
    (text,) = _compile(script, dialect, names)
    return text


@dataclass(frozen=True)
class PostgresSQL:
    """PostgreSQL: every operation is one statement, run in autocommit."""

    get_session_age: str  # $1 sid
    remove_session: str  # $1 sid (values go by ON DELETE CASCADE)
    read_value: str  # $1 sid, $2 key
    read_values: str  # $1 sid
    write_value: str  # $1 sid, $2 key, $3 value
    write_values: str  # $1 sid, $2 keys[], $3 values[]
    remove_value: str  # $1 sid, $2 key
    remove_values: str  # $1 sid, $2 keys[]


@dataclass(frozen=True)
class SQLiteSQL:
    """SQLite: writes of several statements run between BEGIN IMMEDIATE and COMMIT."""

    begin: str
    get_session_age: str  # ? sid
    remove_session_values: str  # ? sid  } one transaction
    remove_session: str  # ? sid         }
    read_value: str  # ? sid, ? key
    read_values: str  # ? sid
    new_session: str  # ? sid                     } one transaction (write_value, write_values)
    upsert_value: str  # ? sid, ? key, ? value    } (executemany for write_values)
    remove_value: str  # ? sid, ? key (executemany in a transaction for remove_values)


def _postgres() -> PostgresSQL:
    d = dialect_for("postgresql")
    dialect = PGDialect_asyncpg()  # type: ignore[no-untyped-call]
    return PostgresSQL(
        get_session_age=_one(d.get_session_age, dialect, "sid"),
        remove_session=_one(d.remove_session, dialect, "sid"),
        read_value=_one(d.read_value, dialect, "sid", "key"),
        read_values=_one(d.read_values, dialect, "sid"),
        write_value=_one(d.write_value, dialect, "sid", "key", "value"),
        write_values=_one(d.write_values, dialect, "sid", "keys", "values"),
        remove_value=_one(d.remove_value, dialect, "sid", "key"),
        remove_values=_one(d.remove_values, dialect, "sid", "keys"),
    )


def _sqlite() -> SQLiteSQL:
    d = dialect_for("sqlite")
    dialect = SQLiteDialect_aiosqlite()
    remove_session_values, remove_session = _compile(d.remove_session, dialect, ("sid",), ("sid",))
    new_session, upsert_value = _compile(d.write_value, dialect, ("sid",), ("sid", "key", "value"))
    if _compile(d.write_values, dialect, ("sid",), ("sid", "key", "value")) != (
        new_session,
        upsert_value,
    ):
        raise RuntimeError("write_values no longer runs the statements of write_value")
    remove_value = _one(d.remove_value, dialect, "sid", "key")
    if _one(d.remove_values, dialect, "sid", "key") != remove_value:
        raise RuntimeError("remove_values no longer runs the statement of remove_value")
    return SQLiteSQL(
        begin=d.begin,
        get_session_age=_one(d.get_session_age, dialect, "sid"),
        remove_session_values=remove_session_values,
        remove_session=remove_session,
        read_value=_one(d.read_value, dialect, "sid", "key"),
        read_values=_one(d.read_values, dialect, "sid"),
        new_session=new_session,
        upsert_value=upsert_value,
        remove_value=remove_value,
    )


#: The statements of each database, as text with positional parameters.
PG = _postgres()
SQLITE = _sqlite()
