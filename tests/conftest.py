"""Fixtures: every backend test runs on SQLite (a temporary file), on PostgreSQL through
asyncpg and through psycopg 3, and on MariaDB through asyncmy.

PostgreSQL comes from SESSIONS_SQL_TEST_POSTGRES_URL (any database on the server; the tests
create and drop databases of their own beside it). Without the variable the PostgreSQL cases
skip, except when CI is set: then a missing or unreachable server fails the run. The contract
and race tests also run through PgBouncer in transaction mode, from
SESSIONS_SQL_TEST_PGBOUNCER_URL (a PgBouncer in front of that server; same rules). The
contract, model, race, garbage collection and migration tests also run on a Citus cluster,
from SESSIONS_SQL_TEST_CITUS_URL (its coordinator, with its workers added; same rules).
MariaDB (or MySQL) comes from SESSIONS_SQL_TEST_MYSQL_URL (same rules; the asyncmy driver, and
databases of the tests' own beside the one named).
"""

from __future__ import annotations

import asyncio
import os
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Iterator
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import event, text
from sqlalchemy.engine import Engine, make_url
from sqlalchemy.exc import SQLAlchemyError
from sqlalchemy.ext.asyncio import AsyncEngine, create_async_engine
from sqlalchemy.pool import AsyncAdaptedQueuePool

from sessions_sql import MemoryBackend, SQLAlchemyBackend, migrate

POSTGRES_ENV = "SESSIONS_SQL_TEST_POSTGRES_URL"
PGBOUNCER_ENV = "SESSIONS_SQL_TEST_PGBOUNCER_URL"
CITUS_ENV = "SESSIONS_SQL_TEST_CITUS_URL"
MARIADB_ENV = "SESSIONS_SQL_TEST_MYSQL_URL"
#: Seconds without an outcome after which a step counts as hung. Only ever reached by a hang,
#: so generous: on a loaded 2-core machine a child process took 12 s just to import aiogram.
HANG_GUARD = 300.0


def now() -> int:
    """A clock shared by every process of the machine, to order events across them."""
    return time.monotonic_ns()


async def guard(awaitable: Awaitable[Any], what: str) -> Any:
    """Await ``awaitable``; a hang (no outcome within HANG_GUARD) fails the test. Exceptions,
    including a TimeoutError raised by the awaitable itself, pass through unchanged."""
    task = asyncio.ensure_future(awaitable)
    done, _ = await asyncio.wait({task}, timeout=HANG_GUARD)
    if not done:
        task.cancel()
        pytest.fail(f"{what} hung for {HANG_GUARD}s", pytrace=False)
    return task.result()


def _postgres_unavailable(reason: str, what: str = "PostgreSQL") -> None:
    if os.environ.get("CI"):
        pytest.fail(f"CI is set but {what} is not usable: {reason}", pytrace=False)
    pytest.skip(f"{what} tests skipped: {reason}")


#: What the README tells applications behind PgBouncer in transaction mode to pass as
#: connect_args, by driver.
PGBOUNCER_CONNECT_ARGS: dict[str, dict[str, Any]] = {
    "asyncpg": {"statement_cache_size": 0},
    "psycopg": {"prepare_threshold": None},
}
_PGBOUNCER_PORT = (
    make_url(os.environ[PGBOUNCER_ENV]).port if os.environ.get(PGBOUNCER_ENV) else None
)


@event.listens_for(Engine, "do_connect")
def _pgbouncer_settings(dialect: Any, record: Any, cargs: Any, cparams: dict[str, Any]) -> None:
    """Every engine of the tests that connects through PgBouncer gets exactly those settings,
    as if its connect_args held them (connect_args given explicitly win)."""
    port = cparams.get("port")
    if _PGBOUNCER_PORT is not None and port is not None and int(port) == _PGBOUNCER_PORT:
        for name, value in PGBOUNCER_CONNECT_ARGS.get(dialect.driver, {}).items():
            cparams.setdefault(name, value)


