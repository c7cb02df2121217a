"""SQLAlchemyBackend: the session protocol on an SQLAlchemy 2 ``AsyncEngine``.

Each call validates its input, then runs one script of ``_dialects``, compiled once, on a
connection checked out of the engine's pool, through the driver's own calls (``_drivers``):
a single statement is its own transaction (one round trip), a longer script runs between an
explicit BEGIN and COMMIT. Inside a host's transaction (:meth:`SQLAlchemyBackend.using`)
the scripts run on the host's SQLAlchemy connection instead. Database errors become
:class:`BackendError` with the driver's exception chained.
"""

from __future__ import annotations

import asyncio
import calendar
import collections
import copy
import time
import weakref
from collections.abc import AsyncIterator, Callable, Iterable, Mapping
from datetime import datetime
from types import TracebackType
from typing import Any, Literal, TypeVar

from sqlalchemy import event
from sqlalchemy.engine import URL, Connection, make_url
from sqlalchemy.exc import SQLAlchemyError, StatementError
from sqlalchemy.exc import TimeoutError as PoolTimeoutError
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine, AsyncSession, create_async_engine
from sqlalchemy.pool import AsyncAdaptedQueuePool, PoolProxiedConnection
from sqlalchemy.util import await_only, greenlet_spawn

from ._dialects import Many, Params, Script, dialect_for
from ._drivers import Outcome, Statement, compile_script, driver_for, run_script
from ._protocol import (
    KEEP,
    BackendError,
    Expiry,
    Keep,
    SessionSnapshot,
    check_batch_size,
    check_cutoff,
    check_expires_at,
    check_key,
    check_keys,
    check_now,
    check_session_id,
    check_value,
    check_values,
)
from .models import Base

__all__ = ["SQLAlchemyBackend"]

_T = TypeVar("_T")

# A write racing the removal of its session can fail its foreign-key check (the session
# row vanished after the statement's snapshot); running it again creates the session anew.
_FOREIGN_KEY_VIOLATION = "23503"
_FOREIGN_KEY_ATTEMPTS = 5

# When the pool opened a connection (kept in its pool record's ``info``): a connection found
# closed that is older than the call was dropped by the server while it sat in the pool (a
# restart, an idle timeout), and the call is retried on another one.
_CONNECTED_AT = "sessions_sql.connected_at"

#: Default number of sessions deleted per statement and transaction by the collector.
DEFAULT_BATCH_SIZE = 5000


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


def unix_seconds(created_at: datetime | str) -> int:
    """Whole Unix seconds of a creation time: a datetime (naive means UTC) or the UTC text
    SQLite stores (``YYYY-MM-DD HH:MM:SS``), which its driver returns as it is."""
    if isinstance(created_at, str):
        created_at = datetime.fromisoformat(created_at)
    return calendar.timegm(created_at.utctimetuple())


def _backend_error(operation: str, error: Exception) -> BackendError:
    """A BackendError for a failed operation; the message names no id, key or value."""
    if isinstance(error, StatementError):
        # The chained exception must not print the statement's parameters (ids, values).
        error.hide_parameters = True
    if isinstance(error, PoolTimeoutError):
        reason = "connection pool exhausted: no connection became free within the pool timeout"
    else:
        orig = getattr(error, "orig", None) or error
        reason = f"the database raised {type(orig).__name__}"
        sqlstate = getattr(orig, "sqlstate", None)
        if sqlstate:
            reason += f" (SQLSTATE {sqlstate})"
    return BackendError(f"{operation} failed: {reason}")


