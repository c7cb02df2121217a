"""How a call of :class:`~sessions_sql.SQLAlchemyBackend` runs: on which connection, in which
transaction, what is retried, and how failures are mapped.

An :class:`Executor` runs the scripts of one ``_dialects.Dialect`` on an engine. On a driver
with a fast path (``_drivers``: asyncpg, psycopg, aiosqlite, asyncmy) each script is
compiled once and sent with the driver's own calls on a connection checked out of the
engine's pool, or kept between calls (``_Kept``, engines the backend owns); on any other
driver the Core statements run through SQLAlchemy on a pooled connection in autocommit.
Either way a single statement is its own transaction (one round trip; on asyncmy's pooled
connections followed by COMMIT), a longer script runs between an explicit BEGIN and COMMIT.
What may be retried: a stale connection, PostgreSQL's foreign-key race, deadlocks the server
broke (InnoDB's, and Citus's false ones) and InnoDB's lock wait timeouts. Bound to a host's
connection (``using()``), the scripts run on its SQLAlchemy connection, in its transaction,
instead. Database errors become :class:`BackendError` with the driver's exception chained.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import copy
import random
import time
import weakref
from collections.abc import Awaitable, Callable
from typing import Any, TypeVar

from sqlalchemy import event
from sqlalchemy.engine import Connection
from sqlalchemy.exc import DBAPIError, StatementError
from sqlalchemy.exc import TimeoutError as PoolTimeoutError
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine, AsyncSession
from sqlalchemy.pool import PoolProxiedConnection
from sqlalchemy.util import await_only, greenlet_spawn

from ._dialects import Dialect, Many, Params, Script
from ._drivers import Driver, Outcome, Statement, compile_script, driver_for, run_script
from ._protocol import BackendError

__all__ = ["Executor", "LoopLock", "backend_error"]

_T = TypeVar("_T")

# A write racing the removal of its session can fail its foreign-key check (the session
# row vanished after the statement's snapshot); running it again creates the session anew.
_FOREIGN_KEY_VIOLATION = "23503"
# InnoDB (MariaDB, MySQL) ended a transaction it found in a deadlock (1213), or a statement
# that waited for a lock too long (1205; the script then rolls back): running it again is
# safe, after a short random pause that lets the transaction that won finish.
_MYSQL_RETRIED = {1213, 1205}
# The same on PostgreSQL (40P01). The package's lock order leaves no deadlock there, but
# Citus's distributed deadlock detector reports false ones: it counts every single-statement
# transaction the coordinator sends a worker as one transaction (citusdata/citus#1803), so a
# write waiting for one removal while another removal waits for the write looks like a cycle.
_DEADLOCK_DETECTED = "40P01"
_RETRY_ATTEMPTS = 10
_RETRY_PAUSE = 0.005  # seconds, at most, times the attempt number
# MySQL error 1153: a statement (a value) larger than the server's max_allowed_packet.
_PACKET_TOO_LARGE = 1153
_PACKET_HINT = (
    "; the statement is larger than the server's max_allowed_packet: raise max_allowed_packet "
    "on the server, or store smaller values"
)

# When the pool opened a connection (kept in its pool record's ``info``): a connection found
# closed that is older than the call was dropped by the server while it sat in the pool (a
# restart, an idle timeout), and the call is retried on another one.
_CONNECTED_AT = "sessions_sql.connected_at"


class LoopLock:
    """An ``asyncio.Lock`` per running event loop, usable as ``async with lock:``.

    A plain ``asyncio.Lock`` belongs to the first loop that waits on it; objects that may be
    used from several loops (one per test, say) take one per loop instead.
    """

    def __init__(self) -> None:
        self._locks: weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, asyncio.Lock] = (
            weakref.WeakKeyDictionary()
        )

    def _lock(self) -> asyncio.Lock:
        loop = asyncio.get_running_loop()
        lock = self._locks.get(loop)
        if lock is None:
            lock = self._locks[loop] = asyncio.Lock()
        return lock

    async def __aenter__(self) -> None:
        await self._lock().acquire()

    async def __aexit__(self, *exc_info: object) -> None:
        self._lock().release()


# A prepared statement missing, or there twice, on the server connection: the client's
# connections do not own their server connections (PgBouncer in transaction mode).
_PREPARED_STATEMENT_MIXUP = {"26000", "42P05"}
_POOLER_HINT = (
    "; prepared statements were not found on the server connection, as behind PgBouncer in "
    "transaction mode: connect with statement_cache_size=0 (asyncpg: "
    'connect_args={"statement_cache_size": 0}) or prepare_threshold=None (psycopg)'
)


def backend_error(operation: str, error: Exception) -> BackendError:
    """A BackendError for a failed operation; the message names no id, key or value."""
    if isinstance(error, StatementError):
        # The chained exception must not print the statement's parameters (ids, values).
        error.hide_parameters = True
    if isinstance(error, PoolTimeoutError):
        reason = "connection pool exhausted: no connection became free within the pool timeout"
    else:
        orig = getattr(error, "orig", None) or error
        reason = f"the database raised {type(orig).__name__}"
        sqlstate = _sqlstate(error)
        if sqlstate:
            reason += f" (SQLSTATE {sqlstate})"
        # (08P01: a protocol violation, here "bind message supplies N parameters, but
        # prepared statement ... requires M": another client's statement of the same name.)
        mixup = sqlstate in _PREPARED_STATEMENT_MIXUP
        if mixup or (sqlstate == "08P01" and "prepared statement" in str(orig)):
            reason += _POOLER_HINT
        errno = _mysql_errno(error)
        if errno is not None:
            reason += f" (MySQL error {errno})"
        if errno == _PACKET_TOO_LARGE:
            reason += _PACKET_HINT
    return BackendError(f"{operation} failed: {reason}")


class _Kept:
    """Connections a backend keeps checked out of its own engine's pool between calls.

    A call takes the most recently used idle one; if none is idle it checks a new one out of
    the pool, or, with ``pool_size`` of them kept already, waits in line. A connection given
    back goes straight to the first caller in line (never to one that arrives later, which
    would starve the line while other calls keep the connections busy), and a connection
    discarded passes its place in the pool to it. A busy backend so pays no pool checkout and
    no greenlet switch per call. For an engine the backend owns (the host's pool is never
    held); a kept connection the server closed while it sat idle (a restart, an idle timeout)
    is discarded on its next use and the call retried on another. ``close`` returns them to
    the pool.
    """

    def __init__(
        self, engine: AsyncEngine, leave: Callable[[Any], Awaitable[object]] | None
    ) -> None:
        self._engine = engine
        self._leave = leave  # puts a connection back as the pool had it (Driver.leave)
        self._idle: list[PoolProxiedConnection] = []  # only while nobody waits
        pool_size = getattr(engine.sync_engine.pool, "size", None)  # StaticPool: one
        self._limit = pool_size() if pool_size is not None else 1
        self._count = 0  # connections kept, in use or idle, or being opened
        # Callers in line; each gets a connection, or None: "open one in the place freed".
        self._waiters: collections.deque[asyncio.Future[PoolProxiedConnection | None]] = (
            collections.deque()
        )

    def take_idle(self) -> PoolProxiedConnection | None:
        """The most recently used idle connection, if there is one."""
        return self._idle.pop() if self._idle else None

    async def take(self) -> PoolProxiedConnection:
        """An idle connection, a new one, or the one given back to the first in line."""
        if self._idle:
            return self._idle.pop()
        if self._count < self._limit:
            self._count += 1
            return await self._open()
        waiter: asyncio.Future[PoolProxiedConnection | None]
        waiter = asyncio.get_running_loop().create_future()
        self._waiters.append(waiter)
        try:
            connection = await waiter
        except BaseException:
            if waiter.done() and not waiter.cancelled():  # served, then cancelled: pass it on
                served = waiter.result()
                if served is None:
                    self._lost()
                else:
                    self.give_back(served)
            raise
        return connection if connection is not None else await self._open()

    async def _open(self) -> PoolProxiedConnection:
        """Check a new connection out of the pool, in a place already counted."""
        try:
            return await greenlet_spawn(self._engine.sync_engine.raw_connection)
        except BaseException:
            self._lost()
            raise

    def give_back(self, connection: PoolProxiedConnection) -> None:
        if not self._serve(connection):
            self._idle.append(connection)

    async def discard(self, connection: PoolProxiedConnection, error: BaseException) -> None:
        try:
            await greenlet_spawn(_invalidate, connection, error)
        finally:
            self._lost()

    def _lost(self) -> None:
        """A place in the pool was freed: the first in line opens a connection in it."""
        if not self._serve(None):
            self._count -= 1

    def _serve(self, connection: PoolProxiedConnection | None) -> bool:
        """Hand ``connection`` to the first caller still waiting; whether there was one."""
        while self._waiters:
            waiter = self._waiters.popleft()
            if not waiter.done():
                waiter.set_result(connection)
                return True
        return False

    async def close(self) -> None:
        idle, self._idle = self._idle, []
        self._count -= len(idle)
        if self._leave is not None:
            for connection in idle:
                await self._leave(connection.driver_connection)
        await greenlet_spawn(_close_each, idle)


class _StaleConnection(Exception):
    """A pooled connection opened before the call was found closed (a server restart)."""


class _Variant:
    """The variant of an executor's dialect that its database needs (``Dialect.variant``),
    found on the first call and shared with the executor's bound copies."""

    def __init__(self, sql: Dialect) -> None:
        self.sql = sql
        #: Looks the variant up; ``None`` once it was looked up.
        self.find = sql.variant
        #: The variant's script of each script of the dialect, if there is a variant.
        self.scripts: dict[Script, Script] = {}
        self.lock = LoopLock()


