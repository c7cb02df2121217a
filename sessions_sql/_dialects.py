"""The SQL each database runs for each operation: the one place where PostgreSQL, SQLite and
MariaDB/MySQL differ.

Every statement is built once, at import, as a Core construct (so SQLAlchemy caches its
compiled form and ``schema_translate_map`` applies). An operation is a *script*: a tuple of
statements, each run once with the call's parameters, or (:class:`Many`) once per row of a
list among them. A script of one plain statement runs on its own, in autocommit (one round
trip); any other runs inside an explicit write transaction opened with :attr:`Dialect.begin`.
Times are bound as :attr:`Dialect.time_param` converts them (whole seconds, UTC).
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import functools
import time
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from datetime import datetime, timezone
from typing import Any, TypeVar

from sqlalchemy import (
    Boolean,
    DateTime,
    Integer,
    LargeBinary,
    String,
    any_,
    bindparam,
    case,
    delete,
    func,
    literal_column,
    select,
    text,
    update,
)
from sqlalchemy.dialects import mysql, postgresql, sqlite
from sqlalchemy.engine import Connection
from sqlalchemy.sql.expression import ColumnElement, Executable, Selectable
from sqlalchemy.util import await_only
from sqlalchemy.util.concurrency import in_greenlet

from ._protocol import BackendError
from .models import sessions_table as S
from .models import values_table as V

__all__ = ["Dialect", "Many", "Params", "Script", "dialect_for", "migration_lock"]

_T = TypeVar("_T")


@dataclass(frozen=True)
class Many:
    """A statement run once per row of the list ``params[rows]`` (none if it is empty)."""

    statement: Executable
    rows: str

    @property
    def is_dml(self) -> bool:
        """Whether the statement writes (as ``Executable.is_dml``)."""
        return bool(getattr(self.statement, "is_dml", False))


Script = tuple[Executable | Many, ...]
Params = dict[str, Any]

# Times: timestamptz on PostgreSQL; on SQLite the text CURRENT_TIMESTAMP writes (UTC,
# "YYYY-MM-DD HH:MM:SS"), which compares in time order; naive UTC on MariaDB/MySQL.
_TIME = DateTime(timezone=True).with_variant(String(), "sqlite")

_sid = bindparam("sid", type_=String)
_key = bindparam("key", type_=String)
_value = bindparam("value", type_=LargeBinary)
_limit = bindparam("limit", type_=Integer)
_after = bindparam("after", type_=String)
_now = bindparam("now", type_=_TIME)
_cutoff = bindparam("cutoff", type_=_TIME)
# The expiry a write sets (NULL clears it), and whether it sets one at all.
_expires_at = bindparam("expires_at", type_=_TIME)
_set_expiry = bindparam("set_expiry", type_=Boolean)


@dataclass(frozen=True)
class Dialect:
    """The statements of one database. Scripts of several statements need :attr:`begin`."""

    name: str
    #: SQL opening a write transaction for a script of several statements.
    begin: str
    #: The database allows one writer at a time (SQLite): this process's writes then queue
    #: on a lock instead of polling the busy handler, whose sleeps stall concurrent writers.
    single_writer: bool
    get_sessions: Script
    page_sessions: Script
    get_session_age: Script
    get_session_expiry: Script
    read_session: Script
    remove_session: Script
    read_value: Script
    read_values: Script
    #: Params: sid, key, value, expires_at, set_expiry.
    write_value: Script
    #: Params from :attr:`update_params`.
    update_session: Script
    remove_value: Script
    #: Params from :attr:`remove_values_params`.
    remove_values: Script
    #: Params: sid, expires_at.
    set_session_expiry: Script
    #: Params: cutoff, limit.
    remove_created_before: Script
    #: Params: now, limit.
    remove_expired: Script
    #: Parameters of ``update_session``: id, values to write, keys to remove, and the expiry
    #: (``set_expiry`` false: keep it; else ``expires_at``, bound, ``None`` clearing it).
    update_params: Callable[[str, Mapping[str, bytes], list[str], bool, Any], Params]
    #: Builds the parameters of ``remove_values`` from an id and a list of keys.
    remove_values_params: Callable[[str, list[str]], Params]
    #: ``created_at < :cutoff``, for queries by creation time (bind with :attr:`time_param`).
    created_before: ColumnElement[bool]
    #: ``expires_at < :now``, for queries of expired sessions (bind with :attr:`time_param`).
    expired: ColumnElement[bool]
    #: Converts a whole-second aware datetime to the bind value of a time column.
    time_param: Callable[[datetime], Any]
    #: Held while migrations run on a connection: concurrent migrators (several workers of
    #: one application starting at once) wait for each other.
    migration_lock: Callable[[Connection], contextlib.AbstractContextManager[None]]
    #: ``connect`` event of engines the backend creates itself (``from_url``), if any.
    on_connect: Callable[[Any, Any], None] | None
    #: Finds, on a connection, the variant of this dialect that the database needs, if any
    #: (PostgreSQL: Citus, when the tables are distributed); given the schema of the tables.
    variant: Callable[[Connection, str | None], Dialect | None] | None = None

    def scripts(self) -> list[Script]:
        """Every script of this database."""
        return [value for value in vars(self).values() if isinstance(value, tuple)]

    def scripts_of(self, variant: Dialect) -> dict[Script, Script]:
        """Each script of this dialect mapped to the same operation's script in ``variant``."""
        return dict(zip(self.scripts(), variant.scripts(), strict=True))


