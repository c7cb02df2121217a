"""Running compiled statements on the driver's own connection: the fast path of asyncpg,
psycopg, aiosqlite and asyncmy (other drivers run the statements through SQLAlchemy Core
instead).

On its pooled path the backend checks a connection out of the engine's pool and sends the
statements of ``_dialects`` straight to the driver: each is compiled once per backend to
the driver's SQL text with positional parameters, so a call costs no SQLAlchemy
``Connection``, compilation or ``Result``, only the driver's own call. Everything here runs
as plain coroutines: the backend awaits them directly on a connection it keeps, or inside
``greenlet_spawn`` with ``await_only`` between a pool checkout and check-in.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from typing import Any, cast

from sqlalchemy.engine.interfaces import Dialect as EngineDialect
from sqlalchemy.sql.compiler import SQLCompiler
from sqlalchemy.sql.elements import ClauseElement

from ._dialects import Many, Params, Script

__all__ = ["Driver", "Statement", "check_driver", "compile_script", "driver_for", "run_script"]

#: What a script returns: the rows of its last statement, or that statement's row count.
Outcome = Sequence[Sequence[Any]] | int


@dataclass(frozen=True)
class Statement:
    """One statement compiled for a driver: SQL text and the order of its parameters."""

    sql: str
    names: tuple[str, ...]
    returns_rows: bool
    #: Values of parameters the statement fixes itself (SQLite's ``OFFSET 0``).
    fixed: dict[str, Any]
    #: Run once per row of the list ``params[rows]`` (see :class:`~._dialects.Many`).
    rows: str | None = None

    def args(self, params: dict[str, Any]) -> tuple[Any, ...]:
        """The positional arguments for ``params`` (a mapping of parameter names)."""
        if self.fixed:
            params = self.fixed | params
        return tuple([params[name] for name in self.names])


def compile_script(
    script: Script, dialect: EngineDialect, schema: str | None
) -> tuple[Statement, ...]:
    """Compile each statement of ``script`` for ``dialect``, in ``schema`` if given."""
    options: dict[str, Any] = {}
    if schema is not None:
        options = {"schema_translate_map": {None: schema}, "render_schema_translate": True}
    compiled = []
    for item in script:
        statement, rows = (item.statement, item.rows) if isinstance(item, Many) else (item, None)
        sql = cast(SQLCompiler, cast(ClauseElement, statement).compile(dialect=dialect, **options))
        names = tuple(sql.positiontup or ())
        binds = sql.binds
        fixed = {name: binds[name].effective_value for name in names if not binds[name].required}
        returns_rows = bool(getattr(statement, "is_select", False) or sql.returning)
        compiled.append(Statement(sql.string, names, returns_rows, fixed, rows))
    return tuple(compiled)


@dataclass(frozen=True)
class Driver:
    """The calls of one driver on its connection."""

    name: str
    #: Run a statement and return its rows.
    rows: Callable[[Any, str, tuple[Any, ...]], Awaitable[Sequence[Sequence[Any]]]]
    #: Run a statement and return how many rows it changed.
    count: Callable[[Any, str, tuple[Any, ...]], Awaitable[int]]
    #: Run a statement once per argument tuple.
    many: Callable[[Any, str, list[tuple[Any, ...]]], Awaitable[object]]
    #: The connection is inside a transaction (begun by a script or implicitly by the driver).
    in_transaction: Callable[[Any], bool]
    #: The connection is closed (the server went away): the pool must drop it.
    is_closed: Callable[[Any], bool]
    #: After the driver gave up waiting for a statement (a client timeout), wait until the
    #: server has ended it, so that a call that raised leaves nothing running behind it.
    settle: Callable[[Any], Awaitable[object]]
    #: After a script was cancelled inside its transaction, end that transaction once the
    #: statement the script was waiting for is over; the connection is discarded next.
    abandon: Callable[[Any], Awaitable[object]]
    #: Put the connection in autocommit for a call, and back as the pool had it after it
    #: (for drivers whose connections are not in autocommit by default).
    enter: Callable[[Any], Awaitable[object]] | None = None
    leave: Callable[[Any], Awaitable[object]] | None = None
    #: The parameter style to compile for, if not the SQLAlchemy dialect's (which must be
    #: positional).
    paramstyle: str | None = None
    #: Whether a call on a pooled connection goes through :attr:`enter` and :attr:`leave`
    #: (False where the switch costs round trips: the call then ends with COMMIT instead);
    #: kept connections always enter, once.
    pooled_autocommit: bool = True


async def _asyncpg_count(conn: Any, sql: str, args: tuple[Any, ...]) -> int:
    status: str = await conn.execute(sql, *args)  # "DELETE 3", "INSERT 0 1", "BEGIN"
    count = status.rpartition(" ")[2]
    return int(count) if count.isdigit() else 0


async def _nothing_to_abandon(conn: Any) -> None:
    """The driver runs one operation at a time, the cancelled one still; the server ends the
    transaction when the discarded connection closes."""


# asyncpg prepares each statement once per connection (its statement cache) and needs no
# explicit transaction for a single statement.
_ASYNCPG = Driver(
    name="asyncpg",
    rows=lambda conn, sql, args: conn.fetch(sql, *args),
    count=_asyncpg_count,
    many=lambda conn, sql, rows: conn.executemany(sql, rows),
    in_transaction=lambda conn: bool(conn.is_in_transaction()),
    is_closed=lambda conn: bool(conn.is_closed()),
    # On a timeout asyncpg sends the server a cancel request; its next query on the
    # connection waits until the cancelled statement has ended.
    settle=lambda conn: conn.execute("SELECT 1"),
    abandon=_nothing_to_abandon,
)


async def _aiosqlite_count(conn: Any, sql: str, args: tuple[Any, ...]) -> int:
    cursor = await conn.execute(sql, args)
    return int(cursor.rowcount)


async def _nothing_to_settle(conn: Any) -> None:
    """SQLite's busy timeout fails inside the call: nothing runs on after it."""