class Executor:
    """Runs the scripts of ``sql`` on ``engine``, in the tables of ``schema``; on the first
    call, switches to the variant of ``sql`` the database needs, if any (Citus)."""

    def __init__(self, engine: AsyncEngine, sql: Dialect, schema: str | None) -> None:
        self._engine = engine
        self._sql = sql
        self._schema = schema
        self._variant = _Variant(sql)
        self._driver = driver_for(engine.dialect.driver)
        self._compiled: dict[Script, tuple[Statement, ...]] = {}
        self._compile(sql)
        # This process's writes queue here on a database with a single writer (SQLite).
        self._write_lock = LoopLock() if sql.single_writer else None
        self._kept: _Kept | None = None
        # The host's connection (see bound()).
        self._bound: AsyncConnection | AsyncSession | None = None
        # Options of the Core statements (on the host's connection, or without a fast path).
        self._options: dict[str, Any] = {}
        if schema is not None:
            self._options["schema_translate_map"] = {None: schema}
        if not event.contains(engine.sync_engine, "connect", _note_connect_time):
            event.listen(engine.sync_engine, "connect", _note_connect_time)

    def _compile(self, sql: Dialect) -> None:
        """Compile the scripts of ``sql`` for the driver's fast path, if it has one."""
        if self._driver is not None:
            dialect: Any = self._engine.dialect
            if self._driver.paramstyle is not None:  # the same dialect, other placeholders
                dialect = type(dialect)(paramstyle=self._driver.paramstyle)
            for script in sql.scripts():
                self._compiled[script] = compile_script(script, dialect, self._schema)

    @property
    def dialect(self) -> Dialect:
        """The statements in use: the dialect's, or its variant's once found."""
        return self._variant.sql

    async def _find_variant(self) -> None:
        """Look up the dialect's variant on a connection (the host's when bound), once."""
        variant = self._variant
        async with variant.lock:
            if variant.find is None:
                return
            if self._bound is not None:
                bound = self._bound
                conn = await bound.connection() if isinstance(bound, AsyncSession) else bound
                found = await conn.run_sync(variant.find, self._schema)
            else:
                found = await self._look_up(variant.find)
            if found is not None:
                self._compile(found)
                variant.scripts.update(self._sql.scripts_of(found))
                variant.sql = found
            variant.find = None

    async def _look_up(self, find: Callable[[Connection, str | None], Dialect | None]) -> Any:
        """``find`` on a pooled connection; once more on a new one if that connection had
        gone stale in the pool (a server restart), as the calls themselves retry."""
        try:
            async with self._engine.connect() as conn:
                return await conn.run_sync(find, self._schema)
        except DBAPIError as error:
            if not error.connection_invalidated:
                raise
        async with self._engine.connect() as conn:
            return await conn.run_sync(find, self._schema)

    def keep_connections(self) -> None:
        """Keep connections checked out between calls (for an engine of our own whose driver
        has a fast path)."""
        if self._driver is not None:
            self._kept = _Kept(self._engine, self._driver.leave)

    def bound(self, connection: AsyncConnection | AsyncSession) -> Executor:
        """An executor running the scripts inside ``connection``'s transaction."""
        bound = copy.copy(self)
        bound._bound = connection
        return bound

    @property
    def is_bound(self) -> bool:
        return self._bound is not None

    def compiled(self, script: Script) -> tuple[Statement, ...]:
        """The statements of ``script`` as the driver receives them."""
        return self._compiled[script]

    async def close(self) -> None:
        """Give the kept connections back to the pool."""
        if self._kept is not None:
            await self._kept.close()

    async def run(
        self,
        operation: str,
        script: Script,
        params: Params,
        fetch: Callable[[Any], _T],
    ) -> _T:
        """Run ``script`` in one transaction and return ``fetch`` of its outcome.

        The checkout, the script and the return to the pool run in one greenlet (one switch
        per call, not one per statement); retries what is safe to retry; maps errors.
        """
        if self._variant.find is not None:
            try:
                await self._find_variant()
            except BackendError:
                raise
            except Exception as error:  # the database or driver: the next call looks again
                raise backend_error(operation, error) from error
        if self._variant.scripts:
            script = self._variant.scripts[script]
        if self._bound is not None:
            return await self._run_bound(operation, self._bound, script, params, fetch)
        if self._write_lock is not None and getattr(script[0], "is_dml", False):
            async with self._write_lock:
                return await self._run_pooled(operation, script, params, fetch)
        return await self._run_pooled(operation, script, params, fetch)

    async def _run_pooled(
        self, operation: str, script: Script, params: Params, fetch: Callable[[Any], _T]
    ) -> _T:
        started = time.monotonic()
        attempt = 0
        while True:
            attempt += 1
            try:
                if self._driver is None:
                    return fetch(await greenlet_spawn(self._on_core, script, params))
                if self._kept is not None:
                    outcome = await self._on_kept(self._kept, self._driver, script, params, started)
                    return fetch(outcome)
                return fetch(await greenlet_spawn(self._pooled, self._driver, script, params))
            except _StaleConnection as stale:
                # Every operation is idempotent: a connection the server dropped while it sat
                # in the pool is discarded and the call runs again on the next one. (A server
                # refusing a statement over max_allowed_packet closes the connection too.)
                cause = stale.__cause__
                if isinstance(cause, Exception) and _mysql_errno(cause) == _PACKET_TOO_LARGE:
                    raise backend_error(operation, cause) from cause
                continue
            except Exception as error:  # input is checked: anything here is the database or driver
                if attempt < _RETRY_ATTEMPTS:
                    if _sqlstate(error) == _FOREIGN_KEY_VIOLATION:
                        continue
                    if (
                        _mysql_errno(error) in _MYSQL_RETRIED
                        or _sqlstate(error) == _DEADLOCK_DETECTED
                    ):
                        await asyncio.sleep(random.uniform(0, _RETRY_PAUSE * attempt))
                        continue
                raise backend_error(operation, error) from error

    def _on_core(self, script: Script, params: Params) -> Outcome:
        """Run the Core statements on a pooled connection in autocommit, through SQLAlchemy
        (its statement events and logging see them); in a greenlet."""
        checkout = time.monotonic()
        with self._engine.sync_engine.connect() as conn:
            # Read before running: an invalidated connection no longer has its record.
            opened = conn.info.get(_CONNECTED_AT, 0.0)
            try:
                # Switched here, not by the engine's checkout: a call cancelled while the
                # driver switches it (a round trip on MySQL drivers) must still give the
                # connection back (an engine's checkout cancelled there leaks it).
                conn.execution_options(isolation_level="AUTOCOMMIT")
                return _execute_alone(conn, script, params, self._options, self._sql.begin)
            except DBAPIError as error:
                if error.connection_invalidated and opened < checkout:
                    raise _StaleConnection from error
                raise
            except BaseException as error:
                if not isinstance(error, Exception):  # cancelled mid-call: the driver may be busy
                    conn.invalidate(error)
                raise

    def _pooled(self, driver: Driver, script: Script, params: Params) -> Outcome:
        """Check a connection out of the engine's pool, run the compiled script on it and
        check it back in (in a greenlet: the pool may wait or connect)."""
        checkout = time.monotonic()
        pooled = self._engine.sync_engine.raw_connection()
        conn = pooled.driver_connection
        switch = driver.pooled_autocommit
        try:
            if switch and driver.enter is not None:
                await_only(driver.enter(conn))
            outcome = await_only(
                run_script(driver, conn, self._sql.begin, self._compiled[script], params)
            )
            if switch and driver.leave is not None:
                await_only(driver.leave(conn))
            return outcome
        except BaseException as error:
            if self._unusable(driver, conn, error):
                stale = driver.is_closed(conn)
                stale = stale and pooled.info.get(_CONNECTED_AT, 0.0) < checkout
                pooled.invalidate(error)
                if stale:
                    raise _StaleConnection from error
            elif switch and driver.leave is not None:
                await_only(driver.leave(conn))
            raise
        finally:
            pooled.close()

    async def _on_kept(
        self, kept: _Kept, driver: Driver, script: Script, params: Params, started: float
    ) -> Outcome:
        """Run the compiled script on a kept connection (one opened before the call started
        and found closed is stale: the call is retried)."""
        connection = kept.take_idle() or await kept.take()
        conn = connection.driver_connection
        try:
            if driver.enter is not None:  # and it stays so while kept
                await driver.enter(conn)
            outcome = await run_script(
                driver, conn, self._sql.begin, self._compiled[script], params
            )
        except BaseException as error:
            if self._unusable(driver, conn, error):
                stale = isinstance(error, Exception) and driver.is_closed(conn)
                stale = stale and connection.info.get(_CONNECTED_AT, 0.0) < started
                await kept.discard(connection, error)
                if stale:
                    raise _StaleConnection from error
            else:
                kept.give_back(connection)
            raise
        kept.give_back(connection)
        return outcome

    @staticmethod
    def _unusable(driver: Driver, conn: Any, error: BaseException) -> bool:
        """Interrupted mid-call (cancelled), closed, or left inside a transaction: the
        connection cannot serve another call as it is."""
        return (
            not isinstance(error, Exception)
            or driver.is_closed(conn)
            or driver.in_transaction(conn)
        )

    async def _run_bound(
        self,
        operation: str,
        bound: AsyncConnection | AsyncSession,
        script: Script,
        params: Params,
        fetch: Callable[[Any], _T],
    ) -> _T:
        """Run ``script`` in the host's transaction (begun if it was not), committing nothing."""
        try:
            conn = await bound.connection() if isinstance(bound, AsyncSession) else bound
            outcome = await greenlet_spawn(
                _execute, conn.sync_connection, script, params, self._options
            )
            return fetch(outcome)
        except Exception as error:  # input is checked: anything here is the database or driver
            raise backend_error(operation, error) from error