# Statements that are the same SQL on both databases.
_get_sessions = select(S.c.id)
_page_sessions = select(S.c.id).where(S.c.id > _after).order_by(S.c.id).limit(_limit)
_get_session_age = select(S.c.created_at).where(S.c.id == _sid)
_get_session_expiry = select(S.c.expires_at).where(S.c.id == _sid)
# One statement, one snapshot: the session's times and all its values (none: no rows).
_read_session = (
    select(S.c.created_at, S.c.expires_at, V.c.key, V.c.value)
    .select_from(S.outerjoin(V, V.c.session_id == S.c.id))
    .where(S.c.id == _sid)
)
_read_value = select(V.c.value).where(V.c.session_id == _sid, V.c.key == _key)
_read_values = select(V.c.key, V.c.value).where(V.c.session_id == _sid)
_remove_value = delete(V).where(V.c.session_id == _sid, V.c.key == _key)
_delete_session = delete(S).where(S.c.id == _sid)
_set_session_expiry = update(S).where(S.c.id == _sid).values(expires_at=_expires_at)
_created_before = S.c.created_at < _cutoff
_expired = S.c.expires_at < _now


def _batch(condition: ColumnElement[bool], order: Any) -> Any:
    """The ids of one bounded batch of sessions matching ``condition``, oldest first."""
    return select(S.c.id).where(condition).order_by(order).limit(_limit)


# Serialises concurrent migrators on PostgreSQL (an arbitrary constant: "sessions_sql" in hex).
_MIGRATION_LOCK_KEY = 0x73657373696F6E73


_MIGRATION_LOCK_POLL = 0.05  # seconds between attempts to take a migration lock


def _pause(seconds: float) -> None:
    """Sleep without blocking the event loop when run through an async engine."""
    if in_greenlet():
        await_only(asyncio.sleep(seconds))
    else:
        time.sleep(seconds)


@contextlib.contextmanager
def _polled_lock(connection: Connection, take: str, release: str) -> Iterator[None]:
    """Hold a lock of the connection's session across the migrations: ``take`` (a query
    answering whether it got the lock, without waiting) is polled, committing between
    attempts, then ``release`` runs at the end."""
    while not connection.exec_driver_sql(take).scalar():
        connection.commit()
        _pause(_MIGRATION_LOCK_POLL)
    connection.commit()
    try:
        yield
    finally:
        if connection.in_transaction():  # a failed migration's transaction
            connection.rollback()
        connection.exec_driver_sql(release)
        connection.commit()


def _postgresql_migration_lock(connection: Connection) -> contextlib.AbstractContextManager[None]:
    # A session-level advisory lock, held across the migrations' own transactions (a
    # revision may commit part way, to build an index CONCURRENTLY). If the process dies,
    # the server releases it with the connection. Taken by polling, never by waiting inside
    # a statement: a waiting statement holds a snapshot, and CREATE INDEX CONCURRENTLY in
    # the migrator holding the lock waits for every such snapshot to end (a deadlock).
    return _polled_lock(
        connection,
        f"SELECT pg_try_advisory_lock({_MIGRATION_LOCK_KEY})",
        f"SELECT pg_advisory_unlock({_MIGRATION_LOCK_KEY})",
    )


