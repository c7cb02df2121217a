"""sessions_sql on a Citus cluster: the tables distributed by the package's migrations, the
dialect found from the database, every per-session statement routed to one shard (EXPLAIN),
batch removals per shard that never wait for a writer, and the migrations up and down on
distributed tables. (The contract, model and race tests run on Citus too: see conftest.)"""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import asyncpg  # type: ignore[import-untyped]
import pytest
from alembic import command
from alembic.autogenerate import compare_metadata
from alembic.migration import MigrationContext
from sqlalchemy import Connection, inspect, text
from sqlalchemy.engine import make_url
from sqlalchemy.ext.asyncio import create_async_engine

from sessions_sql import BackendError, SQLAlchemyBackend, migrate
from sessions_sql._dialects import Script
from sessions_sql._dialects.citus import CITUS_FUNCTIONS
from sessions_sql._migrate import VERSION_TABLE, alembic_config
from sessions_sql.models import Base

from .conftest import CitusCluster, empty_database, guard

REPO = Path(__file__).resolve().parent.parent

#: Operations that concern every session: they run on every shard.
FAN_OUT = {"get_sessions", "page_sessions", "remove_created_before", "remove_expired"}

#: A value for every parameter of any script.
PARAMS: dict[str, Any] = {
    "sid": "s1",
    "key": "k",
    "value": b"v",
    "expires_at": None,
    "set_expiry": False,
    "keys": ["a"],
    "values": [b"1"],
    "remove": ["b"],
    "after": "",
    "limit": 10,
    "now": datetime(2030, 1, 1, tzinfo=timezone.utc),
    "cutoff": datetime(2030, 1, 1, tzinfo=timezone.utc),
}


@pytest.fixture
def citus_db(request: pytest.FixtureRequest) -> str:
    """The shared migrated Citus database, tables emptied."""
    return empty_database(request, "citus")


def _dsn(url: str) -> str:
    return make_url(url).set(drivername="postgresql").render_as_string(hide_password=False)


async def _query(url: str, sql: str, *args: Any) -> list[Any]:
    conn = await asyncpg.connect(_dsn(url))
    try:
        return list(await conn.fetch(sql, *args))
    finally:
        await conn.close()


async def _distribution(url: str) -> dict[str, tuple[str, int]]:
    rows = await _query(
        url,
        "SELECT logicalrelid::text, column_to_column_name(logicalrelid, partkey), colocationid "
        "FROM pg_dist_partition WHERE partmethod = 'h'",
    )
    return {table: (column, group) for table, column, group in rows}


def _scripts(backend: SQLAlchemyBackend) -> dict[str, Script]:
    sql = backend._executor.dialect
    return {name: value for name, value in vars(sql).items() if isinstance(value, tuple)}


async def _explain(url: str, backend: SQLAlchemyBackend, script: Script) -> list[str]:
    """EXPLAIN (VERBOSE) of each statement of ``script`` as the backend sends it."""
    plans = []
    conn = await asyncpg.connect(_dsn(url))
    try:
        for statement in backend._executor.compiled(script):
            rows = await conn.fetch("EXPLAIN (VERBOSE) " + statement.sql, *statement.args(PARAMS))
            plans.append("\n".join(row[0] for row in rows))
    finally:
        await conn.close()
    return plans


def _routed(plan: str) -> bool:
    """One task on one shard, no subplans, nothing pulled through the coordinator."""
    return (
        "Custom Scan (Citus Adaptive)" in plan
        and "Task Count: 1\n" in plan
        and "Distributed Subplan" not in plan
        and "intermediate_result" not in plan
    )


async def test_the_backend_finds_citus_from_the_database(citus_db: str) -> None:
    """No option, no other engine: a backend on the distributed tables uses the Citus
    statements from its first call on (on the host's engine and on one of its own)."""
    engine = create_async_engine(citus_db)
    try:
        backend = SQLAlchemyBackend(engine)
        assert backend._executor.dialect.name == "postgresql"  # nothing looked up yet
        await backend.write_value("s1", "k", b"v")
        assert backend._executor.dialect.name == "citus"
        assert await backend.read_value("s1", "k") == b"v"
    finally:
        await engine.dispose()
    async with SQLAlchemyBackend.from_url(citus_db) as owned:
        assert await owned.read_session("s1") is not None
        assert owned._executor.dialect.name == "citus"


