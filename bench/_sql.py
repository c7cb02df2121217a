"""The SQL the raw-driver baselines run, compiled from sessions_sql's own statements.

Every statement is taken from :mod:`sessions_sql._dialects` and compiled with the same
SQLAlchemy dialect the backend uses, so the raw driver sends byte-for-byte the SQL that
sessions_sql sends. The positional parameter order is checked at import: if the backend's
statements change shape, the benchmark fails loudly instead of measuring something else.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import cast

from sqlalchemy.dialects.mysql.asyncmy import MySQLDialect_asyncmy
from sqlalchemy.dialects.postgresql.asyncpg import PGDialect_asyncpg
from sqlalchemy.dialects.postgresql.psycopg import PGDialect_psycopg
from sqlalchemy.dialects.sqlite.aiosqlite import SQLiteDialect_aiosqlite
from sqlalchemy.engine.interfaces import Dialect as SADialect
from sqlalchemy.sql.compiler import SQLCompiler
from sqlalchemy.sql.elements import ClauseElement

from sessions_sql._dialects import Many, Script, dialect_for

__all__ = [
    "MYSQL",
    "PG",
    "POSITIONS",
    "PSYCOPG",
    "SQLITE",
    "MySQLSQL",
    "PostgresSQL",
    "SQLiteSQL",
]


#: For each statement text, which of the parameters (in the order the fields below list them)
#: each placeholder takes.
POSITIONS: dict[str, tuple[int, ...]] = {}


def _compile(script: Script, dialect: SADialect, *expected: tuple[str, ...]) -> tuple[str, ...]:
    """Compile each statement of ``script``; check its positional parameters."""
    if len(script) != len(expected):
        raise RuntimeError(f"script has {len(script)} statements, expected {len(expected)}")
    texts = []
    for item, names in zip(script, expected, strict=True):
        statement = item.statement if isinstance(item, Many) else item
        compiled = cast(SQLCompiler, cast(ClauseElement, statement).compile(dialect=dialect))
        got = tuple(compiled.positiontup or ())
        if tuple(dict.fromkeys(got)) != names:
            raise RuntimeError(f"statement parameters changed: {got} != {names}: {compiled}")
        texts.append(str(compiled))
        # A paramstyle without numbered placeholders (psycopg's %s) repeats a parameter
        # wherever it is used.
        POSITIONS[str(compiled)] = tuple(names.index(name) for name in got)
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
    # $1 sid, $2 expires_at, $3 set_expiry, $4 key, $5 value
    write_value: str
    # $1 sid, $2 expires_at, $3 keys[], $4 set_expiry, $5 remove[], $6 values[]
    # (write_values and the combined save of a web request)
    update_session: str
    remove_value: str  # $1 sid, $2 key
    remove_values: str  # $1 sid, $2 remove[]
    read_session: str  # $1 sid
    set_session_expiry: str  # $1 expires_at, $2 sid


@dataclass(frozen=True)
class SQLiteSQL:
    """SQLite: writes of several statements run between BEGIN IMMEDIATE and COMMIT."""

    begin: str
    get_session_age: str  # ? sid
    remove_session_values: str  # ? sid  } one transaction
    remove_session: str  # ? sid         }
    read_value: str  # ? sid, ? key
    read_values: str  # ? sid
    # One transaction: write_value (new_session, upsert_value), write_values and the
    # combined save (new_session, touch_session, remove_value and upsert_value executemany).
    new_session: str  # ? sid, ? expires_at, ? create, ? set_expiry
    touch_session: str  # ? expires_at, ? sid, ? set_expiry, ? create
    upsert_value: str  # ? sid, ? key, ? value
    remove_value: str  # ? sid, ? key (executemany in a transaction for remove_values)
    read_session: str  # ? sid
    set_session_expiry: str  # ? expires_at, ? sid


def _postgres(dialect: SADialect) -> PostgresSQL:
    d = dialect_for("postgresql")
    return PostgresSQL(
        get_session_age=_one(d.get_session_age, dialect, "sid"),
        remove_session=_one(d.remove_session, dialect, "sid"),
        read_value=_one(d.read_value, dialect, "sid", "key"),
        read_values=_one(d.read_values, dialect, "sid"),
        write_value=_one(d.write_value, dialect, "sid", "expires_at", "set_expiry", "key", "value"),
        update_session=_one(
            d.update_session, dialect, "sid", "expires_at", "keys", "set_expiry", "remove", "values"
        ),
        remove_value=_one(d.remove_value, dialect, "sid", "key"),
        remove_values=_one(d.remove_values, dialect, "sid", "remove"),
        read_session=_one(d.read_session, dialect, "sid"),
        set_session_expiry=_one(d.set_session_expiry, dialect, "expires_at", "sid"),
    )


def _sqlite() -> SQLiteSQL:
    d = dialect_for("sqlite")
    dialect = SQLiteDialect_aiosqlite()
    remove_session_values, remove_session = _compile(d.remove_session, dialect, ("sid",), ("sid",))
    new = ("sid", "expires_at", "create", "set_expiry")
    new_session, upsert_value = _compile(d.write_value, dialect, new, ("sid", "key", "value"))
    touch = ("expires_at", "sid", "set_expiry", "create")
    update = _compile(
        d.update_session, dialect, new, touch, ("sid", "key"), ("sid", "key", "value")
    )
    if (update[0], update[3]) != (new_session, upsert_value):
        raise RuntimeError("update_session no longer runs the statements of write_value")
    remove_value = _one(d.remove_value, dialect, "sid", "key")
    if _one(d.remove_values, dialect, "sid", "key") != remove_value or update[2] != remove_value:
        raise RuntimeError("remove_values no longer runs the statement of remove_value")
    return SQLiteSQL(
        begin=d.begin,
        get_session_age=_one(d.get_session_age, dialect, "sid"),
        remove_session_values=remove_session_values,
        remove_session=remove_session,
        read_value=_one(d.read_value, dialect, "sid", "key"),
        read_values=_one(d.read_values, dialect, "sid"),
        new_session=new_session,
        touch_session=update[1],
        upsert_value=upsert_value,
        remove_value=remove_value,
        read_session=_one(d.read_session, dialect, "sid"),
        set_session_expiry=_one(d.set_session_expiry, dialect, "expires_at", "sid"),
    )


@dataclass(frozen=True)
class MySQLSQL:
    """MariaDB/MySQL (asyncmy, %s placeholders): writes of several statements run between
    START TRANSACTION and COMMIT, the session row first."""

    begin: str
    get_session_age: str  # sid
    remove_session: str  # sid (values go by ON DELETE CASCADE)
    read_value: str  # sid, key
    read_values: str  # sid
    # One transaction: write_value (session_row, upsert_value); update_session and
    # remove_values (session_row if values are written, else lock_session; then remove_value
    # and upsert_value, each once per row).
    session_row: str  # sid, expires_at, set_expiry
    lock_session: str  # set_expiry, expires_at, sid
    upsert_value: str  # sid, key, value
    remove_value: str  # sid, key
    read_session: str  # sid
    set_session_expiry: str  # expires_at, sid


def _mysql() -> MySQLSQL:
    d = dialect_for("mysql")
    dialect = MySQLDialect_asyncmy()
    row, upsert = ("sid", "expires_at", "set_expiry"), ("sid", "key", "value")
    session_row, upsert_value = _compile(d.write_value, dialect, row, upsert)
    lock = ("set_expiry", "expires_at", "sid")
    update = _compile(d.update_session, dialect, row, lock, ("sid", "key"), upsert)
    if (update[0], update[3]) != (session_row, upsert_value):
        raise RuntimeError("update_session no longer runs the statements of write_value")
    remove_value = _one(d.remove_value, dialect, "sid", "key")
    if update[2] != remove_value or d.remove_values != d.update_session:
        raise RuntimeError("remove_values no longer runs update_session's statements")
    return MySQLSQL(
        begin=d.begin,
        get_session_age=_one(d.get_session_age, dialect, "sid"),
        remove_session=_one(d.remove_session, dialect, "sid"),
        read_value=_one(d.read_value, dialect, "sid", "key"),
        read_values=_one(d.read_values, dialect, "sid"),
        session_row=session_row,
        lock_session=update[1],
        upsert_value=upsert_value,
        remove_value=remove_value,
        read_session=_one(d.read_session, dialect, "sid"),
        set_session_expiry=_one(d.set_session_expiry, dialect, "expires_at", "sid"),
    )


#: The statements of each database, as text with positional parameters.
PG = _postgres(PGDialect_asyncpg())  # type: ignore[no-untyped-call]
#: psycopg with the positional %s placeholders sessions_sql's psycopg path compiles for.
PSYCOPG = _postgres(PGDialect_psycopg(paramstyle="format"))  # type: ignore[no-untyped-call]
SQLITE = _sqlite()
MYSQL = _mysql()