async def _admin(url: str, *statements: str) -> None:
    engine = create_async_engine(url, isolation_level="AUTOCOMMIT")
    try:
        async with engine.connect() as conn:
            for statement in statements:
                await conn.execute(text(statement))
    finally:
        await engine.dispose()


class PostgresServer:
    """The test server: makes fresh, empty databases and drops them afterwards."""

    def __init__(self, url: str) -> None:
        self.url = url
        self.created: list[str] = []

    def new_database(self) -> str:
        """Create an empty database and return its URL (asyncpg driver)."""
        name = f"sessions_sql_test_{uuid.uuid4().hex[:12]}"
        asyncio.run(_admin(self.url, f'CREATE DATABASE "{name}"'))
        self.created.append(name)
        return make_url(self.url).set(database=name).render_as_string(hide_password=False)

    def drop_all(self) -> None:
        for name in self.created:
            asyncio.run(_admin(self.url, f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))


@pytest.fixture(scope="session")
def postgres_server() -> Iterator[PostgresServer]:
    raw = os.environ.get(POSTGRES_ENV)
    if not raw:
        _postgres_unavailable(f"{POSTGRES_ENV} is not set")
    url = make_url(raw).set(drivername="postgresql+asyncpg").render_as_string(hide_password=False)
    try:
        asyncio.run(_admin(url, "SELECT 1"))
    except (OSError, SQLAlchemyError) as error:
        _postgres_unavailable(f"cannot connect ({type(error).__name__}: {error})")
    server = PostgresServer(url)
    yield server
    server.drop_all()


@pytest.fixture(scope="session")
def postgres_url(postgres_server: PostgresServer) -> str:
    """A migrated database shared by the backend tests (tables are emptied per test)."""
    url = postgres_server.new_database()
    asyncio.run(migrate(url))
    return url


class MariaDBServer(PostgresServer):
    """The MariaDB test server: fresh, empty databases, dropped afterwards."""

    def new_database(self) -> str:
        """Create an empty database and return its URL (asyncmy driver)."""
        name = f"sessions_sql_test_{uuid.uuid4().hex[:12]}"
        asyncio.run(_admin(self.url, f"CREATE DATABASE `{name}`"))
        self.created.append(name)
        return make_url(self.url).set(database=name).render_as_string(hide_password=False)

    def drop_all(self) -> None:
        for name in self.created:
            asyncio.run(_admin(self.url, f"DROP DATABASE IF EXISTS `{name}`"))


@pytest.fixture(scope="session")
def mariadb_server() -> Iterator[MariaDBServer]:
    raw = os.environ.get(MARIADB_ENV)
    if not raw:
        _postgres_unavailable(f"{MARIADB_ENV} is not set", "MariaDB")
    url = make_url(raw).set(drivername="mysql+asyncmy").render_as_string(hide_password=False)
    try:
        asyncio.run(_admin(url, "SELECT 1"))
    except (OSError, SQLAlchemyError) as error:
        _postgres_unavailable(f"cannot connect ({type(error).__name__}: {error})", "MariaDB")
    server = MariaDBServer(url)
    yield server
    server.drop_all()


@pytest.fixture(scope="session")
def mariadb_url(mariadb_server: MariaDBServer) -> str:
    """A migrated MariaDB database shared by the backend tests (emptied per test)."""
    url = mariadb_server.new_database()
    asyncio.run(migrate(url))
    return url


@pytest.fixture
def sqlite_url(tmp_path: Path) -> str:
    return f"sqlite+aiosqlite:///{tmp_path / 'sessions.db'}"


def with_driver(url: str, driver: str) -> str:
    """``url`` (a PostgreSQL URL) through another SQLAlchemy driver, e.g. ``psycopg``."""
    return (
        make_url(url).set(drivername=f"postgresql+{driver}").render_as_string(hide_password=False)
    )