async def test_calls_in_the_host_transaction_commit_and_roll_back_with_it(citus_db: str) -> None:
    """Through using(): the Citus writes (there not delegated, run by the coordinator inside
    the host's transaction) commit or roll back with the host's own work."""
    engine = create_async_engine(citus_db)
    try:
        backend = SQLAlchemyBackend(engine)
        async with engine.begin() as conn:
            bound = backend.using(conn)
            await bound.write_value("h1", "k", b"v")
            await bound.update_session("h1", {"a": b"1"}, remove=["k"])
            assert bound._executor.dialect.name == "citus"
            assert await bound.read_values("h1") == {"a": b"1"}
        assert await backend.read_values("h1") == {"a": b"1"}
        async with engine.connect() as conn:
            await backend.using(conn).write_value("h2", "k", b"v")
            await conn.rollback()
        assert await backend.read_session("h2") is None
    finally:
        await engine.dispose()


async def test_every_per_session_statement_is_routed_to_one_shard(citus_db: str) -> None:
    """EXPLAIN of every statement the Citus dialect sends for one session: one task on one
    worker, no distributed subplan, no intermediate results; the writes are the delegated
    function calls, sent whole to the worker. The operations on all sessions fan out."""
    async with SQLAlchemyBackend.from_url(citus_db) as backend:
        await backend.write_values("s1", {"k": b"v", "b": b"w"})  # finds the dialect
        scripts = _scripts(backend)
        assert set(scripts) > FAN_OUT | {"write_value", "read_session", "update_session"}
        for name, script in scripts.items():
            plans = await _explain(citus_db, backend, script)
            assert plans, name
            for plan in plans:
                if name in FAN_OUT:
                    assert "Task Count: 1\n" not in plan, (name, plan)
                else:
                    assert _routed(plan), (name, plan)
        for name in ("write_value", "update_session"):
            [plan] = await _explain(citus_db, backend, scripts[name])
            assert f"Query: SELECT public.sessions_sql_{name}(" in plan, plan
            assert "port=" + str(make_url(citus_db).port) not in plan  # on a worker


async def test_batch_removal_never_waits_for_a_writer(citus_db: str) -> None:
    """A session whose row a writer holds locked is skipped by the batch (on its shard),
    not waited for, and removed by the next pass once the writer is done."""
    async with SQLAlchemyBackend.from_url(citus_db) as backend:
        sids = [f"s{i}" for i in range(12)]
        await asyncio.gather(*(backend.write_value(sid, "k", b"v") for sid in sids))
        engine = create_async_engine(citus_db)
        try:
            async with engine.connect() as conn:
                await conn.execute(
                    text("SELECT 1 FROM sessions WHERE id = 's3' FOR UPDATE")
                )  # a writer's lock, held until this transaction ends
                removed = await guard(
                    backend.remove_sessions_created_before(4_000_000_000, batch_size=2),
                    "a batch removal behind a locked session",
                )
                assert removed == 11
                await conn.commit()
        finally:
            await engine.dispose()
        assert await backend.get_sessions() == ["s3"]
        assert await backend.remove_sessions_created_before(4_000_000_000) == 1
        assert await backend.get_sessions() == []


async def test_without_the_option_nothing_is_distributed(fresh_citus_url: str) -> None:
    """A plain migrate on a Citus coordinator leaves local tables, and the backend runs the
    PostgreSQL statements on them."""
    await migrate(fresh_citus_url)
    assert await _distribution(fresh_citus_url) == {}
    async with SQLAlchemyBackend.from_url(fresh_citus_url) as backend:
        await backend.write_value("s1", "k", b"v")
        assert backend._executor.dialect.name == "postgresql"
        assert await backend.remove_sessions_created_before(4_000_000_000) == 1


