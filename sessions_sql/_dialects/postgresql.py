"""PostgreSQL: every write one statement, its steps chained by data-modifying CTEs."""

from __future__ import annotations

import contextlib
from typing import Any

from sqlalchemy import (
    LargeBinary,
    String,
    any_,
    bindparam,
    delete,
    func,
    literal_column,
    select,
    update,
)
from sqlalchemy.dialects import postgresql
from sqlalchemy.engine import Connection
from sqlalchemy.sql.expression import ColumnElement, Executable, Selectable

from ..models import sessions_table as S
from ..models import values_table as V
from .common import (
    CREATED_BEFORE,
    DELETE_SESSION,
    EXPIRED,
    EXPIRES_AT,
    KEY,
    SET_EXPIRY,
    SID,
    VALUE,
    Dialect,
    batch,
    polled_lock,
)

# Serialises concurrent migrators (an arbitrary constant: "sessions_sql" in hex).
_MIGRATION_LOCK_KEY = 0x73657373696F6E73


def _migration_lock(connection: Connection) -> contextlib.AbstractContextManager[None]:
    # A session-level advisory lock, held across the migrations' own transactions (a
    # revision may commit part way, to build an index CONCURRENTLY). If the process dies,
    # the server releases it with the connection. Taken by polling, never by waiting inside
    # a statement: a waiting statement holds a snapshot, and CREATE INDEX CONCURRENTLY in
    # the migrator holding the lock waits for every such snapshot to end (a deadlock).
    return polled_lock(
        connection,
        f"SELECT pg_try_advisory_lock({_MIGRATION_LOCK_KEY})",
        f"SELECT pg_advisory_unlock({_MIGRATION_LOCK_KEY})",
    )


def _dialect() -> Dialect:
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
                where=SET_EXPIRY,
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

    new_session = create_or_lock(select(SID, EXPIRES_AT))
    write_value = upsert_values(select(SID, KEY, VALUE).where(first(new_session)), new_session)

    # update_session: values written (creating the session), keys removed and the expiry
    # set, in one statement. Without values to write it never creates the session: the
    # expiry then goes through a plain UPDATE (touched) of an existing one.
    writing = func.cardinality(keys) > literal_column("0")
    session_written = create_or_lock(select(SID, EXPIRES_AT).where(writing))
    touched = (
        update(S)
        .where(S.c.id == SID, SET_EXPIRY, ~writing)
        .values(expires_at=EXPIRES_AT)
        .returning(S.c.id)
        .cte("touched")
    )
    removed = (
        delete(V)
        .where(
            V.c.session_id == SID,
            V.c.key == any_(remove),
            first(session_written, touched),
        )
        .returning(V.c.key)
        .cte("removed")
    )
    pairs = func.unnest(keys, values).table_valued("key", "value").render_derived(name="pairs")
    update_session = upsert_values(
        select(SID, pairs.c.key, pairs.c.value).where(first(session_written, touched)),
        session_written,
        touched,
        removed,
    )

    remove_values = delete(V).where(V.c.session_id == SID, V.c.key == any_(remove))

    def remove_batch(condition: ColumnElement[bool], order: Any) -> Executable:
        # One bounded batch; rows locked by writers are skipped, never waited for (and a row
        # a writer changed meanwhile is checked again against the condition once locked).
        # "= ANY(ARRAY(subquery))", not "IN (subquery)": the planner turns IN into a join
        # that scans the whole table per batch, while the array is computed once (an
        # InitPlan) and probed through the primary key.
        doomed = batch(condition, order).with_for_update(skip_locked=True)
        return delete(S).where(S.c.id == any_(func.array(doomed.scalar_subquery())))

    return Dialect(
        name="postgresql",
        begin="BEGIN",
        single_writer=False,
        remove_session=(DELETE_SESSION,),  # values go by ON DELETE CASCADE
        write_value=(write_value,),
        update_session=(update_session,),
        remove_values=(remove_values,),
        remove_created_before=(remove_batch(CREATED_BEFORE, S.c.created_at),),
        remove_expired=(remove_batch(EXPIRED, S.c.expires_at),),
        update_params=lambda sid, mapping, remove_keys, set_expiry, expires_at: {
            "sid": sid,
            "keys": list(mapping),
            "values": list(mapping.values()),
            "remove": remove_keys,
            "set_expiry": set_expiry,
            "expires_at": expires_at,
        },
        remove_values_params=lambda sid, keys: {"sid": sid, "remove": keys},
        time_param=lambda moment: moment,
        migration_lock=_migration_lock,
        on_connect=None,
    )


#: PostgreSQL's statements (``Dialect.variant`` is set where the dialects are listed).
POSTGRESQL = _dialect()
