"""Alembic glue: run the package's migrations from code, and keep a host's autogenerate away
from the package's tables.

The migrations form their own Alembic environment (``sessions_sql:migrations``) with their own
version table, so they live beside a host application's history without merging heads.
"""

from __future__ import annotations

from typing import Any

from alembic import command
from alembic.config import Config
from sqlalchemy import Connection
from sqlalchemy.engine import URL
from sqlalchemy.exc import SQLAlchemyError
from sqlalchemy.ext.asyncio import AsyncEngine, create_async_engine

from ._execution import LoopLock
from ._protocol import BackendError
from .models import Base

__all__ = [
    "SCRIPT_LOCATION",
    "VERSION_TABLE",
    "alembic_config",
    "include_name",
    "migrate",
]

#: Alembic ``script_location`` of the packaged migrations.
SCRIPT_LOCATION = "sessions_sql:migrations"
#: The version table of the package's own migration history.
VERSION_TABLE = "sessions_sql_alembic_version"

_OUR_NAMES = frozenset(Base.metadata.tables) | {VERSION_TABLE}
_OUR_INDEXES = frozenset(
    str(index.name) for table in Base.metadata.tables.values() for index in table.indexes
)


# Alembic keeps the running migration in module globals (alembic.context, alembic.op), so two
# migrations interleaving on one event loop would corrupt each other: one at a time per loop.
# Between processes, the lock env.py takes first (`_dialects.migration_lock`) serialises them.
_ONE_AT_A_TIME = LoopLock()


def include_name(name: str | None, type_: str, parent_names: Any) -> bool:
    """Alembic ``include_name`` hook: ``False`` for sessions_sql's tables, indexes and version
    table, ``True`` for everything else.

    Pass it as ``include_name=`` to ``context.configure(...)`` in a host's ``env.py`` (or call
    it from the host's own filter) so the host's autogenerate neither drops nor re-creates them.
    """
    if type_ == "table":
        return name not in _OUR_NAMES
    if type_ in ("index", "unique_constraint", "foreign_key_constraint", "column"):
        table = parent_names.get("table_name") if parent_names else None
        return table not in _OUR_NAMES and (type_ != "index" or name not in _OUR_INDEXES)
    return True


def alembic_config(
    connection: Connection | None = None,
    *,
    schema: str | None = None,
    url: str | None = None,
    citus: bool = False,
) -> Config:
    """Return an Alembic ``Config`` for the packaged migrations.

    With ``connection`` (not inside a transaction: the migrations begin and commit their own)
    the migrations run on it; else on ``url`` (offline ``--sql`` mode needs only that).
    ``citus`` distributes the tables on a Citus coordinator after an upgrade (as ``-x
    citus=true`` on the command line).
    """
    config = Config()
    config.set_main_option("script_location", SCRIPT_LOCATION)
    if url is not None:
        config.set_main_option("sqlalchemy.url", url.replace("%", "%%"))
    config.attributes["connection"] = connection
    config.attributes["schema"] = schema
    if citus:
        config.attributes["citus"] = True
    return config


def _upgrade(connection: Connection, revision: str, schema: str | None, citus: bool) -> None:
    command.upgrade(alembic_config(connection, schema=schema, citus=citus), revision)


async def migrate(
    engine_or_url: AsyncEngine | str | URL,
    revision: str = "head",
    *,
    schema: str | None = None,
    citus: bool = False,
) -> None:
    """Upgrade the database to ``revision`` (default: the newest) with the packaged migrations.

    Safe to run from several workers at once on PostgreSQL (an advisory lock serialises them).
    ``schema`` puts the tables and the version table in that PostgreSQL schema. ``citus``
    (on a Citus coordinator) then distributes both tables by session id, co-located, and
    creates the functions the backend runs there; idempotent, and a ``BackendError`` on a
    server without the citus extension.
    """
    if not isinstance(revision, str) or not revision:
        raise ValueError("revision must be a non-empty str")
    if schema is not None and (not isinstance(schema, str) or not schema):
        raise ValueError("schema must be a non-empty str or None")
    if not isinstance(citus, bool):
        raise TypeError(f"citus must be a bool, not {type(citus).__name__}")
    if isinstance(engine_or_url, AsyncEngine):
        engine, owned = engine_or_url, False
    elif isinstance(engine_or_url, (str, URL)):
        engine, owned = create_async_engine(engine_or_url), True
    else:
        raise TypeError(
            f"engine_or_url must be an AsyncEngine, str or URL, not {type(engine_or_url).__name__}"
        )
    try:
        async with _ONE_AT_A_TIME, engine.connect() as conn:
            await conn.run_sync(_upgrade, revision, schema, citus)
    except BackendError:
        raise
    except (SQLAlchemyError, OSError) as error:
        raise BackendError(
            f"migration failed: the database raised {type(error).__name__}"
        ) from error
    finally:
        if owned:
            await engine.dispose()