# Each aiosqlite call is one trip to the connection's thread.
_AIOSQLITE = Driver(
    name="aiosqlite",
    rows=lambda conn, sql, args: conn.execute_fetchall(sql, args),
    count=_aiosqlite_count,
    many=lambda conn, sql, rows: conn.executemany(sql, rows),
    in_transaction=lambda conn: bool(conn.in_transaction),
    is_closed=lambda conn: False,  # a local file: nothing to lose but the process
    settle=_nothing_to_settle,
    # Calls queue on the connection's thread, so the rollback runs after the cancelled
    # statement. Closing alone does not end the transaction while a cursor of it lives on
    # (in the traceback of the cancellation, say): SQLite keeps a connection with statements
    # not yet reset open, write lock included, until they are freed.
    abandon=lambda conn: conn.rollback(),
)


async def _psycopg_rows(conn: Any, sql: str, args: tuple[Any, ...]) -> Sequence[Sequence[Any]]:
    cursor = await conn.execute(sql, args)
    rows: Sequence[Sequence[Any]] = await cursor.fetchall()
    return rows


async def _psycopg_count(conn: Any, sql: str, args: tuple[Any, ...]) -> int:
    cursor = await conn.execute(sql, args)
    return max(0, int(cursor.rowcount))


async def _psycopg_many(conn: Any, sql: str, rows: list[tuple[Any, ...]]) -> None:
    async with conn.cursor() as cursor:
        await cursor.executemany(sql, rows)


async def _psycopg_autocommit(conn: Any) -> None:
    if not conn.autocommit:
        await conn.set_autocommit(True)


async def _psycopg_pool_mode(conn: Any) -> None:
    # SQLAlchemy's pool keeps psycopg connections out of autocommit (it begins transactions
    # for the engine's other users) unless the engine's isolation level says otherwise.
    if conn.autocommit:
        await conn.set_autocommit(False)


# psycopg sends a single statement as one round trip in autocommit (outside it, a BEGIN
# first); it prepares a statement after prepare_threshold executions (None: never, for
# PgBouncer in transaction mode). Compiled with positional %s parameters.
_PSYCOPG = Driver(
    name="psycopg",
    rows=_psycopg_rows,
    count=_psycopg_count,
    many=_psycopg_many,
    in_transaction=lambda conn: conn.info.transaction_status.name != "IDLE",
    is_closed=lambda conn: bool(conn.closed),
    settle=_nothing_to_settle,  # no client-side timeout of its own
    abandon=_nothing_to_abandon,  # the server ends the transaction when the connection closes
    enter=_psycopg_autocommit,
    leave=_psycopg_pool_mode,
    paramstyle="format",
)


async def _asyncmy_rows(conn: Any, sql: str, args: tuple[Any, ...]) -> Sequence[Sequence[Any]]:
    async with conn.cursor() as cursor:
        await cursor.execute(sql, args)
        rows: Sequence[Sequence[Any]] = await cursor.fetchall()
        return rows


async def _asyncmy_count(conn: Any, sql: str, args: tuple[Any, ...]) -> int:
    async with conn.cursor() as cursor:
        return int(await cursor.execute(sql, args or None))


