"""Citus: the PostgreSQL dialect with both tables distributed by session id and co-located,
so that every row of a session lives in one shard. Citus routes a statement filtering on
the session id to its shard's worker (one task), except a data-modifying CTE, which it
plans as subplans with intermediate results pulled through the coordinator; so the writes
PostgreSQL runs as one CTE statement are functions here, delegated by their session id
argument to the worker holding the shard (create_distributed_function), whose body runs
the same steps as separate statements against the local shard: one hop from the
coordinator, as a read. The batch removals lock with SKIP LOCKED, which Citus allows only
within one shard: a batch runs on every node holding shards at once, and there on each of
its shards in turn, each shard in its own transaction (a pass removes up to the batch
size per shard). The functions are created by ``migrate(..., citus=True)``.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any

from sqlalchemy import LargeBinary, String, bindparam, func, select, text
from sqlalchemy.dialects import postgresql
from sqlalchemy.engine import Connection

from .._protocol import BackendError
from .common import CUTOFF, EXPIRES_AT, KEY, LIMIT, NOW, SET_EXPIRY, SID, VALUE, Dialect
from .postgresql import POSTGRESQL

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


def require_citus(connection: Connection) -> None:
    """Raise ``BackendError`` unless the database has the citus extension."""
    if connection.dialect.name != "postgresql" or not has_citus(connection):
        raise BackendError(
            "citus was asked for, but the database has no citus extension "
            "(CREATE EXTENSION citus on a Citus coordinator)"
        )
    connection.commit()


def distribute_on_citus(connection: Connection, schema: str | None) -> None:
    """On a Citus coordinator, distribute the tables (in ``schema``) by session id,
    co-located, and create the functions of the Citus dialect; idempotent, and nothing to
    do when the tables do not exist (a downgrade to base). Commits each step. The caller
    checks the database first (:func:`require_citus`, before any migration runs).
    """
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


def find_citus(connection: Connection, schema: str | None) -> Dialect | None:
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
    write_value = functions.sessions_sql_write_value(SID, KEY, VALUE, EXPIRES_AT, SET_EXPIRY)
    update_session = functions.sessions_sql_update_session(
        SID, keys, values, remove, SET_EXPIRY, EXPIRES_AT
    )
    created = functions.sessions_sql_remove_created_before(CUTOFF, LIMIT)
    expired = functions.sessions_sql_remove_expired(NOW, LIMIT)
    return dataclasses.replace(
        POSTGRESQL,
        name="citus",
        write_value=(select(write_value),),
        update_session=(select(update_session),),
        remove_created_before=(select(created),),
        remove_expired=(select(expired),),
        variant=None,
    )