def _postgresql() -> Dialect:
    insert = postgresql.insert
    keys = bindparam("keys", type_=postgresql.ARRAY(String))
    values = bindparam("values", type_=postgresql.ARRAY(LargeBinary))
    remove = bindparam("remove", type_=postgresql.ARRAY(String))

    def create_or_lock(rows: Selectable) -> Any:
        # Create the session, or lock it if it exists: DO UPDATE locks the row, and writes it
        # only when the call sets the expiry (WHERE set_expiry). Taking the session's lock
        # before any value row's lock gives writers and remove_session (session row, then
        # cascade to values) one lock order, so they queue instead of deadlocking; a removal
        # that commits first is waited for and the write then creates a new session.
        statement = insert(S).from_select(["id", "expires_at"], rows)
        return (
            statement.on_conflict_do_update(
                index_elements=[S.c.id],
                set_={"expires_at": statement.excluded.expires_at},
                where=_set_expiry,
            )
            .returning(S.c.id)
            .cte("new_session")
        )

    def first(*ctes: Any) -> ColumnElement[bool]:
        # Referencing the CTEs in an InitPlan makes them run before the statement's own rows
        # (an unreferenced data-modifying CTE would run after the main statement).
        counts = [select(func.count()).select_from(cte).scalar_subquery() for cte in ctes]
        total: ColumnElement[Any] = counts[0]
        for count in counts[1:]:
            total = total + count
        return total >= literal_column("0")

    def upsert_values(rows: Selectable, *ctes: Any) -> Executable:
        statement = insert(V).from_select(["session_id", "key", "value"], rows)
        statement = statement.on_conflict_do_update(
            index_elements=[V.c.session_id, V.c.key], set_={"value": statement.excluded.value}
        )
        for cte in ctes:
            statement = statement.add_cte(cte)
        return statement

    new_session = create_or_lock(select(_sid, _expires_at))
    write_value = upsert_values(select(_sid, _key, _value).where(first(new_session)), new_session)

    # update_session: values written (creating the session), keys removed and the expiry
    # set, in one statement. Without values to write it never creates the session: the
    # expiry then goes through a plain UPDATE (touched) of an existing one.
    writing = func.cardinality(keys) > literal_column("0")
    session_written = create_or_lock(select(_sid, _expires_at).where(writing))
    touched = (
        update(S)
        .where(S.c.id == _sid, _set_expiry, ~writing)
        .values(expires_at=_expires_at)
        .returning(S.c.id)
        .cte("touched")
    )
    removed = (
        delete(V)
        .where(
            V.c.session_id == _sid,
            V.c.key == any_(remove),
            first(session_written, touched),
        )
        .returning(V.c.key)
        .cte("removed")
    )
    pairs = func.unnest(keys, values).table_valued("key", "value").render_derived(name="pairs")
    update_session = upsert_values(
        select(_sid, pairs.c.key, pairs.c.value).where(first(session_written, touched)),
        session_written,
        touched,
        removed,
    )

    remove_values = delete(V).where(V.c.session_id == _sid, V.c.key == any_(remove))

    def remove_batch(condition: ColumnElement[bool], order: Any) -> Executable:
        # One bounded batch; rows locked by writers are skipped, never waited for (and a row
        # a writer changed meanwhile is checked again against the condition once locked).
        # "= ANY(ARRAY(subquery))", not "IN (subquery)": the planner turns IN into a join
        # that scans the whole table per batch, while the array is computed once (an
        # InitPlan) and probed through the primary key.
        doomed = _batch(condition, order).with_for_update(skip_locked=True)
        return delete(S).where(S.c.id == any_(func.array(doomed.scalar_subquery())))

    return Dialect(
        name="postgresql",
        begin="BEGIN",
        single_writer=False,
        get_sessions=(_get_sessions,),
        page_sessions=(_page_sessions,),
        get_session_age=(_get_session_age,),
        get_session_expiry=(_get_session_expiry,),
        read_session=(_read_session,),
        remove_session=(_delete_session,),  # values go by ON DELETE CASCADE
        read_value=(_read_value,),
        read_values=(_read_values,),
        write_value=(write_value,),
        update_session=(update_session,),
        remove_value=(_remove_value,),
        remove_values=(remove_values,),
        set_session_expiry=(_set_session_expiry,),
        remove_created_before=(remove_batch(_created_before, S.c.created_at),),
        remove_expired=(remove_batch(_expired, S.c.expires_at),),
        update_params=lambda sid, mapping, remove_keys, set_expiry, expires_at: {
            "sid": sid,
            "keys": list(mapping),
            "values": list(mapping.values()),
            "remove": remove_keys,
            "set_expiry": set_expiry,
            "expires_at": expires_at,
        },
        remove_values_params=lambda sid, keys: {"sid": sid, "remove": keys},
        created_before=_created_before,
        expired=_expired,
        time_param=lambda moment: moment,
        migration_lock=_postgresql_migration_lock,
        on_connect=None,
        variant=_find_citus,
    )


