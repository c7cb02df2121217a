"""MariaDB and MySQL (InnoDB): each write several statements in one transaction, the session
row first."""

from __future__ import annotations

import contextlib
from collections.abc import Mapping
from datetime import datetime, timezone
from typing import Any

from sqlalchemy import case, text, update
from sqlalchemy.dialects import mysql
from sqlalchemy.engine import Connection
from sqlalchemy.sql.expression import Executable

from ..models import sessions_table as S
from ..models import values_table as V
from .common import (
    CUTOFF,
    DELETE_SESSION,
    EXPIRES_AT,
    KEY,
    LIMIT,
    NOW,
    REMOVE_VALUE,
    SET_EXPIRY,
    SID,
    VALUE,
    Dialect,
    Many,
    Params,
    key_rows,
    polled_lock,
    value_rows,
)


def _naive_utc(moment: datetime) -> datetime:
    # DATETIME(6) holds no time zone (and asyncmy would drop it): UTC, as UTC_TIMESTAMP writes.
    return moment.astimezone(timezone.utc).replace(tzinfo=None)


def _migration_lock(connection: Connection) -> contextlib.AbstractContextManager[None]:
    # A named lock of the connection, held across the migrations (MySQL's DDL commits on its
    # own), released with the connection if the process dies; one name per database. Taken
    # by polling with a zero timeout, like PostgreSQL's.
    name = "CONCAT('sessions_sql.migrate.', SHA1(COALESCE(DATABASE(), '')))"
    return polled_lock(connection, f"SELECT GET_LOCK({name}, 0)", f"SELECT RELEASE_LOCK({name})")


def _dialect() -> Dialect:
    # MariaDB and MySQL (InnoDB) have no data-modifying CTE: a write is several statements in
    # one transaction, the session row first. Its INSERT ... ON DUPLICATE KEY UPDATE creates
    # the session or locks its row (also when it changes nothing), and a call that must not
    # create it locks it with an UPDATE: writers and remove_session (session row, then the
    # cascade to values) so take their locks in one order. INSERT IGNORE is never used (it
    # would truncate an over-long id with a warning); deadlocks the server still detects are
    # retried (see _execution).
    insert = mysql.insert
    session_row = insert(S).values(id=SID, expires_at=EXPIRES_AT)
    session_row = session_row.on_duplicate_key_update(
        expires_at=case((SET_EXPIRY, session_row.inserted.expires_at), else_=S.c.expires_at)
    )
    lock_session = (
        update(S)
        .where(S.c.id == SID)
        .values(expires_at=case((SET_EXPIRY, EXPIRES_AT), else_=S.c.expires_at))
    )
    upsert = insert(V).values(session_id=SID, key=KEY, value=VALUE)
    upsert = upsert.on_duplicate_key_update(value=upsert.inserted.value)
    update_session = (
        Many(session_row, "creating"),
        Many(lock_session, "locking"),
        Many(REMOVE_VALUE, "removed"),
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
        ).bindparams(moment, LIMIT)

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
            "removed": key_rows(sid, remove_keys),
            "written": value_rows(sid, mapping),
        }

    return Dialect(
        name="mysql",
        begin="START TRANSACTION",
        single_writer=False,
        remove_session=(DELETE_SESSION,),  # values go by ON DELETE CASCADE
        write_value=(session_row, upsert),
        update_session=update_session,
        remove_values=update_session,  # the session row locked first, then the removals
        remove_created_before=(remove_batch("created_at < :cutoff", "created_at", CUTOFF),),
        remove_expired=(remove_batch("expires_at < :now", "expires_at", NOW),),
        update_params=update_params,
        remove_values_params=lambda sid, keys: update_params(sid, {}, keys, False, None),
        time_param=_naive_utc,
        migration_lock=_migration_lock,
        on_connect=None,
    )


#: MariaDB's and MySQL's statements (the same SQL).
MYSQL = _dialect()
