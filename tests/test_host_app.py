"""examples/host_app: an application with its own model and Alembic history, embedding
sessions_sql exactly as the README says. On PostgreSQL and MariaDB."""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import pytest
from alembic.autogenerate import compare_metadata
from alembic.migration import MigrationContext
from sqlalchemy import Connection, inspect, text
from sqlalchemy.exc import IntegrityError
from sqlalchemy.ext.asyncio import AsyncEngine, AsyncSession, create_async_engine

from sessions_sql import SQLAlchemyBackend, include_name

HOST = Path(__file__).resolve().parent.parent / "examples" / "host_app"


@pytest.fixture(scope="module")
def host_modules() -> Iterator[Any]:
    sys.path.insert(0, str(HOST))
    try:
        from host_app import login, models

        yield models, login
    finally:
        sys.path.remove(str(HOST))


def alembic(url: str, *args: str) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "DATABASE_URL": url, "SESSIONS_SQL_URL": url}
    return subprocess.run(
        [sys.executable, "-m", "alembic", *args],
        cwd=HOST,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )


def ok(result: subprocess.CompletedProcess[str]) -> str:
    assert result.returncode == 0, result.stderr
    return result.stdout + result.stderr


@pytest.fixture(params=["postgresql", "mariadb"])
def fresh_url(request: pytest.FixtureRequest) -> str:
    """A new, empty database on each server."""
    server = request.getfixturevalue(f"{request.param.replace('postgresql', 'postgres')}_server")
    url: str = server.new_database()
    return url


@pytest.fixture
def host_db(fresh_url: str) -> str:
    """A database upgraded by both histories, from empty."""
    ok(alembic(fresh_url, "upgrade", "head"))
    ok(alembic(fresh_url, "-n", "sessions_sql", "upgrade", "head"))
    return fresh_url


@pytest.fixture
async def host_engine(host_db: str) -> AsyncIterator[AsyncEngine]:
    engine = create_async_engine(host_db)
    yield engine
    await engine.dispose()


def _tables(conn: Connection) -> set[str]:
    return set(inspect(conn).get_table_names())


def test_both_histories_upgrade_side_by_side(host_db: str) -> None:
    assert "a1 (head)" in ok(alembic(host_db, "current"))
    assert "0002 (head)" in ok(alembic(host_db, "-n", "sessions_sql", "current"))
    # One head each: neither history sees the other's revisions.
    assert "a1" not in ok(alembic(host_db, "-n", "sessions_sql", "heads"))
    assert "0001" not in ok(alembic(host_db, "heads"))


def test_host_autogenerate_reports_no_changes(host_db: str) -> None:
    assert "No new upgrade operations detected" in ok(alembic(host_db, "check"))


async def test_include_name_is_what_keeps_autogenerate_quiet(
    host_engine: AsyncEngine, host_modules: Any
) -> None:
    models, _ = host_modules

    def diff(conn: Connection, **opts: Any) -> list[Any]:
        context = MigrationContext.configure(conn, opts=opts)
        return compare_metadata(context, models.Base.metadata)

    async with host_engine.connect() as conn:
        assert await conn.run_sync(diff, include_name=include_name) == []
        unfiltered = await conn.run_sync(diff)
    dropped = {op[1].name for op in unfiltered if op[0] == "remove_table"}
    assert dropped == {"sessions", "session_values", "sessions_sql_alembic_version"}


async def test_our_downgrade_keeps_the_host_tables(host_db: str, host_engine: AsyncEngine) -> None:
    async with host_engine.begin() as conn:
        await conn.execute(text("INSERT INTO users (name) VALUES ('ada')"))
    ok(alembic(host_db, "-n", "sessions_sql", "downgrade", "base"))
    async with host_engine.connect() as conn:
        tables = await conn.run_sync(_tables)
        assert {"users", "alembic_version"} <= tables
        assert not {"sessions", "session_values"} & tables
        assert (await conn.execute(text("SELECT name FROM users"))).scalar_one() == "ada"
    assert "a1 (head)" in ok(alembic(host_db, "current"))


def test_offline_sql_for_a_dba(host_db: str) -> None:
    script = ok(alembic(host_db, "-n", "sessions_sql", "upgrade", "head", "--sql"))
    assert "CREATE TABLE sessions" in script
    assert "sessions_sql_alembic_version" in script


async def count(engine: AsyncEngine, table: str) -> int:
    async with engine.connect() as conn:
        return int((await conn.execute(text(f"SELECT count(*) FROM {table}"))).scalar_one())


async def test_login_commits_user_and_session_together(
    host_engine: AsyncEngine, host_modules: Any
) -> None:
    _, login = host_modules
    backend = SQLAlchemyBackend(host_engine)
    session_id = await login.sign_up_and_log_in(host_engine, backend, "grace")
    assert await count(host_engine, "users") == 1
    assert await backend.read_value(session_id, "user_id") is not None


async def test_failed_login_rolls_back_user_and_session(
    host_engine: AsyncEngine, host_modules: Any
) -> None:
    _, login = host_modules
    backend = SQLAlchemyBackend(host_engine)
    await login.sign_up_and_log_in(host_engine, backend, "grace")
    with pytest.raises(IntegrityError):
        # The same name again: the user insert fails, so the transaction rolls back.
        await login.sign_up_and_log_in(host_engine, backend, "grace")

    class Abort(Exception):
        pass

    with pytest.raises(Abort):
        async with host_engine.begin() as conn:
            await conn.execute(text("INSERT INTO users (name) VALUES ('linus')"))
            bound = backend.using(conn)
            await bound.write_values("in-tx", {"a": b"1", "b": b"2"})
            assert await bound.read_values("in-tx") == {"a": b"1", "b": b"2"}
            assert await backend.read_value("in-tx", "a") is None  # not committed yet
            raise Abort
    assert await count(host_engine, "users") == 1
    assert await count(host_engine, "sessions") == 1
    assert await backend.read_values("in-tx") == {}


async def test_using_an_orm_session(host_engine: AsyncEngine, host_modules: Any) -> None:
    models, _ = host_modules
    backend = SQLAlchemyBackend(host_engine)
    async with AsyncSession(host_engine) as orm:
        orm.add(models.User(name="barbara"))
        await backend.using(orm).write_value("orm", "k", b"v")
        await orm.rollback()
    assert await backend.get_sessions() == []
    async with AsyncSession(host_engine) as orm:
        orm.add(models.User(name="barbara"))
        await backend.using(orm).write_value("orm", "k", b"v")
        await orm.commit()
    assert await count(host_engine, "users") == 1
    assert await backend.read_value("orm", "k") == b"v"


async def test_concurrent_workers_upgrade(fresh_url: str) -> None:
    results = await asyncio.gather(
        *(
            asyncio.to_thread(alembic, fresh_url, "-n", "sessions_sql", "upgrade", "head")
            for _ in range(3)
        )
    )
    for result in results:
        ok(result)