def _execute(
    conn: Connection | None, script: Script, params: Params, options: dict[str, Any]
) -> Outcome:
    assert conn is not None
    outcome: Outcome = 0
    for statement in script:
        if isinstance(statement, Many):
            rows = params[statement.rows]
            if rows:
                conn.execute(statement.statement, rows, execution_options=options)
            outcome = 0
            continue
        result = conn.execute(statement, params, execution_options=options)
        outcome = result.all() if result.returns_rows else result.rowcount
    return outcome


def _execute_alone(
    conn: Connection, script: Script, params: Params, options: dict[str, Any], begin: str
) -> Outcome:
    """Run ``script`` as its own transaction on ``conn`` (in autocommit): a single statement
    alone, anything else between ``begin`` and COMMIT."""
    if len(script) == 1 and not isinstance(script[0], Many):
        return _execute(conn, script, params, options)
    conn.exec_driver_sql(begin)
    try:
        outcome = _execute(conn, script, params, options)
    except Exception:
        if not conn.invalidated:  # a broken connection is discarded, nothing to roll back
            with contextlib.suppress(DBAPIError):
                conn.exec_driver_sql("ROLLBACK")
        raise
    conn.exec_driver_sql("COMMIT")
    return outcome


def _sqlstate(error: BaseException) -> str | None:
    """The SQLSTATE of a driver's error, raised by the driver or wrapped by SQLAlchemy."""
    for candidate in (error, getattr(error, "orig", None)):
        sqlstate = getattr(candidate, "sqlstate", None)
        if isinstance(sqlstate, str):
            return sqlstate
    return None


def _mysql_errno(error: BaseException) -> int | None:
    """The MySQL/MariaDB error number of a driver's error (its first argument), if any."""
    orig = getattr(error, "orig", None) or error
    module = type(orig).__module__
    if not module.startswith(("asyncmy", "pymysql", "aiomysql", "MySQLdb")):
        return None
    args = getattr(orig, "args", ())
    return args[0] if args and isinstance(args[0], int) else None


def _invalidate(connection: PoolProxiedConnection, error: BaseException) -> None:
    connection.invalidate(error)
    connection.close()


def _close_each(connections: list[PoolProxiedConnection]) -> None:
    for connection in connections:
        connection.close()


def _note_connect_time(dbapi_connection: Any, connection_record: Any) -> None:
    connection_record.info[_CONNECTED_AT] = time.monotonic()