# Citus: the PostgreSQL dialect with both tables distributed by session id and co-located,
# so that every row of a session lives in one shard. Citus routes a statement filtering on
# the session id to its shard's worker (one task), except a data-modifying CTE, which it
# plans as subplans with intermediate results pulled through the coordinator; so the writes
# PostgreSQL runs as one CTE statement are functions here, delegated by their session id
# argument to the worker holding the shard (create_distributed_function), whose body runs
# the same steps as separate statements against the local shard: one hop from the
# coordinator, as a read. The batch removals lock with SKIP LOCKED, which Citus allows only
# within one shard: a batch runs on every node holding shards at once, and there on each of
# its shards in turn, each shard in its own transaction (a pass removes up to the batch
# size per shard). The functions are created by ``migrate(..., citus=True)``.

#: The functions the Citus dialect calls, with their argument types.
CITUS_FUNCTIONS = {
    "sessions_sql_write_value": "varchar, varchar, bytea, timestamptz, boolean",
    "sessions_sql_update_session": "varchar, varchar[], bytea[], varchar[], boolean, timestamptz",
    "sessions_sql_remove_created_before": "timestamptz, integer",
    "sessions_sql_remove_expired": "timestamptz, integer",
    "sessions_sql_remove_local_batches": "text, bigint",
}
#: Those delegated to the shard of their first argument (the session id).
_DELEGATED = ("sessions_sql_write_value", "sessions_sql_update_session")

# Bodies: {s} is the schema prefix of the tables ("" or a quoted schema and a dot). The
# session row is created or locked first, as in the PostgreSQL statements (one lock order
# with remove_session).
_CITUS_BODIES = {
    "sessions_sql_write_value": """(
    sid varchar, k varchar, v bytea, expires timestamptz, set_expiry boolean
) RETURNS void LANGUAGE plpgsql AS $fn$
BEGIN
    INSERT INTO {s}sessions (id, expires_at) VALUES (sid, expires)
    ON CONFLICT (id) DO UPDATE SET expires_at = excluded.expires_at WHERE set_expiry;
    INSERT INTO {s}session_values (session_id, key, value) VALUES (sid, k, v)
    ON CONFLICT (session_id, key) DO UPDATE SET value = excluded.value;
END
$fn$""",
    "sessions_sql_update_session": """(
    sid varchar, keys varchar[], vals bytea[], remove varchar[], set_expiry boolean,
    expires timestamptz
) RETURNS void LANGUAGE plpgsql AS $fn$
BEGIN
    IF cardinality(keys) > 0 THEN
        INSERT INTO {s}sessions (id, expires_at) VALUES (sid, expires)
        ON CONFLICT (id) DO UPDATE SET expires_at = excluded.expires_at WHERE set_expiry;
    ELSIF set_expiry THEN
        UPDATE {s}sessions SET expires_at = expires WHERE id = sid;
    END IF;
    IF cardinality(remove) > 0 THEN
        DELETE FROM {s}session_values WHERE session_id = sid AND key = ANY(remove);
    END IF;
    FOR i IN 1 .. coalesce(cardinality(keys), 0) LOOP
        INSERT INTO {s}session_values (session_id, key, value) VALUES (sid, keys[i], vals[i])
        ON CONFLICT (session_id, key) DO UPDATE SET value = excluded.value;
    END LOOP;
END
$fn$""",
}