@pytest.fixture(scope="session")
def pgbouncer_url(postgres_url: str) -> str:
    """``postgres_url``'s database through PgBouncer (transaction mode), asyncpg driver."""
    raw = os.environ.get(PGBOUNCER_ENV)
    if not raw:
        _postgres_unavailable(f"{PGBOUNCER_ENV} is not set", "PgBouncer")
    bouncer = make_url(raw)
    url = make_url(postgres_url).set(host=bouncer.host, port=bouncer.port)
    rendered = url.render_as_string(hide_password=False)
    try:
        asyncio.run(_admin(rendered, "SELECT 1"))
    except (OSError, SQLAlchemyError) as error:
        _postgres_unavailable(f"cannot connect ({type(error).__name__}: {error})", "PgBouncer")
    return rendered


# Citus: a cluster whose coordinator is at SESSIONS_SQL_TEST_CITUS_URL.


class CitusCluster:
    """The test cluster: makes fresh databases on every node, each with the citus extension
    and the workers added (as on a new cluster), and drops them afterwards."""

    SHARDS = 4

    def __init__(self, url: str, workers: list[tuple[str, int]]) -> None:
        self.url = url
        self.admin_database = make_url(url).database or "postgres"
        self.workers = workers
        self.created: list[str] = []

    def node_url(self, database: str, node: tuple[str, int] | None = None) -> str:
        url = make_url(self.url).set(database=database)
        if node is not None:
            url = url.set(host=node[0], port=node[1])
        return url.render_as_string(hide_password=False)

    def new_database(self) -> str:
        """Create an empty database on the cluster and return its URL (asyncpg driver)."""
        name = f"sessions_sql_test_{uuid.uuid4().hex[:12]}"
        # Citus 13 creates the database on the workers too, when asked to.
        asyncio.run(
            _admin(
                self.url,
                "SET citus.enable_create_database_propagation TO on",
                f'CREATE DATABASE "{name}"',
            )
        )
        self.created.append(name)
        for node in self.workers:
            asyncio.run(_admin(self.node_url(name, node), "CREATE EXTENSION citus"))
        coordinator = make_url(self.url)
        asyncio.run(
            _admin(
                self.node_url(name),
                # Fewer shards than Citus's default 32 (two per worker still): every
                # multi-shard statement of the tests (TRUNCATE, a batch removal) costs less.
                f'ALTER DATABASE "{name}" SET citus.shard_count = {self.SHARDS}',
                # As the README advises: catalog queries (asyncpg's type lookups on a new
                # connection) are slow while the coordinator hides the shards from them.
                f'ALTER DATABASE "{name}" SET citus.override_table_visibility = off',
                "CREATE EXTENSION citus",
                f"SELECT citus_set_coordinator_host('{coordinator.host}', {coordinator.port})",
                *(f"SELECT citus_add_node('{host}', {port})" for host, port in self.workers),
            )
        )
        return self.node_url(name)

    def drop_all(self) -> None:
        # Node by node, coordinator first (its connections to the workers end with it): a
        # propagated DROP would find the coordinator's own connections on the workers.
        for name in self.created:
            for node in (None, *self.workers):
                url = self.node_url(self.admin_database, node)
                asyncio.run(_admin(url, f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))


async def _workers(url: str) -> list[tuple[str, int]]:
    engine = create_async_engine(url)
    try:
        async with engine.connect() as conn:
            rows = await conn.execute(
                text(
                    "SELECT nodename, nodeport FROM pg_dist_node "
                    "WHERE groupid <> 0 AND noderole = 'primary' ORDER BY nodeport"
                )
            )
            return [(host, int(port)) for host, port in rows]
    finally:
        await engine.dispose()