class _Kept:
    """Connections a backend keeps checked out of its own engine's pool between calls.

    A call takes the most recently used idle one; if none is idle it checks a new one out of
    the pool, or, with ``pool_size`` of them kept already, waits until a call gives one back.
    A busy backend so pays no pool checkout and no greenlet switch per call. For an engine the
    backend owns, whose connections cannot go stale (SQLite: a thread over a local file);
    ``close`` returns them to the pool.
    """

    def __init__(self, engine: AsyncEngine) -> None:
        self._engine = engine
        self._idle: list[PoolProxiedConnection] = []
        pool_size = getattr(engine.sync_engine.pool, "size", None)  # StaticPool: one
        self._limit = pool_size() if pool_size is not None else 1
        self._count = 0
        self._waiters: collections.deque[asyncio.Future[None]] = collections.deque()

    def take_idle(self) -> PoolProxiedConnection | None:
        """The most recently used idle connection, if there is one."""
        return self._idle.pop() if self._idle else None

    async def take(self) -> PoolProxiedConnection:
        """An idle connection, a new one, or the next one given back."""
        while not self._idle:
            if self._count < self._limit:
                self._count += 1
                try:
                    return await greenlet_spawn(self._engine.sync_engine.raw_connection)
                except BaseException:
                    self._lost()
                    raise
            waiter = asyncio.get_running_loop().create_future()
            self._waiters.append(waiter)
            try:
                await waiter
            except BaseException:
                if waiter.done() and not waiter.cancelled():
                    self._wake()  # woken, then cancelled: pass the turn on
                raise
        return self._idle.pop()

    def give_back(self, connection: PoolProxiedConnection) -> None:
        self._idle.append(connection)
        self._wake()

    async def discard(self, connection: PoolProxiedConnection, error: BaseException) -> None:
        try:
            await greenlet_spawn(_invalidate, connection, error)
        finally:
            self._lost()

    def _lost(self) -> None:
        self._count -= 1
        self._wake()

    def _wake(self) -> None:
        while self._waiters:
            waiter = self._waiters.popleft()
            if not waiter.done():
                waiter.set_result(None)
                return

    async def close(self) -> None:
        idle, self._idle = self._idle, []
        self._count -= len(idle)
        await greenlet_spawn(_close_each, idle)


class _StaleConnection(Exception):
    """A pooled connection opened before the call was found closed (a server restart)."""


# What a call reads from the outcome of its script: the rows of the last statement, or the
# number of rows it changed.


def _nothing(outcome: Outcome) -> None:
    return None


def _scalar(rows: Any) -> Any:
    return rows[0][0] if rows else None


def _scalars(rows: Any) -> list[Any]:
    return [row[0] for row in rows]


def _pairs(rows: Any) -> dict[Any, Any]:
    return {row[0]: row[1] for row in rows}


def _rows(rows: Any) -> Any:
    return rows


def _time(moment: datetime | str | None) -> int | None:
    return None if moment is None else unix_seconds(moment)


def _rowcount(count: Any) -> int:
    return int(count)