# One bounded batch on one shard (%1$s: the shard table's name), as the PostgreSQL batch:
# rows locked by writers skipped, never waited for; the values go by the shard's cascade.
_SHARD_BATCH = (
    "WITH doomed AS (DELETE FROM %%1$s WHERE id = ANY(ARRAY(SELECT id FROM %%1$s "
    "WHERE {condition} ORDER BY {order} LIMIT %s FOR UPDATE SKIP LOCKED)) RETURNING 1) "
    "SELECT count(*) FROM doomed"
)
# On every node holding shards of the sessions table (created there by Citus): one batch on
# each of its shards in turn, each shard its own transaction; returns how many it removed.
_CITUS_BODIES["sessions_sql_remove_local_batches"] = """(
    batch_sql text, INOUT removed bigint DEFAULT 0
) LANGUAGE plpgsql AS $fn$
DECLARE
    shard text;
    n bigint;
BEGIN
    FOR shard IN
        SELECT shard_name(s.logicalrelid, s.shardid)
        FROM pg_dist_shard s JOIN pg_dist_placement p USING (shardid)
        WHERE s.logicalrelid = '{s}sessions'::regclass
          AND p.groupid = (SELECT groupid FROM pg_dist_local_group)
    LOOP
        EXECUTE format(batch_sql, shard) INTO n;
        removed := removed + n;
        COMMIT;
    END LOOP;
END
$fn$"""
# On the coordinator: the batch on every node holding shards, the nodes at once (one
# connection each, opened for the call), and the total removed.
_REMOVE_BATCHES = """(moment timestamptz, batch integer)
RETURNS bigint LANGUAGE plpgsql AS $fn$
DECLARE
    removed bigint := 0;
    names text[];
    ports integer[];
    command text;
    node record;
BEGIN
    SELECT array_agg(nodename), array_agg(nodeport) INTO names, ports FROM (
        SELECT DISTINCT nodename, nodeport::integer AS nodeport
        FROM pg_dist_shard_placement JOIN pg_dist_shard USING (shardid)
        WHERE logicalrelid = '{s}sessions'::regclass
    ) nodes;
    command := format(
        'CALL {s}sessions_sql_remove_local_batches(%L)',
        format('{batch}', extract(epoch FROM moment), batch)
    );
    FOR node IN SELECT * FROM master_run_on_worker(
        names, ports, array_fill(command, ARRAY[cardinality(names)]), true
    ) LOOP
        IF NOT node.success THEN
            RAISE EXCEPTION 'sessions_sql: a batch removal failed on %:%: %',
                node.node_name, node.node_port, node.result;
        END IF;
        removed := removed + node.result::bigint;
    END LOOP;
    RETURN removed;
END
$fn$"""
_CITUS_BODIES["sessions_sql_remove_created_before"] = _REMOVE_BATCHES.replace(
    "{batch}",
    _SHARD_BATCH.format(condition="created_at < to_timestamp(%s)", order="created_at"),
)
_CITUS_BODIES["sessions_sql_remove_expired"] = _REMOVE_BATCHES.replace(
    "{batch}",
    _SHARD_BATCH.format(condition="expires_at < to_timestamp(%s)", order="expires_at"),
)


def _qualified(connection: Connection, schema: str | None, name: str) -> str:
    if schema is None:
        return name
    return f"{connection.dialect.identifier_preparer.quote(schema)}.{name}"


def _citus_setup(connection: Connection, schema: str | None) -> list[str]:
    """The statements distributing the tables (in ``schema``) by session id, co-located,
    and creating the Citus dialect's functions; each is idempotent."""
    sessions = _qualified(connection, schema, "sessions")
    values = _qualified(connection, schema, "session_values")
    prefix = _qualified(connection, schema, "")
    statements = []
    for table, column, colocate in ((sessions, "id", None), (values, "session_id", sessions)):
        option = f", colocate_with => '{colocate}'" if colocate else ""
        statements.append(
            f"SELECT create_distributed_table('{table}', '{column}'{option}) "
            "WHERE NOT EXISTS (SELECT 1 FROM pg_dist_partition "
            f"WHERE logicalrelid = '{table}'::regclass)"
        )
    for name, body in _CITUS_BODIES.items():
        kind = "PROCEDURE" if "INOUT" in body else "FUNCTION"
        statements.append(f"CREATE OR REPLACE {kind} {prefix}{name}" + body.replace("{s}", prefix))
    for name in _DELEGATED:
        statements.append(
            f"SELECT create_distributed_function('{prefix}{name}({CITUS_FUNCTIONS[name]})', "
            f"'sid', colocate_with => '{sessions}')"
        )
    # Created on every node (not delegated): the nodes holding shards run it.
    local = f"{prefix}sessions_sql_remove_local_batches"
    statements.append(
        f"SELECT create_distributed_function('{local}"
        f"({CITUS_FUNCTIONS['sessions_sql_remove_local_batches']})')"
    )
    return statements


def distribute_on_citus(connection: Connection, schema: str | None) -> None:
    """On a Citus coordinator, distribute the tables (in ``schema``) by session id,
    co-located, and create the functions of the Citus dialect; idempotent, and nothing to
    do when the tables do not exist (a downgrade to base). Commits each step.

    Raises ``BackendError`` when the database has no citus extension.
    """
    if connection.dialect.name != "postgresql" or not has_citus(connection):
        raise BackendError(
            "citus was asked for, but the database has no citus extension "
            "(CREATE EXTENSION citus on a Citus coordinator)"
        )
    sessions = _qualified(connection, schema, "sessions")
    if connection.execute(_EXISTS, {"table": sessions}).scalar_one():
        for statement in _citus_setup(connection, schema):
            # Each in its own transaction: Citus creates a distributed function only in a
            # transaction that has not run parallel commands on distributed tables.
            connection.execute(text(statement))
            connection.commit()
    connection.commit()


