"""End-to-end tests of the ``sessions-sql`` command, run as a subprocess on SQLite and PostgreSQL.

Each command runs as ``python -m sessions_sql`` in a temporary directory; the tests prepare
and check the database directly through SQLAlchemy.
"""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys
import time
from dataclasses import dataclass
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import inspect, text
from sqlalchemy.ext.asyncio import create_async_engine

from sessions_sql import SQLAlchemyBackend
from sessions_sql.cli import NOT_MIGRATED, main, parse_age

URL_ENV = "SESSIONS_SQL_URL"
ERROR = "sessions-sql: error: "
SECRET_ID = "s3cr3t-session-id-0123456789"


@dataclass
class Result:
    code: int
    out: bytes
    err: str

    @property
    def lines(self) -> list[str]:
        return self.out.decode().splitlines()


@pytest.fixture
def cli(tmp_path: Path) -> Any:
    """Run ``python -m sessions_sql ARGS`` in a temporary directory."""
    workdir = tmp_path / "cwd"
    workdir.mkdir()

    def run(*args: str, url: str | None = None, stdin: bytes = b"") -> Result:
        env = {name: value for name, value in os.environ.items() if name != URL_ENV}
        if url is not None:
            env[URL_ENV] = url
        done = subprocess.run(
            [sys.executable, "-m", "sessions_sql", *args],
            input=stdin,
            capture_output=True,
            cwd=workdir,
            env=env,
            check=False,
        )
        return Result(done.returncode, done.stdout, done.stderr.decode())

    run.workdir = workdir  # type: ignore[attr-defined]
    return run


def assert_error(result: Result, status: int, message: str | None = None) -> str:
    """The command failed with ``status`` and exactly one error line (no traceback)."""
    assert result.code == status, result
    assert result.out == b""
    assert "Traceback" not in result.err
    lines = result.err.splitlines()
    assert len(lines) == 1, result.err
    assert lines[0].startswith(ERROR), lines[0]
    if message is not None:
        assert lines[0] == ERROR + message
    return lines[0]


# Databases.