async def _asyncmy_many(conn: Any, sql: str, rows: list[tuple[Any, ...]]) -> None:
    async with conn.cursor() as cursor:
        if len(rows) == 1:  # (executemany cannot rewrite an ON DUPLICATE KEY with parameters)
            await cursor.execute(sql, rows[0])
        else:  # one multi-row INSERT for an INSERT ... VALUES
            await cursor.executemany(sql, rows)


def _asyncmy_is_closed(conn: Any) -> bool:
    # A connection the server closed (KILL, a restart, wait_timeout) shows it once a call
    # has read the end of its stream; one cancelled mid-read is closed by asyncmy itself.
    return not conn.connected or bool(conn._stream_broken)


# asyncmy (MariaDB, MySQL): the statements are sent as text with the arguments escaped into
# them by the driver (%s placeholders), one round trip each. Pooled connections are left out
# of autocommit (switching costs a round trip each way): a single statement is followed by
# COMMIT. Kept connections are switched to autocommit once, then cost one round trip a call.
_ASYNCMY = Driver(
    name="asyncmy",
    rows=_asyncmy_rows,
    count=_asyncmy_count,
    many=_asyncmy_many,
    in_transaction=lambda conn: bool(conn.get_transaction_status()),
    is_closed=_asyncmy_is_closed,
    settle=_nothing_to_settle,  # no client-side timeout of its own
    abandon=_nothing_to_abandon,  # the server ends the transaction when the connection closes
    enter=lambda conn: conn.autocommit(True),  # no round trip when already so
    leave=lambda conn: conn.autocommit(False),
    pooled_autocommit=False,
)

_DRIVERS = {driver.name: driver for driver in (_ASYNCPG, _AIOSQLITE, _PSYCOPG, _ASYNCMY)}


# Drivers SQLAlchemy offers that cannot store sessions, and why.
_REFUSED = {
    "aiomysql": (
        "aiomysql 0.3.2 fails on every bytes parameter (session values) with PyMySQL >= 1.2.3; "
        "use asyncmy (mysql+asyncmy://, the [mysql] extra)"
    ),
}


def check_driver(name: str) -> None:
    """Raise ``ValueError`` for a SQLAlchemy driver known not to work, saying why."""
    reason = _REFUSED.get(name)
    if reason is not None:
        raise ValueError(f"unsupported driver {name!r}: {reason}")


def driver_for(name: str) -> Driver | None:
    """The fast path for a SQLAlchemy driver name, or ``None``: the scripts then run through
    SQLAlchemy Core (see ``_execution``)."""
    return _DRIVERS.get(name)


async def _run(driver: Driver, conn: Any, statement: Statement, params: Params) -> Outcome:
    """Run one statement and return its rows or row count (0 when run once per row)."""
    if statement.rows is not None:
        rows = params[statement.rows]
        if rows:
            await driver.many(conn, statement.sql, [statement.args(row) for row in rows])
        return 0
    if statement.returns_rows:
        return await driver.rows(conn, statement.sql, statement.args(params))
    return await driver.count(conn, statement.sql, statement.args(params))


async def run_script(
    driver: Driver, conn: Any, begin: str, script: tuple[Statement, ...], params: Params
) -> Outcome:
    """Run ``script`` as one transaction on the driver connection ``conn``.

    A single statement runs alone (one round trip in autocommit); a longer script, or one
    statement run once per row, runs between ``begin`` and COMMIT. A script that fails is
    rolled back; one that is cancelled is abandoned (:attr:`Driver.abandon`), and its
    connection must be discarded.
    """
    if len(script) == 1 and script[0].rows is None:
        try:
            outcome = await _run(driver, conn, script[0], params)
        except asyncio.TimeoutError:
            await driver.settle(conn)
            raise
        if driver.in_transaction(conn):  # a driver outside autocommit began one implicitly
            await driver.count(conn, "COMMIT", ())
        return outcome
    await driver.count(conn, begin, ())
    try:
        for statement in script:
            outcome = await _run(driver, conn, statement, params)
        await driver.count(conn, "COMMIT", ())
    except Exception:
        if driver.in_transaction(conn):  # also waits out a statement the driver gave up on
            # A connection the server closed on the error (MySQL's max_allowed_packet) fails
            # the ROLLBACK: the error that ended the script is the one to report, and the
            # connection, still inside its transaction, is discarded.
            with contextlib.suppress(Exception):
                await driver.count(conn, "ROLLBACK", ())
        raise
    except asyncio.CancelledError:
        # The connection may still be busy with the statement the call was waiting for, so
        # the caller discards it; the driver ends the transaction first where it can. An
        # error doing so must not replace the cancellation.
        with contextlib.suppress(Exception):
            await driver.abandon(conn)
        raise
    return outcome
