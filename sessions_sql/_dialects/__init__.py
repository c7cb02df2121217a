"""The SQL each database runs for each operation: the one place where PostgreSQL (and Citus),
SQLite and MariaDB/MySQL differ, one module per database.

Every statement is built once, at import, as a Core construct (so SQLAlchemy caches its
compiled form and ``schema_translate_map`` applies). An operation is a *script*: a tuple of
statements, each run once with the call's parameters, or (:class:`Many`) once per row of a
list among them. A script of one plain statement runs on its own, in autocommit (one round
trip); any other runs inside an explicit write transaction opened with :attr:`Dialect.begin`.
Times are bound as :attr:`Dialect.time_param` converts them (whole seconds, UTC).
"""

from __future__ import annotations

import contextlib
import dataclasses

from sqlalchemy.engine import Connection

from .citus import distribute_on_citus, find_citus, require_citus
from .common import Dialect, Many, Params, Script
from .mysql import MYSQL
from .postgresql import POSTGRESQL
from .sqlite import SQLITE

__all__ = [
    "Dialect",
    "Many",
    "Params",
    "Script",
    "dialect_for",
    "distribute_on_citus",
    "migration_lock",
    "require_citus",
]

_DIALECTS = {
    # PostgreSQL becomes Citus on a database whose tables are distributed.
    "postgresql": dataclasses.replace(POSTGRESQL, variant=find_citus),
    "sqlite": SQLITE,
    "mysql": MYSQL,
    # A MariaDB URL (mariadb+asyncmy://) names SQLAlchemy's MariaDB dialect: the same SQL.
    "mariadb": MYSQL,
}


def migration_lock(connection: Connection) -> contextlib.AbstractContextManager[None]:
    """The migration lock of ``connection``'s database (:attr:`Dialect.migration_lock`); on
    a database this package has no statements for, none."""
    dialect = _DIALECTS.get(connection.dialect.name)
    return contextlib.nullcontext() if dialect is None else dialect.migration_lock(connection)


def dialect_for(name: str) -> Dialect:
    """Return the statements for a SQLAlchemy dialect name, or raise ``ValueError``."""
    try:
        return _DIALECTS[name]
    except KeyError:
        names = ", ".join(sorted(_DIALECTS))
        raise ValueError(f"unsupported database {name!r}; supported: {names}") from None
