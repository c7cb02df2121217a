"""sessions_sql: an async SQL session store on SQLAlchemy 2, for PostgreSQL and SQLite.

A session is a set of named byte values plus its creation time. :class:`SQLAlchemyBackend`
stores sessions in two tables managed by the packaged Alembic migrations (:func:`migrate`);
:class:`MemoryBackend` keeps them in memory for tests.
"""

from ._backend import SQLAlchemyBackend
from ._memory import MemoryBackend
from ._migrate import include_name, migrate
from ._protocol import (
    KEEP,
    BackendError,
    BatchValues,
    BulkRemoval,
    SessionBackend,
    SessionError,
    SessionExpiry,
    SessionListing,
    SessionSnapshot,
    SessionsSQLError,
    check_extension,
)
from ._session import Session, SessionCollector, SessionManager, decode_value, encode_value

__all__ = [
    "KEEP",
    "BackendError",
    "BatchValues",
    "BulkRemoval",
    "MemoryBackend",
    "SQLAlchemyBackend",
    "Session",
    "SessionBackend",
    "SessionCollector",
    "SessionError",
    "SessionExpiry",
    "SessionListing",
    "SessionManager",
    "SessionSnapshot",
    "SessionsSQLError",
    "check_extension",
    "decode_value",
    "encode_value",
    "include_name",
    "migrate",
]

__version__ = "0.1.0"
