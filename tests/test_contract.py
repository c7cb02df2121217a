"""The conformance suite run against every backend of the package."""

from __future__ import annotations

from collections.abc import AsyncIterator

import pytest

from sessions_sql import MemoryBackend, SQLAlchemyBackend
from sessions_sql.testing import (
    BackendContract,
    BatchValuesContract,
    BulkRemovalContract,
    SessionExpiryContract,
    SessionListingContract,
)

from .conftest import CITUS, DATABASES, PGBOUNCER, empty_database


@pytest.fixture(params=[*DATABASES, *PGBOUNCER, *CITUS])
def db_url(request: pytest.FixtureRequest) -> str:
    """Every database, PostgreSQL through PgBouncer in transaction mode, and Citus."""
    return empty_database(request, request.param)


EXTENSIONS = (
    BulkRemovalContract,
    BatchValuesContract,
    SessionListingContract,
    SessionExpiryContract,
)


class TestMemoryBackend(BackendContract, *EXTENSIONS):
    @pytest.fixture
    async def backend(self) -> AsyncIterator[MemoryBackend]:
        yield MemoryBackend()


class TestSQLAlchemyBackend(BackendContract, *EXTENSIONS):
    """Runs on SQLite and PostgreSQL through the ``backend`` fixture of conftest.py."""

    async def test_backend_under_test_is_sqlalchemy(self, backend: SQLAlchemyBackend) -> None:
        assert isinstance(backend, SQLAlchemyBackend)