async def test_migrate_with_citus_on_plain_postgresql_is_refused(
    fresh_postgres_url: str,
) -> None:
    with pytest.raises(BackendError, match="no citus extension"):
        await migrate(fresh_postgres_url, citus=True)
    # Refused before any change: no table was created.
    assert await _on(fresh_postgres_url, lambda c: inspect(c).get_table_names()) == []
    with pytest.raises(TypeError, match="citus"):
        await migrate(fresh_postgres_url, citus="yes")  # type: ignore[arg-type]


def _diff(connection: Connection) -> list[Any]:
    context = MigrationContext.configure(
        connection, opts={"compare_type": True, "version_table": VERSION_TABLE}
    )
    return compare_metadata(context, Base.metadata)


def _columns(connection: Connection) -> set[str]:
    return {column["name"] for column in inspect(connection).get_columns("sessions")}


async def _on(url: str, fn: Any) -> Any:
    engine = create_async_engine(url)
    try:
        async with engine.connect() as conn:
            return await conn.run_sync(fn)
    finally:
        await engine.dispose()


async def _partial_index_on_every_shard(url: str) -> bool:
    rows = await _query(
        url,
        "SELECT success, result FROM run_command_on_shards('sessions', "
        "$$SELECT count(*) FROM pg_index WHERE indrelid = '%s'::regclass "
        "AND indpred IS NOT NULL AND indisvalid$$)",
    )
    return bool(rows) and all(success and result == "1" for success, result in rows)


async def test_migrations_up_and_down_on_distributed_tables(fresh_citus_url: str) -> None:
    """0001 distributed (both tables by session id, co-located), then 0002 (a column, and
    the partial index built CONCURRENTLY) on the distributed tables, down to 0001 and to
    base, and up again: the schema equals the models on the coordinator, the index is on
    every shard, the backend works; a second migrate changes nothing; the backend names the
    fix when the functions are missing."""
    url = fresh_citus_url
    await migrate(url, "0001", citus=True)
    first = await _distribution(url)
    assert {table: column for table, (column, _) in first.items()} == {
        "sessions": "id",
        "session_values": "session_id",
    }
    assert first["sessions"][1] == first["session_values"][1]  # co-located
    assert "expires_at" not in await _on(url, _columns)
    await migrate(url, citus=True)
    assert await _on(url, _diff) == []
    assert await _partial_index_on_every_shard(url)

    async with SQLAlchemyBackend.from_url(url) as backend:
        await backend.write_value("s1", "k", b"v", expires_at=1_000)
        await backend.write_value("s2", "k", b"v", expires_at=4_000_000_000)
        assert await backend.remove_expired_sessions() == 1
        assert await backend.get_sessions() == ["s2"]

    def downgrade(revision: str) -> Any:
        return lambda c: command.downgrade(alembic_config(c), revision)

    await _on(url, downgrade("0001"))
    assert "expires_at" not in await _on(url, _columns)
    assert set(await _distribution(url)) == {"sessions", "session_values"}
    await _on(url, downgrade("base"))
    assert await _distribution(url) == {}
    assert set(await _on(url, lambda c: inspect(c).get_table_names())) == {VERSION_TABLE}

    await migrate(url, citus=True)
    again = await _distribution(url)
    assert set(again) == {"sessions", "session_values"}
    assert await _on(url, _diff) == []
    async with SQLAlchemyBackend.from_url(url) as backend:
        await backend.update_session("s1", {"k": b"v"}, expires_at=4_000_000_000)
        assert backend._executor.dialect.name == "citus"
        assert (await backend.read_session("s1")) is not None
    await migrate(url, citus=True)
    assert await _distribution(url) == again

    await _query(
        url,
        "DROP FUNCTION sessions_sql_update_session(varchar, varchar[], bytea[], varchar[], "
        "boolean, timestamptz)",
    )
    async with SQLAlchemyBackend.from_url(url) as backend:
        with pytest.raises(BackendError, match=r"migrate\(\.\.\., citus=True\)"):
            await backend.read_value("s1", "k")
    await migrate(url, citus=True)  # puts it back
    async with SQLAlchemyBackend.from_url(url) as backend:
        await backend.update_session("s1", {"k": b"w"})
        assert await backend.read_values("s1") == {"k": b"w"}


