"""Behind PgBouncer in transaction mode, misconfigured: the driver's prepared statements left on.

The contract and race tests run through PgBouncer with the settings the README documents (see
``PGBOUNCER_CONNECT_ARGS`` in conftest.py). Here each driver keeps its default: asyncpg's
statement cache, psycopg's preparing after five executions. Named prepared statements then
land on server connections that do not have them, and every failure must be a
``BackendError`` that says which setting to change.
"""

from __future__ import annotations

import asyncio

import pytest

from sessions_sql import BackendError, SQLAlchemyBackend

from .conftest import guard, with_driver

DEFAULTS = {"asyncpg": {"statement_cache_size": 100}, "psycopg": {"prepare_threshold": 5}}


@pytest.mark.parametrize("driver", sorted(DEFAULTS))
async def test_prepared_statements_left_on_give_one_clear_error(
    pgbouncer_url: str, driver: str
) -> None:
    url = with_driver(pgbouncer_url, driver)
    errors: list[Exception] = []
    async with SQLAlchemyBackend.from_url(url, connect_args=DEFAULTS[driver]) as backend:

        async def work(n: int) -> None:
            for i in range(40):
                try:
                    await backend.write_value(f"pgb-{n}", "k", b"%d" % i)
                    await backend.read_value(f"pgb-{n}", "k")
                except Exception as error:
                    errors.append(error)

        await guard(asyncio.gather(*(work(n) for n in range(16))), "the calls")
    assert errors, "no prepared statement went astray: is PgBouncer in transaction mode?"
    setting = {"asyncpg": "statement_cache_size=0", "psycopg": "prepare_threshold=None"}[driver]
    for error in errors:
        assert isinstance(error, BackendError), repr(error)
        assert setting in str(error) and "PgBouncer" in str(error)
        assert error.__cause__ is not None