_HAS_CITUS = text("SELECT 1 FROM pg_extension WHERE extname = 'citus'")
_EXISTS = text("SELECT to_regclass(:table) IS NOT NULL").bindparams(
    bindparam("table", type_=String)
)
_DISTRIBUTED = text(
    "SELECT 1 FROM pg_dist_partition WHERE logicalrelid = to_regclass(:table)"
).bindparams(bindparam("table", type_=String))
# Without array parameters: asyncpg looks an array type up in the catalog once per
# connection, and on a Citus coordinator that query is slow (see the README).
_FUNCTION = text("SELECT to_regprocedure(:signature) IS NOT NULL").bindparams(
    bindparam("signature", type_=String)
)


def has_citus(connection: Connection) -> bool:
    """Whether the database has the citus extension."""
    return connection.execute(_HAS_CITUS).first() is not None


def _find_citus(connection: Connection, schema: str | None) -> Dialect | None:
    """The Citus dialect, if the citus extension is there and ``sessions`` is distributed."""
    if not has_citus(connection):
        return None
    table = _qualified(connection, schema, "sessions")
    if connection.execute(_DISTRIBUTED, {"table": table}).first() is None:
        return None
    prefix = _qualified(connection, schema, "")
    if not all(
        connection.execute(_FUNCTION, {"signature": f"{prefix}{name}({args})"}).scalar_one()
        for name, args in CITUS_FUNCTIONS.items()
    ):
        raise BackendError(
            "the sessions table is distributed by Citus but sessions_sql's functions are "
            "missing: run sessions_sql.migrate(..., citus=True)"
        )
    return _citus(schema)


@functools.cache
def _citus(schema: str | None) -> Dialect:
    functions: Any = func if schema is None else getattr(func, schema)
    keys = bindparam("keys", type_=postgresql.ARRAY(String))
    values = bindparam("values", type_=postgresql.ARRAY(LargeBinary))
    remove = bindparam("remove", type_=postgresql.ARRAY(String))
    write_value = functions.sessions_sql_write_value(_sid, _key, _value, _expires_at, _set_expiry)
    update_session = functions.sessions_sql_update_session(
        _sid, keys, values, remove, _set_expiry, _expires_at
    )
    created = functions.sessions_sql_remove_created_before(_cutoff, _limit)
    expired = functions.sessions_sql_remove_expired(_now, _limit)
    return dataclasses.replace(
        dialect_for("postgresql"),
        name="citus",
        write_value=(select(write_value),),
        update_session=(select(update_session),),
        remove_created_before=(select(created),),
        remove_expired=(select(expired),),
        variant=None,
    )


def _sqlite_time(moment: datetime) -> str:
    # The format of CURRENT_TIMESTAMP; the moment is already a whole second.
    return moment.astimezone(timezone.utc).strftime("%Y-%m-%d %H:%M:%S")


@contextlib.contextmanager
def _sqlite_migration_lock(connection: Connection) -> Iterator[None]:
    # The whole upgrade in one write transaction, taken up front (SQLite's DDL is
    # transactional): a second migrator waits in the busy handler until the first commits,
    # then finds the schema up to date. (A deferred transaction would read the version table
    # first and then fail at once on the write lock; DDL outside a transaction would race
    # table creation.) A connection whose owner already began a transaction keeps that one.
    if not connection.connection.driver_connection.in_transaction:  # type: ignore[union-attr]
        connection.exec_driver_sql("BEGIN IMMEDIATE")
    yield


_SQLITE_BUSY = 5  # SQLite's primary result code for a locked database file


def _is_busy(error: Exception) -> bool:
    code = getattr(error, "sqlite_errorcode", None)  # Python >= 3.11
    if code is not None:
        return bool(code & 0xFF == _SQLITE_BUSY)
    return "database is locked" in str(error)


def _sqlite_use_wal(dbapi_connection: Any, connection_record: Any) -> None:
    """Switch a SQLite file to WAL mode (readers then never wait for the writer).

    A file already in WAL is left as it is: asking needs only a shared lock, which waits in
    the busy handler. Switching needs an exclusive lock, and SQLite refuses that at once,
    without calling its busy handler, while another process holds the write lock (waiting
    could deadlock); so the switch is retried until the connection's busy timeout (the
    driver's ``timeout``, set when the file is opened) has passed.
    """
    cursor = dbapi_connection.cursor()
    try:
        cursor.execute("PRAGMA busy_timeout")
        (timeout_ms,) = cursor.fetchone()
        deadline = time.monotonic() + timeout_ms / 1000
        delay = 0.001
        while True:
            cursor.execute("PRAGMA journal_mode")
            (mode,) = cursor.fetchone()
            if mode.lower() in ("wal", "memory"):  # memory: an in-memory database
                return
            try:
                cursor.execute("PRAGMA journal_mode=WAL")
                cursor.fetchall()
                return
            except Exception as error:
                if not _is_busy(error) or time.monotonic() >= deadline:
                    raise
            # Connect events of an async engine run in a greenlet: wait without blocking.
            await_only(asyncio.sleep(delay))
            delay = min(2 * delay, 0.05)
    finally:
        cursor.close()