def test_alembic_x_citus_true(citus_cluster: CitusCluster) -> None:
    """`alembic -x citus=true upgrade head` in the repository root distributes the tables."""
    url = citus_cluster.new_database()
    env = {**os.environ, "SESSIONS_SQL_URL": url}
    result = subprocess.run(
        [sys.executable, "-m", "alembic", "-x", "citus=true", "upgrade", "head"],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stderr
    assert set(asyncio.run(_distribution(url))) == {"sessions", "session_values"}


async def test_a_false_distributed_deadlock_is_retried(citus_db: str) -> None:
    """Citus's distributed deadlock detector counts every single-statement transaction the
    coordinator sends a worker outside a transaction block as one transaction (number 0,
    citusdata/citus#1803), so writes and removals racing on one session can look like a
    cycle where there is none, and the detector cancels a write (SQLSTATE 40P01). Here:
    statement 1 holds a value row of X; the write (a distributed transaction) holds X's
    session row and waits for statement 1; statement 2 waits for the session row; a second
    write waits behind statement 2. Statements 1 and 2 are "the same" transaction to the
    detector: write -> 0 -> write. The cancelled write is run again and succeeds once the
    statements end; neither write raises."""
    async with SQLAlchemyBackend.from_url(citus_db) as backend:
        await backend.write_values("X", {"k": b"old"})
        holder = await asyncpg.connect(_dsn(citus_db))
        waiter = await asyncpg.connect(_dsn(citus_db))
        try:
            holding = asyncio.create_task(
                holder.execute(
                    "WITH held AS (SELECT key FROM session_values "
                    "WHERE session_id = 'X' AND key = 'k' FOR UPDATE) "
                    "SELECT pg_sleep(6) FROM held"
                )
            )
            await _wait_for_lock_wait(citus_db, 0, "pg_sleep")
            write = asyncio.create_task(backend.update_session("X", {"k": b"new"}))
            await _wait_for_lock_wait(citus_db, 1)
            waiting = asyncio.create_task(
                waiter.execute("SELECT 1 FROM sessions WHERE id = 'X' FOR UPDATE")
            )
            await _wait_for_lock_wait(citus_db, 2)
            behind = asyncio.create_task(backend.write_value("X", "j", b"v"))
            await guard(holding, "the statement holding the value row")
            await guard(waiting, "the statement waiting for the session row")
            await guard(write, "the write")
            await guard(behind, "the write behind it")
        finally:
            await holder.close()
            await waiter.close()
        assert await backend.read_values("X") == {"k": b"new", "j": b"v"}


async def _wait_for_lock_wait(url: str, count: int, running: str | None = None) -> None:
    """Until ``count`` backends of the worker holding session X wait for a lock (and, with
    ``running``, one runs a query containing it)."""
    [(host, port)] = await _query(
        url,
        "SELECT nodename, nodeport FROM pg_dist_placement JOIN pg_dist_node USING (groupid) "
        "WHERE shardid = get_shard_id_for_distribution_column('sessions', 'X')",
    )
    node = make_url(_dsn(url)).set(host=host, port=port)
    worker = await asyncpg.connect(node.render_as_string(hide_password=False))
    try:
        for _ in range(1000):
            waiting, found = await worker.fetchrow(
                "SELECT count(*) FILTER (WHERE wait_event_type = 'Lock'), "
                "count(*) FILTER (WHERE query LIKE '%' || $1 || '%' AND pid <> pg_backend_pid()) "
                "FROM pg_stat_activity WHERE datname = current_database()",
                running or "",
            )
            if waiting >= count and (running is None or found):
                return
            await asyncio.sleep(0.01)
    finally:
        await worker.close()
    raise AssertionError(f"fewer than {count} backends waiting for a lock")


def _sessions_sql(*args: str, url: str) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "SESSIONS_SQL_URL": url}
    return subprocess.run(
        [sys.executable, "-m", "sessions_sql", *args],
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )


