"""The packaged migrations: upgrade, downgrade, models equal to the migrated schema, and an
installed wheel migrating a database outside the checkout."""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
from alembic.autogenerate import compare_metadata
from alembic.migration import MigrationContext
from sqlalchemy import Connection, inspect
from sqlalchemy.ext.asyncio import create_async_engine

from sessions_sql import SQLAlchemyBackend, migrate
from sessions_sql._migrate import VERSION_TABLE, alembic_config
from sessions_sql.models import Base

REPO = Path(__file__).resolve().parent.parent


def _new_database(request: pytest.FixtureRequest, database: str) -> str:
    server = request.getfixturevalue(f"{database.replace('postgresql', 'postgres')}_server")
    url: str = server.new_database()
    return url


@pytest.fixture(params=["postgresql", "mariadb"])
def server_url(request: pytest.FixtureRequest) -> str:
    """A fresh, empty database on a server that several processes can migrate at once."""
    return _new_database(request, request.param)


@pytest.fixture(params=["sqlite", "postgresql", "mariadb"])
def empty_url(request: pytest.FixtureRequest) -> str:
    if request.param == "sqlite":
        url: str = request.getfixturevalue("sqlite_url")
        return url
    return _new_database(request, request.param)


def _diff(connection: Connection) -> list[Any]:
    context = MigrationContext.configure(
        connection, opts={"compare_type": True, "version_table": VERSION_TABLE}
    )
    return compare_metadata(context, Base.metadata)


def _tables(connection: Connection) -> set[str]:
    return set(inspect(connection).get_table_names())


async def _inspect(url: str, fn: Any) -> Any:
    engine = create_async_engine(url)
    try:
        async with engine.connect() as conn:
            return await conn.run_sync(fn)
    finally:
        await engine.dispose()


async def test_upgrade_creates_exactly_the_models(empty_url: str) -> None:
    await migrate(empty_url)
    assert await _inspect(empty_url, _tables) == {"sessions", "session_values", VERSION_TABLE}
    assert await _inspect(empty_url, _diff) == []
    await migrate(empty_url)  # a second upgrade is a no-op


async def test_downgrade_to_base_and_back(empty_url: str) -> None:
    from alembic import command

    await migrate(empty_url)
    engine = create_async_engine(empty_url)
    try:
        async with engine.connect() as conn:
            await conn.run_sync(lambda c: command.downgrade(alembic_config(c), "base"))
        async with engine.connect() as conn:
            assert await conn.run_sync(_tables) == {VERSION_TABLE}
    finally:
        await engine.dispose()
    await migrate(empty_url)
    async with SQLAlchemyBackend.from_url(empty_url) as backend:
        await backend.write_value("s", "k", b"v")
        assert await backend.read_value("s", "k") == b"v"


def test_concurrent_migrator_processes(server_url: str) -> None:
    """Several worker processes upgrading at once: the advisory (PostgreSQL) or named
    (MariaDB) lock serialises them."""
    script = "import asyncio, sessions_sql, sys; asyncio.run(sessions_sql.migrate(sys.argv[1]))"
    workers = [
        subprocess.Popen([sys.executable, "-c", script, server_url], stderr=subprocess.PIPE)
        for _ in range(4)
    ]
    for worker in workers:
        _, stderr = worker.communicate(timeout=120)
        assert worker.returncode == 0, stderr.decode()
    assert asyncio.run(_inspect(server_url, _diff)) == []


async def test_concurrent_migrations_in_one_process(server_url: str) -> None:
    await asyncio.gather(*(migrate(server_url) for _ in range(4)))
    assert await _inspect(server_url, _diff) == []


def _run(args: list[str], cwd: Path, env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    result = subprocess.run(args, cwd=cwd, env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    return result


def test_alembic_upgrade_from_checkout(tmp_path: Path) -> None:
    """`alembic upgrade head` in the repository root migrates SESSIONS_SQL_URL."""
    url = f"sqlite+aiosqlite:///{tmp_path / 'checkout.db'}"
    env = {**os.environ, "SESSIONS_SQL_URL": url}
    alembic = [sys.executable, "-m", "alembic"]
    _run([*alembic, "upgrade", "head"], REPO, env)
    assert "0002 (head)" in _run([*alembic, "current"], REPO, env).stdout
    offline = _run([*alembic, "upgrade", "head", "--sql"], REPO, env).stdout
    assert "CREATE TABLE sessions" in offline
    assert asyncio.run(_inspect(url, _tables)) == {"sessions", "session_values", VERSION_TABLE}


def test_wheel_migrates_outside_the_checkout(tmp_path: Path) -> None:
    """A wheel built from the repository carries the migrations and can migrate a database."""
    _run(
        [sys.executable, "-m", "pip", "wheel", "--no-deps", "-q", "-w", str(tmp_path), str(REPO)],
        tmp_path,
        dict(os.environ),
    )
    (wheel,) = tmp_path.glob("sessions_sql-*.whl")
    site = tmp_path / "site"
    _run(
        [
            sys.executable,
            "-m",
            "pip",
            "install",
            "--no-deps",
            "-q",
            "--target",
            str(site),
            str(wheel),
        ],
        tmp_path,
        dict(os.environ),
    )
    script = (
        "import asyncio, sessions_sql, sys\n"
        "print(sessions_sql.__file__)\n"
        "asyncio.run(sessions_sql.migrate(sys.argv[1]))\n"
    )
    url = f"sqlite+aiosqlite:///{tmp_path / 'installed.db'}"
    env = {**os.environ, "PYTHONPATH": str(site)}
    result = _run([sys.executable, "-c", script, url], tmp_path, env)
    assert result.stdout.startswith(str(site))
    assert asyncio.run(_inspect(url, _tables)) == {"sessions", "session_values", VERSION_TABLE}