def _sqlite() -> Dialect:
    # SQLite has no INSERT inside a CTE and may run with foreign keys off (a per-connection
    # setting the host controls), so creation, upsert and cascades are explicit statements
    # in one IMMEDIATE transaction, which takes the write lock up front.
    insert = sqlite.insert
    creating = bindparam("create", type_=Boolean)
    # SQLite's upsert needs a WHERE on its SELECT (else "ON" would be ambiguous).
    new_session = insert(S).from_select(
        ["id", "expires_at"], select(_sid, _expires_at).where(creating)
    )
    new_session = new_session.on_conflict_do_update(
        index_elements=[S.c.id],
        set_={"expires_at": new_session.excluded.expires_at},
        where=_set_expiry,
    )
    touch = update(S).where(S.c.id == _sid, _set_expiry, ~creating).values(expires_at=_expires_at)
    upsert = insert(V).values(session_id=_sid, key=_key, value=_value)
    upsert = upsert.on_conflict_do_update(
        index_elements=[V.c.session_id, V.c.key], set_={"value": upsert.excluded.value}
    )
    remove_key = delete(V).where(V.c.session_id == _sid, V.c.key == _key)

    def remove_batch(condition: ColumnElement[bool], order: Any) -> Script:
        doomed = _batch(condition, order).scalar_subquery()
        return (delete(V).where(V.c.session_id.in_(doomed)), delete(S).where(S.c.id.in_(doomed)))

    def update_params(
        sid: str,
        mapping: Mapping[str, bytes],
        remove_keys: list[str],
        set_expiry: bool,
        expires_at: Any,
    ) -> Params:
        return {
            "sid": sid,
            "create": bool(mapping),
            "set_expiry": set_expiry,
            "expires_at": expires_at,
            "removed": [{"sid": sid, "key": key} for key in remove_keys],
            "written": [{"sid": sid, "key": k, "value": v} for k, v in mapping.items()],
        }

    return Dialect(
        name="sqlite",
        begin="BEGIN IMMEDIATE",
        single_writer=True,
        get_sessions=(_get_sessions,),
        page_sessions=(_page_sessions,),
        get_session_age=(_get_session_age,),
        get_session_expiry=(_get_session_expiry,),
        read_session=(_read_session,),
        remove_session=(delete(V).where(V.c.session_id == _sid), _delete_session),
        read_value=(_read_value,),
        read_values=(_read_values,),
        write_value=(new_session, upsert),  # params with create=True
        update_session=(new_session, touch, Many(remove_key, "removed"), Many(upsert, "written")),
        remove_value=(_remove_value,),
        remove_values=(Many(remove_key, "removed"),),
        set_session_expiry=(_set_session_expiry,),
        remove_created_before=remove_batch(_created_before, S.c.created_at),
        remove_expired=remove_batch(_expired, S.c.expires_at),
        update_params=update_params,
        remove_values_params=lambda sid, keys: {
            "removed": [{"sid": sid, "key": key} for key in keys]
        },
        created_before=_created_before,
        expired=_expired,
        time_param=_sqlite_time,
        migration_lock=_sqlite_migration_lock,
        on_connect=_sqlite_use_wal,
    )


def _naive_utc(moment: datetime) -> datetime:
    # DATETIME(6) holds no time zone (and asyncmy would drop it): UTC, as UTC_TIMESTAMP writes.
    return moment.astimezone(timezone.utc).replace(tzinfo=None)


def _mysql_migration_lock(connection: Connection) -> contextlib.AbstractContextManager[None]:
    # A named lock of the connection, held across the migrations (MySQL's DDL commits on its
    # own), released with the connection if the process dies; one name per database. Taken
    # by polling with a zero timeout, like PostgreSQL's.
    name = "CONCAT('sessions_sql.migrate.', SHA1(COALESCE(DATABASE(), '')))"
    return _polled_lock(connection, f"SELECT GET_LOCK({name}, 0)", f"SELECT RELEASE_LOCK({name})")