class SQLAlchemyBackend:
    """Sessions stored in the ``sessions`` and ``session_values`` tables of a SQL database.

    Works on PostgreSQL (asyncpg) and SQLite (aiosqlite). The tables must exist: create
    them with :func:`sessions_sql.migrate` (or :meth:`create_all` in tests). No DDL runs
    implicitly. The engine's pool is shared; each call checks out a connection for one
    short transaction.
    """

    def __init__(
        self,
        engine: AsyncEngine,
        *,
        schema: str | None = None,
        max_value_bytes: int | None = None,
    ) -> None:
        """Use ``engine`` (owned by the caller, who disposes of it).

        ``schema`` places the tables in that PostgreSQL schema; ``max_value_bytes``
        refuses larger values with ``ValueError``.
        """
        if not isinstance(engine, AsyncEngine):
            raise TypeError(f"engine must be an AsyncEngine, not {type(engine).__name__}")
        if schema is not None:
            if not isinstance(schema, str) or not schema:
                raise ValueError("schema must be a non-empty str or None")
            if engine.dialect.name != "postgresql":
                raise ValueError("schema is supported on PostgreSQL only")
        if max_value_bytes is not None and (
            not isinstance(max_value_bytes, int)
            or isinstance(max_value_bytes, bool)
            or max_value_bytes < 0
        ):
            raise ValueError("max_value_bytes must be a non-negative int or None")
        self._engine = engine
        self._sql = dialect_for(engine.dialect.name)
        self._driver = driver_for(engine.dialect.driver)
        self._schema = schema
        self._max_value_bytes = max_value_bytes
        self._owns_engine = False
        # Options of the statements run inside a host's transaction (see using()).
        self._bound: AsyncConnection | AsyncSession | None = None
        self._bound_options: dict[str, Any] = {}
        if schema is not None:
            self._bound_options["schema_translate_map"] = {None: schema}
        self._write_lock = LoopLock() if self._sql.single_writer else None
        self._kept: _Kept | None = None
        if not event.contains(engine.sync_engine, "connect", _note_connect_time):
            event.listen(engine.sync_engine, "connect", _note_connect_time)
        self._compiled: dict[Script, tuple[Statement, ...]] = {
            script: compile_script(script, engine.dialect, schema) for script in self._sql.scripts()
        }

    @classmethod
    def from_url(
        cls,
        url: str | URL,
        *,
        schema: str | None = None,
        max_value_bytes: int | None = None,
        **engine_kw: Any,
    ) -> SQLAlchemyBackend:
        """Create a backend owning a new engine for ``url``; close it with :meth:`close`.

        ``engine_kw`` go to :func:`~sqlalchemy.ext.asyncio.create_async_engine`; unless given,
        ``hide_parameters=True`` keeps session ids and values out of SQLAlchemy's logs and
        error messages, and on PostgreSQL ``pool_use_lifo=True`` reuses the most recently used
        connection (its server process is the one whose caches are warm; spare connections
        can time out). A SQLite file database is switched to WAL mode so that readers do not
        wait for writers.
        """
        url = make_url(url)
        sqlite = url.get_backend_name() == "sqlite"
        engine_kw.setdefault("hide_parameters", True)
        if "poolclass" not in engine_kw:
            if not sqlite:
                engine_kw.setdefault("pool_use_lifo", True)
            elif url.database not in (None, "", ":memory:"):
                # The backend keeps its SQLite connections (see _Kept): a queue pool bounds
                # them by pool_size (SQLAlchemy 2.0 would give a file a NullPool, unbounded).
                engine_kw["poolclass"] = AsyncAdaptedQueuePool
        always_autocommit = sqlite and "isolation_level" not in engine_kw
        if always_autocommit:
            # Switching a SQLite connection's isolation level costs several trips to the
            # driver's thread on every checkout and return. An engine of our own can stay in
            # autocommit (Alembic runs SQLite DDL outside transactions anyway) and needs no
            # reset on return: every script ends with its own COMMIT or ROLLBACK.
            engine_kw.update(isolation_level="AUTOCOMMIT", pool_reset_on_return=None)
        engine = create_async_engine(url, **engine_kw)
        on_connect = dialect_for(engine.dialect.name).on_connect
        if on_connect is not None:
            event.listen(engine.sync_engine, "connect", on_connect)
        try:
            backend = cls(engine, schema=schema, max_value_bytes=max_value_bytes)
        except BaseException:
            engine.sync_engine.dispose()
            raise
        backend._owns_engine = True
        if always_autocommit:
            backend._kept = _Kept(engine)
        return backend

    @property
    def engine(self) -> AsyncEngine:
        """The engine this backend runs on."""
        return self._engine

    @property
    def schema(self) -> str | None:
        """The PostgreSQL schema holding the tables, or ``None`` for the default."""
        return self._schema

    async def close(self) -> None:
        """Dispose of the engine if this backend created it (``from_url``); else do nothing."""
        if self._owns_engine:
            if self._kept is not None:
                await self._kept.close()
            await self._engine.dispose()

    async def __aenter__(self) -> SQLAlchemyBackend:
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.close()

    def __repr__(self) -> str:
        bound = ", in a host transaction" if self._bound is not None else ""
        return f"SQLAlchemyBackend(dialect={self._sql.name!r}, schema={self._schema!r}{bound})"

    def using(self, connection: AsyncConnection | AsyncSession) -> SQLAlchemyBackend:
        """Return a backend whose calls run inside ``connection``'s current transaction.

        ``connection`` is the host's ``AsyncConnection`` or ``AsyncSession``; nothing is
        committed or rolled back by the returned backend, so the host's own writes and the
        session writes commit or roll back as one. Calls are not retried there: after a
        database error the host's transaction is what must be retried.
        """
        if not isinstance(connection, (AsyncConnection, AsyncSession)):
            raise TypeError(
                "connection must be an AsyncConnection or AsyncSession, "
                f"not {type(connection).__name__}"
            )
        bound = copy.copy(self)
        bound._bound = connection
        bound._owns_engine = False
        return bound

    async def create_all(self) -> None:
        """Create the tables directly, without migrations: for tests and prototypes only.

        Applications create them with :func:`sessions_sql.migrate` so that the schema stays
        under Alembic's control.
        """
        try:
            async with self._engine.begin() as conn:
                if self._schema is not None:
                    conn = await conn.execution_options(schema_translate_map={None: self._schema})
                await conn.run_sync(Base.metadata.create_all)
        except (SQLAlchemyError, OSError) as error:
            raise _backend_error("create_all", error) from error

    # The six protocol methods.

    async def get_sessions(self) -> list[str]:
        """Return the ids of all sessions (with or without values), in any order.

        For many sessions prefer :meth:`iter_sessions`, which pages through them.
        """
        return await self._run("get_sessions", self._sql.get_sessions, {}, _scalars)

    async def get_session_age(self, session_id: str) -> int | None:
        """Return the session's creation time in whole Unix seconds (UTC), or ``None``.

        A timestamp, not an age (the name comes from the original protocol).
        """
        params = {"sid": check_session_id(session_id)}
        created_at = await self._run("get_session_age", self._sql.get_session_age, params, _scalar)
        return None if created_at is None else unix_seconds(created_at)

    async def remove_session(self, session_id: str) -> None:
        """Remove the session and all its values; a missing session is not an error."""
        params = {"sid": check_session_id(session_id)}
        await self._run("remove_session", self._sql.remove_session, params, _nothing)

    async def read_value(self, session_id: str, key: str) -> bytes | None:
        """Return the value under ``key``, or ``None`` if the session or the key is missing."""
        params = {"sid": check_session_id(session_id), "key": check_key(key)}
        value: bytes | None = await self._run("read_value", self._sql.read_value, params, _scalar)
        return value

    async def write_value(
        self,
        session_id: str,
        key: str,
        value: bytes,
        *,
        expires_at: Expiry | Literal[Keep.KEEP] = KEEP,
    ) -> None:
        """Insert or replace one value, creating the session if it does not exist.

        ``expires_at`` (int Unix seconds or an aware datetime; ``None`` clears it) sets the
        session's expiry in the same statement; left out, the expiry stays as it is.
        """
        params = {
            "sid": check_session_id(session_id),
            "key": check_key(key),
            "value": check_value(value, self._max_value_bytes),
            "create": True,
            **self._expiry_params(expires_at),
        }
        await self._run("write_value", self._sql.write_value, params, _nothing)

    async def remove_value(self, session_id: str, key: str) -> None:
        """Remove one value; missing session or key is not an error, the session stays."""
        params = {"sid": check_session_id(session_id), "key": check_key(key)}
        await self._run("remove_value", self._sql.remove_value, params, _nothing)

    # Batch helpers.

    async def read_values(self, session_id: str) -> dict[str, bytes]:
        """Return all values of a session as a dict (empty if the session is missing)."""
        params = {"sid": check_session_id(session_id)}
        return await self._run("read_values", self._sql.read_values, params, _pairs)

    async def write_values(
        self,
        session_id: str,
        values: Mapping[str, bytes],
        *,
        expires_at: Expiry | Literal[Keep.KEEP] = KEEP,
    ) -> None:
        """Insert or replace several values at once, atomically, creating the session if
        needed. An empty mapping writes nothing and creates no session. ``expires_at`` as
        for :meth:`write_value`."""
        sid = check_session_id(session_id)
        checked = check_values(values, self._max_value_bytes)
        await self._update("write_values", sid, checked, [], self._expiry_params(expires_at))

    async def remove_values(self, session_id: str, keys: Iterable[str]) -> None:
        """Remove several values at once, atomically; missing keys are ignored."""
        sid = check_session_id(session_id)
        checked = check_keys(keys)
        if not checked:
            return
        params = self._sql.remove_values_params(sid, checked)
        await self._run("remove_values", self._sql.remove_values, params, _nothing)

    # Session expiry.

    async def update_session(
        self,
        session_id: str,
        values: Mapping[str, bytes] | None = None,
        *,
        remove: Iterable[str] = (),
        expires_at: Expiry | Literal[Keep.KEEP] = KEEP,
    ) -> None:
        """Write ``values``, remove the keys ``remove`` and set the expiry, atomically: what
        a web request changed, saved in one statement on PostgreSQL.

        Writing values creates the session if needed; removing keys or setting the expiry
        alone never creates one. ``expires_at`` left out keeps the expiry, ``None`` clears
        it. A key may not be both written and removed.
        """
        sid = check_session_id(session_id)
        checked = check_values({} if values is None else values, self._max_value_bytes)
        removed = check_keys(remove, what="remove")
        if not checked.keys().isdisjoint(removed):
            raise ValueError("a key cannot be both written and removed in one update_session")
        await self._update("update_session", sid, checked, removed, self._expiry_params(expires_at))

    async def _update(
        self,
        operation: str,
        sid: str,
        values: dict[str, bytes],
        remove: list[str],
        expiry: dict[str, Any],
    ) -> None:
        if not values and not remove and not expiry["set_expiry"]:
            return  # nothing to do: no statement, and no session created
        params = self._sql.update_params(
            sid, values, remove, expiry["set_expiry"], expiry["expires_at"]
        )
        await self._run(operation, self._sql.update_session, params, _nothing)

    async def set_session_expiry(self, session_id: str, expires_at: Expiry) -> None:
        """Set the session's expiry (int Unix seconds or an aware datetime), or clear it with
        ``None``. A missing session stays missing: this never creates one."""
        params = {
            "sid": check_session_id(session_id),
            "expires_at": self._time_param(check_expires_at(expires_at)),
        }
        await self._run("set_session_expiry", self._sql.set_session_expiry, params, _nothing)

    async def get_session_expiry(self, session_id: str) -> int | None:
        """Return the session's expiry in whole Unix seconds, or ``None`` if it has none or
        does not exist."""
        params = {"sid": check_session_id(session_id)}
        expires_at = await self._run(
            "get_session_expiry", self._sql.get_session_expiry, params, _scalar
        )
        return _time(expires_at)

    async def read_session(self, session_id: str) -> SessionSnapshot | None:
        """Return the whole session (creation time, expiry, every value) as one statement
        read it, or ``None`` if it does not exist. One round trip on PostgreSQL."""
        params = {"sid": check_session_id(session_id)}
        rows = await self._run("read_session", self._sql.read_session, params, _rows)
        if not rows:
            return None
        created_at, expires_at = rows[0][0], rows[0][1]
        values = {row[2]: bytes(row[3]) for row in rows if row[2] is not None}
        return SessionSnapshot(unix_seconds(created_at), _time(expires_at), values)

    async def remove_expired_sessions(
        self,
        now: datetime | float | None = None,
        *,
        batch_size: int = DEFAULT_BATCH_SIZE,
        progress: Callable[[int], object] | None = None,
    ) -> int:
        """Remove every session whose expiry is before ``now`` and return how many.

        ``now`` is Unix seconds or an aware datetime (default: the current time), compared
        in whole seconds: a session is expired when ``expires_at < now``. Removes through the
        expiry index, ``batch_size`` sessions per statement and transaction; on PostgreSQL
        sessions locked by a running write are skipped (left for the next pass), and a
        session whose expiry a write extended before the batch locked it is kept.
        ``progress`` is called after each batch with the number removed so far.
        """
        params = {
            "now": self._time_param(check_now(now)),
            "limit": check_batch_size(batch_size),
        }
        return await self._remove_batches(
            "remove_expired_sessions", self._sql.remove_expired, params, progress
        )

    def _time_param(self, moment: datetime | None) -> Any:
        return None if moment is None else self._sql.time_param(moment)

    def _expiry_params(self, expires_at: object) -> dict[str, Any]:
        """The ``set_expiry`` and ``expires_at`` parameters of a write."""
        if expires_at is KEEP:
            return {"set_expiry": False, "expires_at": None}
        return {"set_expiry": True, "expires_at": self._time_param(check_expires_at(expires_at))}

    # Listing and bulk removal.

    async def iter_sessions(self, batch_size: int = 1000) -> AsyncIterator[str]:
        """Yield every session id, fetching ``batch_size`` ids per query (keyset pagination),
        so memory stays flat however many sessions there are. Ids come in sorted order."""
        limit = check_batch_size(batch_size)
        after = ""
        while True:
            params = {"after": after, "limit": limit}
            ids = await self._run("iter_sessions", self._sql.page_sessions, params, _scalars)
            for session_id in ids:
                yield session_id
            if len(ids) < limit:
                return
            after = ids[-1]

    async def remove_sessions_created_before(
        self,
        cutoff: datetime | float,
        *,
        batch_size: int = DEFAULT_BATCH_SIZE,
        progress: Callable[[int], object] | None = None,
    ) -> int:
        """Remove every session created before ``cutoff`` and return how many.

        ``cutoff`` is a timezone-aware datetime or Unix seconds; creation times count in whole
        seconds, as :meth:`get_session_age` reports them. Deletes ``batch_size``
        sessions per statement and transaction; on PostgreSQL sessions locked by a running
        write are skipped (left for the next pass), never waited for. ``progress`` is called
        after each batch with the number removed so far.
        """
        params = {
            "cutoff": self._sql.time_param(check_cutoff(cutoff)),
            "limit": check_batch_size(batch_size),
        }
        return await self._remove_batches(
            "remove_sessions_created_before", self._sql.remove_created_before, params, progress
        )

    async def _remove_batches(
        self,
        operation: str,
        script: Script,
        params: Params,
        progress: Callable[[int], object] | None,
    ) -> int:
        """Run a batch removal until a batch comes back short; return the total removed."""
        removed = 0
        while True:
            count = await self._run(operation, script, params, _rowcount)
            removed += count
            if progress is not None:
                progress(removed)
            if count < params["limit"]:
                return removed

    # Execution.

    async def _run(
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
        if self._bound is not None:
            return await self._run_bound(operation, self._bound, script, params, fetch)
        if self._write_lock is not None and getattr(script[0], "is_dml", False):
            async with self._write_lock:
                return await self._run_pooled(operation, script, params, fetch)
        return await self._run_pooled(operation, script, params, fetch)

    async def _run_pooled(
        self, operation: str, script: Script, params: Params, fetch: Callable[[Any], _T]
    ) -> _T:
        attempt = 0
        while True:
            attempt += 1
            try:
                if self._kept is not None:
                    return fetch(await self._on_kept(self._kept, script, params))
                return fetch(await greenlet_spawn(self._pooled, script, params))
            except _StaleConnection:
                # Every operation is idempotent: a connection the server dropped while it sat
                # in the pool is discarded and the call runs again on the next one.
                continue
            except Exception as error:  # input is checked: anything here is the database or driver
                sqlstate = getattr(error, "sqlstate", None)
                if sqlstate == _FOREIGN_KEY_VIOLATION and attempt < _FOREIGN_KEY_ATTEMPTS:
                    continue
                raise _backend_error(operation, error) from error

    def _pooled(self, script: Script, params: Params) -> Outcome:
        """Check a connection out of the engine's pool, run the compiled script on it and
        check it back in (in a greenlet: the pool may wait or connect)."""
        checkout = time.monotonic()
        pooled = self._engine.sync_engine.raw_connection()
        conn = pooled.driver_connection
        try:
            return await_only(
                run_script(self._driver, conn, self._sql.begin, self._compiled[script], params)
            )
        except BaseException as error:
            if self._unusable(conn, error):
                stale = self._driver.is_closed(conn)
                stale = stale and pooled.info.get(_CONNECTED_AT, 0.0) < checkout
                pooled.invalidate(error)
                if stale:
                    raise _StaleConnection from error
            raise
        finally:
            pooled.close()

    async def _on_kept(self, kept: _Kept, script: Script, params: Params) -> Outcome:
        """Run the compiled script on a kept connection."""
        connection = kept.take_idle() or await kept.take()
        conn = connection.driver_connection
        try:
            outcome = await run_script(
                self._driver, conn, self._sql.begin, self._compiled[script], params
            )
        except BaseException as error:
            if self._unusable(conn, error):
                await kept.discard(connection, error)
            else:
                kept.give_back(connection)
            raise
        kept.give_back(connection)
        return outcome

    def _unusable(self, conn: Any, error: BaseException) -> bool:
        """Interrupted mid-call (cancelled), closed, or left inside a transaction: the
        connection cannot serve another call as it is."""
        driver = self._driver
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
                _execute, conn.sync_connection, script, params, self._bound_options
            )
            return fetch(outcome)
        except Exception as error:  # input is checked: anything here is the database or driver
            raise _backend_error(operation, error) from error


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


def _invalidate(connection: PoolProxiedConnection, error: BaseException) -> None:
    connection.invalidate(error)
    connection.close()


def _close_each(connections: list[PoolProxiedConnection]) -> None:
    for connection in connections:
        connection.close()


def _note_connect_time(dbapi_connection: Any, connection_record: Any) -> None:
    connection_record.info[_CONNECTED_AT] = time.monotonic()
