"""SQLAlchemyBackend: the session protocol and its extensions on an SQLAlchemy 2
``AsyncEngine``.

Each method validates its input before any SQL, then hands one script of ``_dialects`` to
the backend's :class:`~._execution.Executor` (which runs it as one transaction, retries what
is safe to retry and maps failures to :class:`BackendError`), and turns what the script read
into the method's result.
"""

from __future__ import annotations

import calendar
import copy
from collections.abc import AsyncIterator, Callable, Iterable, Mapping
from datetime import datetime
from types import TracebackType
from typing import Any, Literal

from sqlalchemy import event
from sqlalchemy.engine import URL, make_url
from sqlalchemy.exc import SQLAlchemyError
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine, AsyncSession, create_async_engine
from sqlalchemy.pool import AsyncAdaptedQueuePool

from ._dialects import Params, Script, dialect_for
from ._drivers import Outcome, check_driver
from ._execution import Executor, backend_error
from ._protocol import (
    KEEP,
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

__all__ = ["DEFAULT_BATCH_SIZE", "SQLAlchemyBackend", "unix_seconds"]

#: Default number of sessions deleted per statement and transaction by the collector.
DEFAULT_BATCH_SIZE = 5000


def unix_seconds(created_at: datetime | str) -> int:
    """Whole Unix seconds of a creation time: a datetime (naive means UTC) or the UTC text
    SQLite stores (``YYYY-MM-DD HH:MM:SS``), which its driver returns as it is."""
    if isinstance(created_at, str):
        created_at = datetime.fromisoformat(created_at)
    return calendar.timegm(created_at.utctimetuple())


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
    # A removal's row count, or the count a removal function returned as its one row.
    return int(count if isinstance(count, int) else count[0][0])


class SQLAlchemyBackend:
    """Sessions stored in the ``sessions`` and ``session_values`` tables of a SQL database.

    Works on PostgreSQL (asyncpg, psycopg), SQLite (aiosqlite) and MariaDB/MySQL (asyncmy),
    through SQLAlchemy Core on other async drivers, and on a Citus coordinator whose tables
    ``migrate(..., citus=True)`` distributed (found on the first call). The tables must
    exist: create them with :func:`sessions_sql.migrate` (or :meth:`create_all` in tests).
    No DDL runs implicitly. The engine's pool is shared; each call checks out a connection
    for one short transaction.
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
        check_driver(engine.dialect.driver)
        self._executor = Executor(engine, self._sql, schema)
        self._schema = schema
        self._max_value_bytes = max_value_bytes
        self._owns_engine = False

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
        wait for writers. On asyncpg, psycopg, asyncmy and aiosqlite, with the default pool, the
        backend keeps up to ``pool_size`` connections checked out between calls: a call then
        costs no pool checkout.
        """
        url = make_url(url)
        check_driver(url.get_driver_name())
        sqlite = url.get_backend_name() == "sqlite"
        engine_kw.setdefault("hide_parameters", True)
        # The backend's own connections are kept between calls unless the caller chose a pool.
        keep = "poolclass" not in engine_kw
        if "poolclass" not in engine_kw:
            if not sqlite:
                engine_kw.setdefault("pool_use_lifo", True)
            elif url.database not in (None, "", ":memory:"):
                # The backend keeps its SQLite connections (see _execution): a queue pool bounds
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
        if always_autocommit or (keep and not sqlite):
            backend._executor.keep_connections()
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
            await self._executor.close()
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
        bound = ", in a host transaction" if self._executor.is_bound else ""
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
        bound._executor = self._executor.bound(connection)
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
            raise backend_error("create_all", error) from error

    # The six protocol methods.

    async def get_sessions(self) -> list[str]:
        """Return the ids of all sessions (with or without values), in any order.

        For many sessions prefer :meth:`iter_sessions`, which pages through them.
        """
        return await self._executor.run("get_sessions", self._sql.get_sessions, {}, _scalars)

    async def get_session_age(self, session_id: str) -> int | None:
        """Return the session's creation time in whole Unix seconds (UTC), or ``None``.

        A timestamp, not an age (the name comes from the original protocol).
        """
        params = {"sid": check_session_id(session_id)}
        created_at = await self._executor.run(
            "get_session_age", self._sql.get_session_age, params, _scalar
        )
        return None if created_at is None else unix_seconds(created_at)

    async def remove_session(self, session_id: str) -> None:
        """Remove the session and all its values; a missing session is not an error."""
        params = {"sid": check_session_id(session_id)}
        await self._executor.run("remove_session", self._sql.remove_session, params, _nothing)

    async def read_value(self, session_id: str, key: str) -> bytes | None:
        """Return the value under ``key``, or ``None`` if the session or the key is missing."""
        params = {"sid": check_session_id(session_id), "key": check_key(key)}
        value: bytes | None = await self._executor.run(
            "read_value", self._sql.read_value, params, _scalar
        )
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
        await self._executor.run("write_value", self._sql.write_value, params, _nothing)

    async def remove_value(self, session_id: str, key: str) -> None:
        """Remove one value; missing session or key is not an error, the session stays."""
        params = {"sid": check_session_id(session_id), "key": check_key(key)}
        await self._executor.run("remove_value", self._sql.remove_value, params, _nothing)

    # Batch helpers.

    async def read_values(self, session_id: str) -> dict[str, bytes]:
        """Return all values of a session as a dict (empty if the session is missing)."""
        params = {"sid": check_session_id(session_id)}
        return await self._executor.run("read_values", self._sql.read_values, params, _pairs)

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
        await self._executor.run("remove_values", self._sql.remove_values, params, _nothing)

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
        await self._executor.run(operation, self._sql.update_session, params, _nothing)

    async def set_session_expiry(self, session_id: str, expires_at: Expiry) -> None:
        """Set the session's expiry (int Unix seconds or an aware datetime), or clear it with
        ``None``. A missing session stays missing: this never creates one."""
        params = {
            "sid": check_session_id(session_id),
            "expires_at": self._time_param(check_expires_at(expires_at)),
        }
        await self._executor.run(
            "set_session_expiry", self._sql.set_session_expiry, params, _nothing
        )

    async def get_session_expiry(self, session_id: str) -> int | None:
        """Return the session's expiry in whole Unix seconds, or ``None`` if it has none or
        does not exist."""
        params = {"sid": check_session_id(session_id)}
        expires_at = await self._executor.run(
            "get_session_expiry", self._sql.get_session_expiry, params, _scalar
        )
        return _time(expires_at)

    async def read_session(self, session_id: str) -> SessionSnapshot | None:
        """Return the whole session (creation time, expiry, every value) as one statement
        read it, or ``None`` if it does not exist. One round trip on PostgreSQL."""
        params = {"sid": check_session_id(session_id)}
        rows = await self._executor.run("read_session", self._sql.read_session, params, _rows)
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
            ids = await self._executor.run(
                "iter_sessions", self._sql.page_sessions, params, _scalars
            )
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
            count = await self._executor.run(operation, script, params, _rowcount)
            removed += count
            if progress is not None:
                progress(removed)
            if count < params["limit"]:
                return removed

    # Execution.