def test_cli_migrate_citus(
    citus_cluster: CitusCluster, fresh_postgres_url: str, tmp_path: Path
) -> None:
    """`sessions-sql migrate --citus` distributes the tables, idempotently; it is refused
    where it cannot apply, with the reason, before anything runs."""
    url = citus_cluster.new_database()
    result = _sessions_sql("migrate", "--citus", url=url)
    assert result.returncode == 0, result.stderr
    assert set(asyncio.run(_distribution(url))) == {"sessions", "session_values"}
    assert _sessions_sql("migrate", "upgrade", "head", "--citus", url=url).returncode == 0

    result = _sessions_sql("migrate", "--citus", url=fresh_postgres_url)
    assert result.returncode == 1
    assert "no citus extension" in result.stderr
    assert (
        asyncio.run(
            _query(
                fresh_postgres_url, "SELECT tablename FROM pg_tables WHERE schemaname = 'public'"
            )
        )
        == []
    )
    for args in (("downgrade", "base", "--citus"), ("upgrade", "--sql", "--citus")):
        result = _sessions_sql("migrate", *args, url=url)
        assert result.returncode == 2
        assert "--citus applies to an upgrade" in result.stderr
    result = _sessions_sql("migrate", "--citus", url=f"sqlite+aiosqlite:///{tmp_path}/s.db")
    assert result.returncode == 2
    assert "Citus coordinator" in result.stderr
    assert not (tmp_path / "s.db").exists()
    assert set(asyncio.run(_distribution(url))) == {"sessions", "session_values"}


async def test_tables_in_a_schema(fresh_citus_url: str) -> None:
    """``schema=``: the tables, the version table and the functions in that schema,
    distributed there; a backend on that schema finds Citus and routes its writes and reads
    to one shard, and the batch removals run on the schema's shards."""
    url = fresh_citus_url
    await migrate(url, schema="app", citus=True)
    assert set(await _distribution(url)) == {"app.sessions", "app.session_values"}
    functions = await _query(
        url,
        "SELECT proname FROM pg_proc JOIN pg_namespace n ON n.oid = pronamespace "
        "WHERE nspname = 'app' AND proname LIKE 'sessions_sql_%'",
    )
    assert {name for (name,) in functions} == set(CITUS_FUNCTIONS)
    async with SQLAlchemyBackend.from_url(url, schema="app") as backend:
        await backend.write_value("s1", "k", b"v")
        await backend.update_session("s2", {"a": b"1"}, expires_at=1_000)
        assert backend._executor.dialect.name == "citus"
        assert await backend.read_values("s1") == {"k": b"v"}
        for name in ("write_value", "read_value", "update_session"):
            [plan] = await _explain(url, backend, _scripts(backend)[name])
            assert _routed(plan), (name, plan)
        assert await backend.remove_expired_sessions() == 1
        assert await backend.get_sessions() == ["s1"]
        assert await backend.remove_sessions_created_before(4_000_000_000) == 1
        assert await backend.get_sessions() == []
    # Nothing in the default schema.
    assert await _query(url, "SELECT to_regclass('public.sessions')") == [(None,)]


async def test_batches_in_a_host_transaction_commit_on_their_own(citus_db: str) -> None:
    """Through using(): the collector's batches run on their own connections to the workers
    and commit there, so the host rolling back its transaction does not bring them back
    (as the README says), while the host's own write in it is rolled back."""
    engine = create_async_engine(citus_db)
    try:
        backend = SQLAlchemyBackend(engine)
        await backend.write_value("old", "k", b"v")
        async with engine.connect() as conn:
            bound = backend.using(conn)
            await bound.write_value("new", "k", b"v")
            assert await bound.remove_sessions_created_before(4_000_000_000) >= 1
            await conn.rollback()
        assert await backend.get_sessions() == []
    finally:
        await engine.dispose()