@pytest.fixture(scope="session")
def citus_cluster() -> Iterator[CitusCluster]:
    raw = os.environ.get(CITUS_ENV)
    if not raw:
        _postgres_unavailable(f"{CITUS_ENV} is not set", "Citus")
    url = make_url(raw).set(drivername="postgresql+asyncpg").render_as_string(hide_password=False)
    try:
        workers = asyncio.run(_workers(url))
    except (OSError, SQLAlchemyError) as error:
        _postgres_unavailable(f"cannot use ({type(error).__name__}: {error})", "Citus")
    if not workers:
        _postgres_unavailable("the coordinator has no workers", "Citus")
    cluster = CitusCluster(url, workers)
    yield cluster
    cluster.drop_all()


@pytest.fixture(scope="session")
def citus_url(citus_cluster: CitusCluster) -> str:
    """A database of the cluster migrated with citus=True, shared by the backend tests
    (tables are emptied per test)."""
    url = citus_cluster.new_database()
    asyncio.run(migrate(url, citus=True))
    return url


@pytest.fixture
def fresh_citus_url(citus_cluster: CitusCluster) -> str:
    """URL of a new, empty database of the Citus cluster (not migrated)."""
    return citus_cluster.new_database()


def empty_database(request: pytest.FixtureRequest, database: str) -> str:
    if database == "citus":
        url = request.getfixturevalue("citus_url")
        asyncio.run(_admin(url, "TRUNCATE sessions, session_values"))
        return url
    if database == "sqlite":
        url: str = request.getfixturevalue("sqlite_url")
        asyncio.run(migrate(url))
        return url
    if database == "mariadb":
        url = request.getfixturevalue("mariadb_url")
        asyncio.run(_admin(url, "DELETE FROM sessions"))  # values go by the cascade
        return url
    url = request.getfixturevalue("postgres_url")
    asyncio.run(_admin(url, "TRUNCATE sessions, session_values"))
    if database.startswith("pgbouncer"):
        url = request.getfixturevalue("pgbouncer_url")
    return with_driver(url, "psycopg") if database.endswith("psycopg") else url


#: The databases (and, for PostgreSQL, drivers) every backend test runs on.
DATABASES = ["sqlite", "postgresql", "psycopg", "mariadb"]
#: PostgreSQL through PgBouncer in transaction mode, for the contract and race tests.
PGBOUNCER = ["pgbouncer", "pgbouncer-psycopg"]
#: A Citus cluster, tables distributed by session id: contract, model and race tests.
CITUS = ["citus"]


@pytest.fixture(params=DATABASES)
def db_url(request: pytest.FixtureRequest) -> str:
    """URL of a migrated database with empty tables, on each database and driver."""
    return empty_database(request, request.param)


@pytest.fixture
async def engine(db_url: str) -> AsyncIterator[AsyncEngine]:
    """An engine as a host application would create it: default settings."""
    engine = create_async_engine(db_url)
    yield engine
    await engine.dispose()


@pytest.fixture
async def backend(engine: AsyncEngine) -> SQLAlchemyBackend:
    return SQLAlchemyBackend(engine)


@pytest.fixture
def fresh_postgres_url(postgres_server: PostgresServer) -> str:
    """URL of a new, empty PostgreSQL database (not migrated)."""
    return postgres_server.new_database()


@pytest.fixture(params=["memory", *DATABASES])
def any_url(request: pytest.FixtureRequest) -> str | None:
    """``None`` for MemoryBackend, else a migrated database with empty tables."""
    if request.param == "memory":
        return None
    return empty_database(request, request.param)


@pytest.fixture
async def any_backend(any_url: str | None) -> AsyncIterator[Any]:
    """Each backend of the package, fresh and empty."""
    if any_url is None:
        yield MemoryBackend()
        return
    async with SQLAlchemyBackend.from_url(any_url) as backend:
        yield backend


def queue_pool(size: int) -> dict[str, Any]:
    """Engine options for a pool of exactly ``size`` connections, on either database (on
    SQLite files SQLAlchemy 2.0 defaults to a NullPool, 2.1 to a queue pool)."""
    return {"poolclass": AsyncAdaptedQueuePool, "pool_size": size, "max_overflow": 0}