def _mysql() -> Dialect:
    # MariaDB and MySQL (InnoDB) have no data-modifying CTE: a write is several statements in
    # one transaction, the session row first. Its INSERT ... ON DUPLICATE KEY UPDATE creates
    # the session or locks its row (also when it changes nothing), and a call that must not
    # create it locks it with an UPDATE: writers and remove_session (session row, then the
    # cascade to values) so take their locks in one order. INSERT IGNORE is never used (it
    # would truncate an over-long id with a warning); deadlocks the server still detects are
    # retried (see _execution).
    insert = mysql.insert
    session_row = insert(S).values(id=_sid, expires_at=_expires_at)
    session_row = session_row.on_duplicate_key_update(
        expires_at=case((_set_expiry, session_row.inserted.expires_at), else_=S.c.expires_at)
    )
    lock_session = (
        update(S)
        .where(S.c.id == _sid)
        .values(expires_at=case((_set_expiry, _expires_at), else_=S.c.expires_at))
    )
    upsert = insert(V).values(session_id=_sid, key=_key, value=_value)
    upsert = upsert.on_duplicate_key_update(value=upsert.inserted.value)
    remove_key = delete(V).where(V.c.session_id == _sid, V.c.key == _key)
    update_session = (
        Many(session_row, "creating"),
        Many(lock_session, "locking"),
        Many(remove_key, "removed"),
        Many(upsert, "written"),
    )

    def remove_batch(condition: str, order: str, moment: Any) -> Executable:
        # "IN (SELECT ... LIMIT n)" is refused: one bounded batch of ids in a derived table,
        # read first (STRAIGHT_JOIN) with FOR UPDATE SKIP LOCKED (MariaDB >= 10.6, MySQL >=
        # 8.0.1): rows a writer holds are skipped, never waited for, and a locking read sees
        # a change a writer committed before it. Then the batch is deleted through the primary
        # key; values go by ON DELETE CASCADE.
        return text(
            f"DELETE sessions FROM (SELECT id FROM sessions WHERE {condition}"
            f" ORDER BY {order} LIMIT :limit FOR UPDATE SKIP LOCKED) AS doomed"
            " STRAIGHT_JOIN sessions ON sessions.id = doomed.id"
        ).bindparams(moment, _limit)

    def update_params(
        sid: str,
        mapping: Mapping[str, bytes],
        remove_keys: list[str],
        set_expiry: bool,
        expires_at: Any,
    ) -> Params:
        session = [{"sid": sid, "set_expiry": set_expiry, "expires_at": expires_at}]
        return {
            "creating": session if mapping else [],
            "locking": [] if mapping else session,
            "removed": [{"sid": sid, "key": key} for key in remove_keys],
            "written": [{"sid": sid, "key": k, "value": v} for k, v in mapping.items()],
        }

    return Dialect(
        name="mysql",
        begin="START TRANSACTION",
        single_writer=False,
        get_sessions=(_get_sessions,),
        page_sessions=(_page_sessions,),
        get_session_age=(_get_session_age,),
        get_session_expiry=(_get_session_expiry,),
        read_session=(_read_session,),
        remove_session=(_delete_session,),  # values go by ON DELETE CASCADE
        read_value=(_read_value,),
        read_values=(_read_values,),
        write_value=(session_row, upsert),
        update_session=update_session,
        remove_value=(_remove_value,),
        remove_values=update_session,  # the session row locked first, then the removals
        set_session_expiry=(_set_session_expiry,),
        remove_created_before=(remove_batch("created_at < :cutoff", "created_at", _cutoff),),
        remove_expired=(remove_batch("expires_at < :now", "expires_at", _now),),
        update_params=update_params,
        remove_values_params=lambda sid, keys: update_params(sid, {}, keys, False, None),
        created_before=_created_before,
        expired=_expired,
        time_param=_naive_utc,
        migration_lock=_mysql_migration_lock,
        on_connect=None,
    )


_DIALECTS = {"postgresql": _postgresql(), "sqlite": _sqlite(), "mysql": _mysql()}
# A MariaDB URL (mariadb+asyncmy://) names SQLAlchemy's MariaDB dialect: the same SQL.
_DIALECTS["mariadb"] = _DIALECTS["mysql"]


def supported(table: Mapping[str, _T], name: str, what: str) -> _T:
    """Return ``table[name]``, or raise ``ValueError`` naming the unsupported ``what``."""
    try:
        return table[name]
    except KeyError:
        names = ", ".join(sorted(table))
        raise ValueError(f"unsupported {what} {name!r}; supported: {names}") from None


def migration_lock(connection: Connection) -> contextlib.AbstractContextManager[None]:
    """The migration lock of ``connection``'s database (:attr:`Dialect.migration_lock`); on
    a database this package has no statements for, none."""
    dialect = _DIALECTS.get(connection.dialect.name)
    return contextlib.nullcontext() if dialect is None else dialect.migration_lock(connection)


def dialect_for(name: str) -> Dialect:
    """Return the statements for a SQLAlchemy dialect name, or raise ``ValueError``."""
    return supported(_DIALECTS, name, "database")