@pytest.fixture(params=["sqlite", "postgresql", "mariadb"])
def empty_url(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    """URL of a fresh, empty (unmigrated) database, on each database."""
    if request.param == "sqlite":
        return f"sqlite+aiosqlite:///{tmp_path / 'sessions.db'}"
    server = request.getfixturevalue(f"{request.param.replace('postgresql', 'postgres')}_server")
    url: str = server.new_database()
    return url


def sql(url: str, statement: str, params: dict[str, Any] | None = None) -> list[Any]:
    """Run one statement on a direct connection; return its rows (if any)."""

    async def go() -> list[Any]:
        engine = create_async_engine(url)
        try:
            async with engine.begin() as conn:
                result = await conn.execute(text(statement), params or {})
                return list(result) if result.returns_rows else []
        finally:
            await engine.dispose()

    return asyncio.run(go())


def tables(url: str, schema: str | None = None) -> set[str]:
    async def go() -> set[str]:
        engine = create_async_engine(url)
        try:
            async with engine.connect() as conn:
                names = await conn.run_sync(lambda c: inspect(c).get_table_names(schema=schema))
                return set(names)
        finally:
            await engine.dispose()

    return asyncio.run(go())


def write(url: str, sessions: dict[str, dict[str, bytes]]) -> None:
    async def go() -> None:
        async with SQLAlchemyBackend.from_url(url) as backend:
            for session_id, values in sessions.items():
                await backend.write_values(session_id, values)

    asyncio.run(go())


def set_expiry(url: str, expiries: dict[str, int | None]) -> None:
    async def go() -> None:
        async with SQLAlchemyBackend.from_url(url) as backend:
            for session_id, expires_at in expiries.items():
                await backend.set_session_expiry(session_id, expires_at)

    asyncio.run(go())


def set_created(url: str, session_id: str, when: datetime) -> None:
    """Backdate a session (UPDATE through a direct connection)."""
    value: Any = when
    if url.startswith("sqlite"):  # stored as UTC text, as CURRENT_TIMESTAMP writes it
        value = when.astimezone(timezone.utc).strftime("%Y-%m-%d %H:%M:%S")
    elif url.startswith("mysql"):  # DATETIME(6) in UTC
        value = when.astimezone(timezone.utc).replace(tzinfo=None)
    sql(url, "UPDATE sessions SET created_at = :t WHERE id = :id", {"t": value, "id": session_id})


def set_created_db_relative(url: str, session_id: str, seconds_ago: int) -> None:
    """Backdate a session relative to the database's own clock."""
    if url.startswith("sqlite"):
        statement = "UPDATE sessions SET created_at = datetime('now', :delta) WHERE id = :id"
        params: dict[str, Any] = {"delta": f"-{seconds_ago} seconds", "id": session_id}
    elif url.startswith("mysql"):
        statement = (
            "UPDATE sessions SET created_at = UTC_TIMESTAMP(6) - INTERVAL :s SECOND WHERE id = :id"
        )
        params = {"s": seconds_ago, "id": session_id}
    else:
        statement = (
            "UPDATE sessions SET created_at = now() - make_interval(secs => :s) WHERE id = :id"
        )
        params = {"s": seconds_ago, "id": session_id}
    sql(url, statement, params)


def session_ids(url: str) -> set[str]:
    return {row[0] for row in sql(url, "SELECT id FROM sessions")}


def value_owners(url: str) -> set[str]:
    return {row[0] for row in sql(url, "SELECT session_id FROM session_values")}


def iso(seconds: int) -> str:
    return datetime.fromtimestamp(seconds, timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")


def unix(when: datetime) -> int:
    return int(when.timestamp())


# migrate.


def test_migrate_upgrade_current_history_downgrade(cli: Any, empty_url: str) -> None:
    result = cli("migrate", "current", url=empty_url)
    assert (result.code, result.out) == (0, b"")

    result = cli("migrate", url=empty_url)  # default: upgrade head
    assert result.code == 0, result.err
    assert "Running upgrade" in result.err
    assert {"sessions", "session_values", "sessions_sql_alembic_version"} <= tables(empty_url)

    result = cli("--url", empty_url, "migrate", "current")
    assert result.code == 0
    assert result.lines == ["0002 (head)"]

    result = cli("migrate", "history", url=empty_url)
    assert result.code == 0
    assert result.lines[0].startswith("0001 -> 0002 (sessions_sql) (head)")
    assert result.lines[-1].startswith("<base> -> 0001")

    result = cli("migrate", "downgrade", "base", "--url", empty_url)
    assert result.code == 0, result.err
    assert not {"sessions", "session_values"} & tables(empty_url)

    # Tables gone from an existing database: detected before any query.
    assert_error(cli("list", url=empty_url), 1, NOT_MIGRATED)


def test_migrate_sql_prints_offline_sql_without_touching_the_database(
    cli: Any, empty_url: str
) -> None:
    result = cli("migrate", "upgrade", "head", "--sql", url=empty_url)
    assert result.code == 0, result.err
    out = result.out.decode()
    assert "CREATE TABLE sessions (" in out
    assert "CREATE TABLE session_values (" in out
    assert "Context impl" not in out  # log lines go to stderr, stdout is pure SQL
    assert "Context impl" in result.err
    assert "ALTER TABLE sessions ADD COLUMN expires_at" in out
    if empty_url.startswith("sqlite"):
        assert not Path(empty_url.split("///", 1)[1]).exists()
        assert "CREATE INDEX ix_sessions_expires_at ON sessions (expires_at) WHERE" in out
    elif empty_url.startswith("mysql"):
        assert tables(empty_url) == set()
        assert "value LONGBLOB NOT NULL" in out
        assert "created_at DATETIME(6) NOT NULL DEFAULT (UTC_TIMESTAMP(6))" in out
        assert "CREATE INDEX ix_sessions_expires_at ON sessions (expires_at);" in out
    else:
        assert tables(empty_url) == set()
        # Built without blocking writes, outside the migration's transaction.
        commit, build = (
            out.index("COMMIT;"),
            out.index(
                "CREATE INDEX CONCURRENTLY ix_sessions_expires_at ON sessions (expires_at) WHERE"
            ),
        )
        assert commit < build

    result = cli("migrate", "downgrade", "base", "--sql", url=empty_url)
    assert result.code == 0, result.err
    out = result.out.decode()
    assert "DROP TABLE sessions;" in out
    assert "ALTER TABLE sessions DROP COLUMN expires_at" in out


def test_migrate_schema_on_postgresql(cli: Any, postgres_server: Any) -> None:
    url = postgres_server.new_database()
    assert cli("--schema", "app", "migrate", url=url).code == 0
    assert {"sessions", "session_values", "sessions_sql_alembic_version"} <= tables(url, "app")
    assert tables(url) == set()  # nothing in public

    assert cli("migrate", "current", "--schema", "app", url=url).lines == ["0002 (head)"]
    assert cli("set", "sid", "k", "--schema", "app", url=url, stdin=b"in app").code == 0
    assert cli("--schema", "app", "get", "sid", "k", url=url).out == b"in app"
    assert sql(url, "SELECT key FROM app.session_values") == [("k",)]
    # Without the schema the tables are not on the search path.
    assert_error(cli("list", url=url), 1, NOT_MIGRATED)

    result = cli("migrate", "--sql", "--schema", "app", url=url)
    assert result.code == 0
    assert "CREATE TABLE app.sessions (" in result.out.decode()


# Values: set, get, show, rm.


def test_set_get_show_rm(cli: Any, db_url: str) -> None:
    blob = bytes(range(256)) + b"\xff\xfe\x80 not UTF-8 \r\n"
    assert cli("set", SECRET_ID, "blob", url=db_url, stdin=blob) == Result(0, b"", "")
    assert cli("set", SECRET_ID, "empty", url=db_url).code == 0

    assert cli("get", SECRET_ID, "blob", url=db_url) == Result(0, blob, "")
    assert cli("get", SECRET_ID, "empty", url=db_url) == Result(0, b"", "")

    (created,) = sql(db_url, "SELECT created_at FROM sessions")[0]
    if isinstance(created, str):  # SQLite text
        created = datetime.fromisoformat(created)
    if created.tzinfo is None:  # SQLite and MariaDB store UTC without a zone
        created = created.replace(tzinfo=timezone.utc)
    seconds = unix(created)
    result = cli("show", SECRET_ID, url=db_url)
    assert result.code == 0
    assert result.lines == [
        f"created_at\t{iso(seconds)}\t{seconds}",
        "expires_at\t-",
        f"blob\t{len(blob)}",
        "empty\t0",
    ]
    result = cli("show", SECRET_ID, "--json", url=db_url)
    assert json.loads(result.out) == {
        "id": SECRET_ID,
        "created_at": iso(seconds),
        "expires_at": None,
        "value_sizes": {"blob": len(blob), "empty": 0},
    }
    set_expiry(db_url, {SECRET_ID: 2_000_000_000})
    result = cli("show", SECRET_ID, url=db_url)
    assert result.lines[1] == f"expires_at\t{iso(2_000_000_000)}\t2000000000"
    result = cli("show", SECRET_ID, "--json", url=db_url)
    assert json.loads(result.out)["expires_at"] == iso(2_000_000_000) == "2033-05-18T03:33:20Z"

    error = assert_error(cli("get", SECRET_ID, "nope", url=db_url), 1)
    assert SECRET_ID not in error

    assert cli("rm", SECRET_ID, "blob", url=db_url) == Result(0, b"", "")
    assert sql(db_url, "SELECT session_values.key FROM session_values") == [("empty",)]
    assert session_ids(db_url) == {SECRET_ID}

    assert cli("rm", SECRET_ID, url=db_url) == Result(0, b"", "")
    assert session_ids(db_url) == set()
    assert value_owners(db_url) == set()

    error = assert_error(cli("show", SECRET_ID, url=db_url), 1)
    assert SECRET_ID not in error


# list.


def test_list(cli: Any, db_url: str) -> None:
    now = int(time.time())
    odd_id = "tab\tnew\nline\\back"
    write(db_url, {sid: {"k": b"v"} for sid in ("old-a", "old-b", "new", odd_id)})
    created = {"old-a": now - 10 * 86400, odd_id: now - 5 * 86400, "old-b": now - 2 * 86400}
    for sid, seconds in created.items():
        set_created(db_url, sid, datetime.fromtimestamp(seconds, timezone.utc))
    set_expiry(db_url, {"old-b": 2_000_000_000})

    result = cli("list", url=db_url)
    assert result.code == 0
    rows = [line.split("\t") for line in result.lines]
    assert [row[0] for row in rows] == ["old-a", "tab\\tnew\\nline\\\\back", "old-b", "new"]
    for row in rows:
        assert len(row) == 3
        assert row[1] == iso(int(row[2]))
    assert [int(row[2]) for row in rows[:3]] == list(created.values())
    assert now - 60 <= int(rows[3][2]) <= int(time.time()) + 60

    result = cli("--url", db_url, "list", "--json")
    assert result.code == 0
    items = json.loads(result.out)
    assert [set(item) for item in items] == [{"id", "created_at", "expires_at"}] * 4
    assert [item["expires_at"] for item in items] == [None, None, iso(2_000_000_000), None]
    assert [item["id"] for item in items] == ["old-a", odd_id, "old-b", "new"]
    assert items[0]["created_at"] == iso(created["old-a"])

    result = cli("list", "--url", db_url, "--older-than", "1d")  # --url after the command
    assert [line.split("\t")[0] for line in result.lines] == [
        "old-a",
        "tab\\tnew\\nline\\\\back",
        "old-b",
    ]

    result = cli("list", "--older-than", "168h", "--limit", "5", "--json", url=db_url)
    assert json.loads(result.out) == [
        {"id": "old-a", "created_at": iso(created["old-a"]), "expires_at": None}
    ]

    result = cli("list", "--limit", "2", url=db_url)
    assert [line.split("\t")[0] for line in result.lines] == ["old-a", "tab\\tnew\\nline\\\\back"]


# gc.


def test_gc_dry_run_then_real(cli: Any, db_url: str) -> None:
    ten_days_ago = datetime.now(timezone.utc) - timedelta(days=10)
    old = [f"old-{i}" for i in range(5)]
    write(db_url, {sid: {"a": b"1", "b": b"2"} for sid in [*old, "edge", "young", "fresh"]})
    for sid in old:
        set_created(db_url, sid, ten_days_ago)
    set_created_db_relative(db_url, "edge", 7 * 86400)  # exactly 7 days old: "at least" 7d
    set_created_db_relative(db_url, "young", 7 * 86400 - 3600)
    everything = {*old, "edge", "young", "fresh"}

    result = cli("gc", "--older-than", "7d", "--dry-run", url=db_url)
    assert result == Result(0, b"would remove 6 sessions\n", "")
    assert session_ids(db_url) == everything
    assert value_owners(db_url) == everything

    result = cli("gc", "--older-than", "7d", "--batch-size", "4", url=db_url)
    assert result.code == 0
    assert result.out == b"removed 6 sessions\n"
    assert result.err.splitlines() == ["removed 4 sessions...", "removed 6 sessions..."]
    assert session_ids(db_url) == {"young", "fresh"}
    assert value_owners(db_url) == {"young", "fresh"}


def test_gc_older_than_zero_removes_every_session(cli: Any, db_url: str) -> None:
    """``--older-than 0s`` agrees with ``SessionCollector(lifetime=0)``: every session goes,
    the one created this second and one stamped in the future (a clock step) included."""
    write(db_url, {sid: {"a": b"1"} for sid in ("old", "now", "future")})
    set_created(db_url, "old", datetime.now(timezone.utc) - timedelta(days=3))
    set_created(db_url, "future", datetime.now(timezone.utc) + timedelta(hours=1))

    result = cli("gc", "--older-than", "0s", "--dry-run", url=db_url)
    assert result == Result(0, b"would remove 3 sessions\n", "")
    assert session_ids(db_url) == {"old", "now", "future"}
    result = cli("list", "--older-than", "0s", url=db_url)
    assert {line.split("\t")[0] for line in result.lines} == {"old", "now", "future"}

    result = cli("gc", "--older-than", "0s", url=db_url)
    assert result.code == 0
    assert result.out == b"removed 3 sessions\n"
    assert session_ids(db_url) == set()
    assert value_owners(db_url) == set()


def test_gc_expired(cli: Any, db_url: str) -> None:
    """``--expired`` removes the sessions whose expiry is before the database clock's now;
    with ``--older-than`` too, both kinds go in one run."""
    write(db_url, {sid: {"a": b"1"} for sid in ("expired", "live", "never", "old")})
    set_expiry(db_url, {"expired": int(time.time()) - 3600, "live": int(time.time()) + 3600})
    set_created(db_url, "old", datetime.now(timezone.utc) - timedelta(days=10))

    result = cli("gc", "--expired", "--dry-run", url=db_url)
    assert result == Result(0, b"would remove 1 sessions\n", "")
    result = cli("gc", "--expired", "--older-than", "7d", "--dry-run", url=db_url)
    assert result == Result(0, b"would remove 2 sessions\n", "")
    assert session_ids(db_url) == {"expired", "live", "never", "old"}

    result = cli("gc", "--expired", url=db_url)
    assert result.code == 0
    assert result.out == b"removed 1 sessions\n"
    assert session_ids(db_url) == {"live", "never", "old"}
    assert value_owners(db_url) == {"live", "never", "old"}
    set_expiry(db_url, {"live": int(time.time()) - 1})
    result = cli("gc", "--expired", "--older-than", "7d", url=db_url)
    assert result.out == b"removed 2 sessions\n"
    assert session_ids(db_url) == {"never"}


# stats.


def test_stats(cli: Any, db_url: str) -> None:
    result = cli("stats", "--json", url=db_url)
    assert result.code == 0
    assert json.loads(result.out) == {
        "sessions": 0,
        "values": 0,
        "value_bytes": 0,
        "oldest_created_at": None,
        "newest_created_at": None,
    }
    assert cli("list", "--json", url=db_url).out.decode().strip() == "[]"

    write(db_url, {"s1": {"a": b"abc", "b": b"\x00" * 10}, "s2": {"c": b""}, "s3": {"d": b"x"}})
    sql(db_url, "DELETE FROM session_values WHERE session_id = 's3'")  # a session without values
    oldest = datetime(2020, 1, 2, 3, 4, 5, tzinfo=timezone.utc)
    newest = datetime(2022, 6, 7, 8, 9, 10, tzinfo=timezone.utc)
    set_created(db_url, "s1", newest)
    set_created(db_url, "s2", oldest)
    set_created(db_url, "s3", datetime(2021, 1, 1, tzinfo=timezone.utc))

    result = cli("stats", url=db_url)
    assert result.code == 0
    assert result.lines == [
        "sessions\t3",
        "values\t3",
        "value_bytes\t13",
        "oldest_created_at\t2020-01-02T03:04:05Z",
        "newest_created_at\t2022-06-07T08:09:10Z",
    ]
    assert json.loads(cli("stats", "--json", url=db_url).out) == {
        "sessions": 3,
        "values": 3,
        "value_bytes": 13,
        "oldest_created_at": "2020-01-02T03:04:05Z",
        "newest_created_at": "2022-06-07T08:09:10Z",
    }


# Errors.


def test_unmigrated_database(cli: Any, empty_url: str) -> None:
    assert_error(cli("list", url=empty_url), 1, NOT_MIGRATED)
    assert_error(cli("get", SECRET_ID, "k", url=empty_url), 1, NOT_MIGRATED)
    if empty_url.startswith("sqlite"):  # checking did not create the file
        assert not Path(empty_url.split("///", 1)[1]).exists()


def test_unmigrated_sqlite_file(cli: Any, tmp_path: Path) -> None:
    path = tmp_path / "empty.db"
    path.touch()  # an empty file is an empty SQLite database
    assert_error(
        cli("gc", "--older-than", "1d", url=f"sqlite+aiosqlite:///{path}"), 1, NOT_MIGRATED
    )


def test_default_url_is_sessions_db_in_the_working_directory(cli: Any) -> None:
    assert cli("migrate").code == 0
    assert (cli.workdir / "sessions.db").exists()
    assert cli("set", "sid", "k", stdin=b"v").code == 0
    assert cli("get", "sid", "k").out == b"v"


def test_unreachable_database(cli: Any) -> None:
    url = "postgresql+asyncpg://postgres:hunter2@127.0.0.1:1/x"
    error = assert_error(cli("list", url=url), 1)
    assert "cannot connect" in error
    assert "hunter2" not in error
    # A URL without a driver gets asyncpg.
    error = assert_error(cli("--url", "postgresql://postgres@127.0.0.1:1/x", "migrate"), 1)
    assert "ConnectionRefusedError" in error
    # SQLite files that cannot be opened (aiosqlite would add a thread traceback).
    assert_error(cli("migrate", url="sqlite+aiosqlite:////nonexistent-dir/sessions.db"), 1)
    assert_error(cli("list", url=f"sqlite+aiosqlite:///{cli.workdir}"), 1)


@pytest.mark.parametrize(
    "url",
    [
        "not a url",
        "postgresql+asyncpg://postgres:hunter2@127.0.0.1:notaport/x",
        "sqlite+pysqlite:///sessions.db",
    ],
)
def test_bad_url(cli: Any, url: str) -> None:
    error = assert_error(cli("list", url=url), 2)
    assert "hunter2" not in error


@pytest.mark.parametrize(
    ("argv", "expected"),
    [
        (["gc", "--older-than", "7x"], "invalid age '7x'"),
        (["list", "--older-than", "1.5h"], "invalid age '1.5h'"),
        (["gc"], "--older-than AGE, --expired, or both"),
        (["list", "--limit", "0"], "--limit"),
        (["migrate", "downgrade"], "revision"),
        ([], "COMMAND"),
        (["get", "x" * 256, "k"], "at most 255"),
        (["--schema", "app", "list"], "PostgreSQL only"),
    ],
)
def test_usage_errors(cli: Any, argv: list[str], expected: str) -> None:
    error = assert_error(cli(*argv), 2)
    assert expected in error
    assert "x" * 256 not in error
    assert not (cli.workdir / "sessions.db").exists()


# In-process checks of the argument parsing.


@pytest.mark.parametrize(
    "command", ["migrate", "list", "show", "get", "set", "rm", "gc", "stats", None]
)
def test_help(command: str | None, capsys: pytest.CaptureFixture[str]) -> None:
    argv = ["--help"] if command is None else [command, "--help"]
    assert main(argv) == 0
    out = capsys.readouterr().out
    assert out.startswith(f"usage: sessions-sql {command or ''}".rstrip())
    assert "--url" in out


@pytest.mark.parametrize(
    ("text_", "seconds"),
    [("30s", 30), ("15m", 900), ("12h", 43200), ("7d", 604800), ("0s", 0), ("0d", 0)],
)
def test_parse_age(text_: str, seconds: int) -> None:
    assert parse_age(text_) == seconds


@pytest.mark.parametrize(
    "text_", ["7x", "7", "d", "-0s", "-1d", "1.5h", " 7d", "7D", "", "\u0667d"]
)
def test_parse_age_rejects(text_: str) -> None:
    with pytest.raises(Exception, match="invalid age"):
        parse_age(text_)
