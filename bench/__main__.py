"""``python -m bench``: sessions_sql against the raw driver, side by side, in one run.

Rounds of raw and sessions_sql alternate (raw first, then sessions_sql first, ...) for each
operation, and the reported numbers are medians over the rounds, so that slow drifts of a
shared machine hit both sides alike.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import hashlib
import importlib.metadata
import itertools
import json
import os
import platform
import shlex
import sqlite3
import subprocess
import sys
import tempfile
import time
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, TypeVar

import aiosqlite
import asyncpg  # type: ignore[import-untyped]
import sqlalchemy

import sessions_sql
from sessions_sql import SQLAlchemyBackend, migrate
from sessions_sql._backend import DEFAULT_BATCH_SIZE

from ._bots import bench_bots, bots_target, format_bots
from ._db import (
    Admin,
    MariaDBAdmin,
    PairAdmin,
    PostgresAdmin,
    SQLiteAdmin,
    asyncpg_dsn,
    ensure_database,
    ensure_mysql_database,
    mysql_url,
    sqlalchemy_url,
)
from ._gc import KINDS, run_gc
from ._raw import RawMariaDB, RawPostgres, RawSQLite, Store
from ._report import OpResult, citus_targets, format_table, format_targets, targets
from ._web import format_web, run_web, web_targets
from ._workload import OPERATIONS, Sample, Workload, run_round

_R = TypeVar("_R")

PG_URL_ENV = "SESSIONS_SQL_BENCH_POSTGRES_URL"
DEFAULT_PG_URL = "postgresql://postgres@127.0.0.1/sessions_sql_bench"
REDIS_URL_ENV = "SESSIONS_SQL_BENCH_REDIS_URL"
DEFAULT_REDIS_URL = "redis://127.0.0.1:6379/0"
MYSQL_URL_ENV = "SESSIONS_SQL_BENCH_MYSQL_URL"
DEFAULT_MYSQL_URL = (
    "mysql+asyncmy://root@localhost/sessions_sql_bench?unix_socket=/run/mysqld/mysqld.sock"
)
DATABASES = ("postgresql", "psycopg", "sqlite", "mariadb", "citus")
#: A Citus coordinator (its workers added): ``--db citus`` runs the operations and the GC there
#: side by side with plain PostgreSQL (--pg-url) instead of the raw driver.
CITUS_URL_ENV = "SESSIONS_SQL_BENCH_CITUS_URL"
DEFAULT_CITUS_URL = "postgresql://postgres@127.0.0.1:5440/postgres"
MODES = ("serial", "concurrent")
PARTS = ("ops", "gc", "listing", "web", "bots")

#: Defaults of the full run, and of ``--quick`` (a CI smoke run well under a minute).
FULL = {
    "sessions": 500,
    "keys": 7,
    "concurrency": 32,
    "pool_size": 16,
    "duration": 1.0,
    "repeats": 3,
    "warmup": 200,
    "gc_sessions": 1_000_000,
    "gc_baseline": 3.0,
    "listing_sessions": 1_000_000,
    "web_requests": 1000,
    "web_repeats": 9,
    "web_sessions": 200,
    "web_warmup": 300,
}
QUICK = {
    "sessions": 50,
    "keys": 7,
    # Fewer tasks and connections: concurrent SQLite writes poll the busy handler, and with
    # 32 tasks on 16 connections they run at a few dozen per second.
    "concurrency": 8,
    "pool_size": 4,
    "duration": 0.05,
    "repeats": 2,
    "warmup": 40,
    "gc_sessions": 5_000,
    "gc_baseline": 0.3,
    "listing_sessions": 20_000,
    "web_requests": 100,
    "web_repeats": 2,
    "web_sessions": 10,
    "web_warmup": 20,
}


def _csv(choices: Sequence[str]) -> Callable[[str], list[str]]:
    def parse(text: str) -> list[str]:
        items = [item.strip() for item in text.split(",") if item.strip()]
        unknown = [item for item in items if item not in choices]
        if unknown or not items:
            raise argparse.ArgumentTypeError(
                f"expected a comma-separated subset of {','.join(choices)}"
            )
        return items

    return parse


def parse_args(argv: list[str]) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog="python -m bench",
        description="Benchmark sessions_sql against the raw driver running the same SQL.",
    )
    p.add_argument(
        "--db",
        type=_csv(DATABASES),
        default=["postgresql", "psycopg", "sqlite", "mariadb"],
        help="databases to run on: postgresql (asyncpg), psycopg (PostgreSQL through psycopg 3), "
        "sqlite, mariadb (asyncmy) (default: these four); citus compares sessions_sql on a "
        "Citus cluster with sessions_sql on plain PostgreSQL",
    )
    p.add_argument(
        "--citus-url",
        default=os.environ.get(CITUS_URL_ENV, DEFAULT_CITUS_URL),
        help=f"Citus coordinator URL (default: ${CITUS_URL_ENV} or {DEFAULT_CITUS_URL}); "
        "migrated with citus=True, its sessions tables are emptied",
    )
    p.add_argument(
        "--mysql-url",
        default=os.environ.get(MYSQL_URL_ENV, DEFAULT_MYSQL_URL),
        help=f"MariaDB/MySQL URL (default: ${MYSQL_URL_ENV} or {DEFAULT_MYSQL_URL}); the "
        "database is created if missing and its sessions tables are emptied",
    )
    p.add_argument(
        "--pg-url",
        default=os.environ.get(PG_URL_ENV, DEFAULT_PG_URL),
        help=f"PostgreSQL URL (default: ${PG_URL_ENV} or {DEFAULT_PG_URL}); the "
        "database is created if missing and its sessions tables are emptied",
    )
    p.add_argument(
        "--quick",
        action="store_true",
        help="small sizes and short rounds: a smoke run of well under a minute",
    )
    p.add_argument(
        "--parts",
        type=_csv(PARTS),
        default=list(PARTS),
        help="ops (operations vs raw), gc (PostgreSQL), listing, web (session middleware "
        "peers; needs Redis), bots (aiogram FSM storage vs RedisStorage and MemoryStorage) "
        "(default: all)",
    )
    p.add_argument(
        "--modes",
        type=_csv(MODES),
        default=list(MODES),
        help="serial (1 task) and/or concurrent (default: both)",
    )
    p.add_argument(
        "--operations",
        type=_csv(OPERATIONS),
        default=list(OPERATIONS),
        help="operations to measure (default: all)",
    )
    p.add_argument("--sessions", type=int, help="sessions in the data set (500; quick 50)")
    p.add_argument("--keys", type=int, help="values per session (7)")
    p.add_argument("--value-size", type=int, default=200, help="bytes per value (200)")
    p.add_argument("--concurrency", type=int, help="tasks in concurrent mode (32; quick 8)")
    p.add_argument(
        "--pool-size",
        type=int,
        help="connections in every pool, raw and sessions_sql (16; quick 4)",
    )
    p.add_argument(
        "--duration",
        type=float,
        help="target seconds per round of the raw driver; the operation count is "
        "calibrated from it (1.0; quick 0.05)",
    )
    p.add_argument(
        "--count", type=int, help="fixed operations per round instead of --duration calibration"
    )
    p.add_argument(
        "--repeats", type=int, help="pairs of rounds (raw, sessions_sql) per operation (3; quick 2)"
    )
    p.add_argument("--warmup", type=int, help="warm-up calls per operation and store (200)")
    p.add_argument(
        "--sqlite-timeout",
        type=float,
        default=30.0,
        help="SQLite busy timeout in seconds, for both stores (30)",
    )
    p.add_argument(
        "--gc-sessions",
        type=int,
        help="expired sessions (among as many live ones) for the GC benchmark; "
        "0 skips it (1000000; quick 5000)",
    )
    p.add_argument(
        "--gc-writers", type=int, default=8, help="tasks writing to live sessions during the GC (8)"
    )
    p.add_argument("--gc-values", type=int, default=5, help="values per GC session (5)")
    p.add_argument(
        "--gc-kinds",
        type=_csv(KINDS),
        default=list(KINDS),
        help="what the GC removes by: created (creation time), expired (expiry) "
        f"(default: {','.join(KINDS)})",
    )
    p.add_argument(
        "--gc-batch-size",
        type=int,
        default=DEFAULT_BATCH_SIZE,
        help=f"batch size of the GC's removals ({DEFAULT_BATCH_SIZE})",
    )
    p.add_argument(
        "--gc-baseline",
        type=float,
        help="seconds of writes measured before the GC starts (3; quick 0.3)",
    )
    p.add_argument(
        "--listing-sessions",
        type=int,
        help="sessions listed by the memory benchmark; 0 skips it (1000000)",
    )
    p.add_argument(
        "--listing-batch-size", type=int, default=1000, help="batch_size of iter_sessions (1000)"
    )
    p.add_argument(
        "--web-requests", type=int, help="requests per round of the web part (1000; quick 100)"
    )
    p.add_argument(
        "--web-repeats",
        type=int,
        help="repeats of the web part: one round of each peer, back to back (9; quick 2)",
    )
    p.add_argument("--web-sessions", type=int, help="logged-in users per web peer (200; quick 10)")
    p.add_argument(
        "--web-warmup", type=int, help="warm-up requests per web peer and kind (300; quick 20)"
    )
    p.add_argument(
        "--redis-url",
        default=os.environ.get(REDIS_URL_ENV, DEFAULT_REDIS_URL),
        help=f"Redis of the bots part's RedisStorage (default: ${REDIS_URL_ENV} or "
        f"{DEFAULT_REDIS_URL}); only the benchmark's own keys are written and removed",
    )
    p.add_argument("--json", type=Path, metavar="FILE", help="also write the results as JSON")
    args = p.parse_args(argv)
    defaults = QUICK if args.quick else FULL
    for name, value in defaults.items():
        if getattr(args, name) is None:
            setattr(args, name, value)
    return args


def source_state() -> dict[str, Any]:
    """Which sessions_sql was measured: its path, a digest of its sources, and git's view.

    Only read-only git commands run here.
    """
    package = Path(sessions_sql.__file__).resolve().parent
    digest = hashlib.sha256()
    for path in sorted(package.rglob("*.py")):
        digest.update(path.relative_to(package).as_posix().encode() + b"\0" + path.read_bytes())
    state: dict[str, Any] = {
        "path": str(package),
        "version": sessions_sql.__version__,
        "sources_sha256": digest.hexdigest(),
    }

    def git(*command: str) -> str | None:
        try:
            completed = subprocess.run(
                ["git", "-C", str(package.parent), *command],
                capture_output=True,
                text=True,
                timeout=10,
                check=True,
            )
        except (OSError, subprocess.SubprocessError):
            return None
        return completed.stdout.strip()

    state["git_commit"] = git("rev-parse", "HEAD")
    changes = git("status", "--porcelain", "--", str(package))
    state["git_uncommitted"] = None if changes is None else changes.splitlines()
    return state


def log(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


#: Interruptions survived (a round redone after the server restarted, say), for the JSON.
INCIDENTS: list[dict[str, str]] = []
#: Attempts of one round, GC or listing before the error is final.
ATTEMPTS = 5
#: After a failure, wait until the server has been up this long (it may be restarting again).
QUIET_SECONDS = 30.0
#: ... but no longer than this in all.
RECOVERY_SECONDS = 900.0


@dataclass
class Target:
    """One database under test: its two stores and its admin connection."""

    db: str
    sa_url: str
    raw: Store
    sql: SQLAlchemyBackend
    admin: Admin
    close_raw: Callable[[], Any]
    pg_url: str | None = None
    #: The raw baseline of serial rounds, if not ``raw`` (PostgreSQL: one dedicated connection).
    raw_serial: Store | None = None

    def raw_for(self, mode: str) -> Store:
        return self.raw_serial if mode == "serial" and self.raw_serial is not None else self.raw

    async def recover(self, phase: str, error: BaseException) -> None:
        """After a failure: wait for the server, reconnect, drop stale pooled connections.

        The machine is shared; another user may restart the PostgreSQL server mid-run.
        """
        INCIDENTS.append({"db": self.db, "phase": phase, "error": repr(error)[:300]})
        log(f"{self.db}: {phase} failed ({error!r}); recovering and retrying")
        if self.pg_url is None:
            await asyncio.sleep(1)
            return
        deadline = time.monotonic() + RECOVERY_SECONDS
        while True:
            try:
                conn = await asyncpg.connect(asyncpg_dsn(self.pg_url))
                try:
                    uptime: float = await conn.fetchval(
                        "SELECT extract(epoch FROM now() - pg_postmaster_start_time())::float8"
                    )
                finally:
                    await conn.close()
                if uptime >= QUIET_SECONDS or time.monotonic() > deadline:
                    break
                await asyncio.sleep(QUIET_SECONDS - uptime + 1)
            except (OSError, asyncpg.PostgresError, asyncpg.InterfaceError):
                if time.monotonic() > deadline:
                    raise
                await asyncio.sleep(1)
        with contextlib.suppress(Exception):  # the old connection is probably gone already
            await self.admin.close()
        if isinstance(self.admin, PairAdmin):  # the Citus comparison: two backends
            self.admin = await PairAdmin.connect(*self.admin.urls)
            assert isinstance(self.raw, SQLAlchemyBackend)
            await self.raw.engine.dispose()
            await self.sql.engine.dispose()
            return
        self.admin = await PostgresAdmin.connect(self.pg_url)
        assert isinstance(self.raw, RawPostgres)
        await self.raw.expire()
        if isinstance(self.raw_serial, RawPostgres):
            await self.raw_serial.expire()
        await self.sql.engine.dispose()


async def open_postgresql(args: argparse.Namespace, db: str) -> Target:
    """PostgreSQL through asyncpg (``db`` "postgresql") or psycopg 3 ("psycopg"), each against
    its own raw driver: a pool of ``pool_size`` connections, and one dedicated connection for
    the serial rounds."""
    if await ensure_database(args.pg_url):
        log(f"created database {args.pg_url}")
    sa_url = sqlalchemy_url(args.pg_url, "asyncpg" if db == "postgresql" else db)
    await migrate(sa_url)
    dsn = asyncpg_dsn(args.pg_url)
    if db == "postgresql":
        raw = await RawPostgres.connect(dsn, args.pool_size)
        dedicated = await RawPostgres.dedicated(dsn)
    else:
        raw = await RawPostgres.psycopg(dsn, args.pool_size)
        dedicated = await RawPostgres.psycopg(dsn, 1)
    sql = SQLAlchemyBackend.from_url(sa_url, pool_size=args.pool_size, max_overflow=0)
    admin = await PostgresAdmin.connect(args.pg_url)

    async def close_raw() -> None:
        await raw.close()
        await dedicated.close()

    return Target(db, sa_url, raw, sql, admin, close_raw, args.pg_url, dedicated)


async def open_sqlite(args: argparse.Namespace, directory: str) -> Target:
    path = os.path.join(directory, "bench.sqlite3")
    sa_url = f"sqlite+aiosqlite:///{path}"
    await migrate(sa_url)
    raw = await RawSQLite.connect(path, args.pool_size, args.sqlite_timeout)
    sql = SQLAlchemyBackend.from_url(
        sa_url,
        pool_size=args.pool_size,
        max_overflow=0,
        connect_args={"timeout": args.sqlite_timeout},
    )
    admin = await SQLiteAdmin.connect(path)
    return Target("sqlite", sa_url, raw, sql, admin, raw.close)


async def open_citus(args: argparse.Namespace) -> Target:
    """sessions_sql on plain PostgreSQL (the peer, in the "raw" place) and on Citus, both with
    the same pool, on the same data."""
    if await ensure_database(args.pg_url):
        log(f"created database {args.pg_url}")
    pg_url, citus_url = sqlalchemy_url(args.pg_url), sqlalchemy_url(args.citus_url)
    await migrate(pg_url)
    await migrate(citus_url, citus=True)
    pool = {"pool_size": args.pool_size, "max_overflow": 0}
    peer = SQLAlchemyBackend.from_url(pg_url, **pool)
    sql = SQLAlchemyBackend.from_url(citus_url, **pool)
    admin = await PairAdmin.connect(args.pg_url, args.citus_url)
    return Target("citus", citus_url, peer, sql, admin, peer.close, args.pg_url)


async def bench_gc_citus(args: argparse.Namespace, w: Workload, kind: str) -> dict[str, Any]:
    """The GC of ``kind`` on plain PostgreSQL, then on Citus, on the same data."""
    runs = {}
    for db, url in (("postgresql", args.pg_url), ("citus", args.citus_url)):
        log(f"{db}: GC by {kind} of {args.gc_sessions:,} sessions among as many live ones")
        conn = await asyncpg.connect(asyncpg_dsn(url))
        try:
            outcome = await run_gc(
                sqlalchemy_url(url),
                conn,
                n=args.gc_sessions,
                keys=args.gc_values,
                value=w.value,
                writers=args.gc_writers,
                baseline_seconds=args.gc_baseline,
                batch_size=args.gc_batch_size,
                kind=kind,
            )
            await conn.execute("TRUNCATE session_values, sessions")
        finally:
            await conn.close()
        runs[db] = outcome.as_dict()
        log(f"{db}: GC by {kind} {runs[db]['sessions_per_s']:,.0f} sessions/s")
    return runs


async def check_same_answers(t: Target, w: Workload) -> None:
    """The two stores of the Citus comparison hold the same data set and answer alike."""
    sid, key = w.sessions[0], w.keys[0]
    for store in (t.raw, t.sql):
        assert await store.read_value(sid, key) == w.value, t.db
        assert await store.read_values(sid) == dict.fromkeys(w.keys, w.value), t.db
        await store.update_session("eq-a", {"k": b"1"}, remove=["x"], expires_at=2_000_000_000)
        snapshot = await store.read_session("eq-a")
        assert snapshot is not None and snapshot.values == {"k": b"1"}, t.db
        assert snapshot.expires_at == 2_000_000_000, t.db
    await t.admin.cleanup("eq")


async def open_mariadb(args: argparse.Namespace) -> Target:
    sa_url = mysql_url(args.mysql_url)
    await ensure_mysql_database(sa_url)
    await migrate(sa_url)
    # The raw baseline keeps its connections in autocommit, as a from_url backend keeps its.
    raw = await RawMariaDB.connect(sa_url, args.pool_size)
    sql = SQLAlchemyBackend.from_url(sa_url, pool_size=args.pool_size, max_overflow=0)
    admin = await MariaDBAdmin.connect(sa_url)
    return Target("mariadb", sa_url, raw, sql, admin, raw.close)


async def check_equivalence(t: Target, w: Workload) -> None:
    """The raw stores must answer exactly as sessions_sql does (same SQL, same data)."""
    raw, sql = t.raw, t.sql
    sid, key, value = w.sessions[0], w.keys[0], w.value
    pairs: list[tuple[object, object, object]] = [
        (await raw.read_value(sid, key), await sql.read_value(sid, key), value),
        (await raw.read_value(sid, "missing"), await sql.read_value(sid, "missing"), None),
        (await raw.read_values(sid), await sql.read_values(sid), dict.fromkeys(w.keys, value)),
        (await raw.get_session_age("eq-none"), await sql.get_session_age("eq-none"), None),
    ]
    age_raw, age_sql = await raw.get_session_age(sid), await sql.get_session_age(sid)
    pairs.append((age_raw, age_sql, age_sql if isinstance(age_sql, int) else -1))
    await raw.write_value("eq-a", "eq-k", b"raw")
    await sql.write_value("eq-b", "eq-k", b"sql")
    # Each store reads what the other wrote.
    cross = (await sql.read_value("eq-a", "eq-k"), await raw.read_value("eq-b", "eq-k"))
    pairs.append((cross, (b"raw", b"sql"), (b"raw", b"sql")))
    await raw.write_values("eq-a", {"eq-1": b"1", "eq-2": b"2"})
    await sql.write_values("eq-b", {"eq-1": b"1", "eq-2": b"2"})
    await raw.remove_values("eq-a", ["eq-k", "eq-1"])
    await sql.remove_values("eq-b", ["eq-k", "eq-1"])
    await raw.remove_value("eq-a", "eq-2")
    await sql.remove_value("eq-b", "eq-2")
    pairs.append((await sql.read_values("eq-a"), await raw.read_values("eq-b"), {}))
    await raw.set_session_expiry("eq-a", 2_000_000_000)
    await sql.set_session_expiry("eq-b", 2_000_000_000)
    await raw.update_session("eq-a", {"eq-3": b"3"}, remove=["eq-k"], expires_at=2_000_000_001)
    await sql.update_session("eq-b", {"eq-3": b"3"}, remove=["eq-k"], expires_at=2_000_000_001)
    raw_a, sql_a = await raw.read_session("eq-a"), await sql.read_session("eq-a")
    raw_b, sql_b = await raw.read_session("eq-b"), await sql.read_session("eq-b")
    assert raw_a is not None and raw_b is not None
    pairs.append((raw_a, sql_a, raw_a))
    pairs.append((raw_b, sql_b, raw_b))
    shape = ((raw_a.expires_at, raw_a.values), (sql_b.expires_at, sql_b.values))  # type: ignore[union-attr]
    pairs.append((shape, shape, ((2_000_000_001, {"eq-3": b"3"}),) * 2))
    await raw.remove_session("eq-a")
    await sql.remove_session("eq-b")
    pairs.append((await sql.get_session_age("eq-a"), await raw.get_session_age("eq-b"), None))
    pairs.append((await raw.read_session("eq-b"), await sql.read_session("eq-a"), None))
    for n, (got_raw, got_sql, expected) in enumerate(pairs):
        if not got_raw == got_sql == expected:
            raise AssertionError(f"{t.db}: raw and sessions_sql differ (check {n})")
    await t.admin.cleanup("eq")


_prefixes = itertools.count()


async def resilient(t: Target, phase: str, step: Callable[[Target], Awaitable[_R]]) -> _R:
    """Run an untimed step, recovering and retrying if the server went away meanwhile."""
    for attempt in range(1, ATTEMPTS + 1):
        try:
            return await step(t)
        except Exception as error:
            if attempt == ATTEMPTS:
                raise
            await t.recover(phase, error)
    raise AssertionError("unreachable")


async def load_base(t: Target, w: Workload) -> None:
    await t.admin.truncate()
    await t.admin.put(w.base_rows())
    await t.admin.maintain()
    if t.db == "citus":  # two databases: each store answers alike on the same data
        await check_same_answers(t, w)
    else:
        await check_equivalence(t, w)


async def timed_round(
    t: Target, w: Workload, op: str, store: Store, n: int, concurrency: int
) -> Sample:
    """Seed (untimed), run and time one round, then clean up (untimed).

    A round that fails (the server restarted, say) is redone after recovery, on connections
    warmed up again.
    """
    for attempt in range(1, ATTEMPTS + 1):
        prefix = f"r{next(_prefixes)}"
        try:
            rows, call = w.prepare(op, store, prefix, n)
            await t.admin.put(rows)
            sample = await run_round(call, n, concurrency)
            await t.admin.cleanup(prefix)
            return sample
        except Exception as error:
            if attempt == ATTEMPTS:
                raise
            await t.recover(f"{op} round", error)
            with contextlib.suppress(Exception):  # a failure here fails the next attempt too
                for warm_store in (t.raw, t.sql):
                    prefix = f"r{next(_prefixes)}"
                    rows, call = w.prepare(op, warm_store, prefix, 2 * concurrency)
                    await t.admin.put(rows)
                    await run_round(call, 2 * concurrency, concurrency)
                    await t.admin.cleanup(prefix)
    raise AssertionError("unreachable")


async def bench_operations(t: Target, args: argparse.Namespace, w: Workload) -> list[OpResult]:
    await resilient(t, "loading the data set", lambda t: load_base(t, w))

    # Warm up every pooled connection of both stores (prepared statements are per connection).
    warm_concurrency = max(args.pool_size, args.concurrency)
    log(f"{t.db}: warming up")
    for op in args.operations:
        for store in (t.raw, t.sql):
            await timed_round(t, w, op, store, max(args.warmup, warm_concurrency), warm_concurrency)
        if t.raw_serial is not None:  # one connection: one call at a time
            await timed_round(t, w, op, t.raw_serial, args.warmup, 1)
    await resilient(t, "maintenance", lambda t: t.admin.maintain())

    results = []
    for mode in args.modes:
        concurrency = 1 if mode == "serial" else args.concurrency
        raw_store = t.raw_for(mode)
        for op in args.operations:
            if args.count:
                n = args.count
            else:  # calibrate on the raw driver: about --duration seconds per raw round
                probe = await timed_round(t, w, op, raw_store, args.warmup, concurrency)
                n = max(20, 2 * concurrency, round(probe.ops_per_s * args.duration))
            result = OpResult(t.db, mode, op, concurrency, n)
            for rep in range(args.repeats):
                stores = ("raw", "sql") if rep % 2 == 0 else ("sql", "raw")
                for name in stores:
                    store = raw_store if name == "raw" else t.sql
                    sample = await timed_round(t, w, op, store, n, concurrency)
                    (result.raw if name == "raw" else result.sql).append(sample)
            await resilient(t, "maintenance", lambda t: t.admin.maintain())
            raw, sql = result.summary(result.raw), result.summary(result.sql)
            log(
                f"{t.db:10} {mode:10} {op:20} n={n:6d} raw {raw['ops_per_s']:9.0f}/s "
                f"sql {sql['ops_per_s']:9.0f}/s ratio {result.ratio:.2f}"
            )
            results.append(result)
    return results


def listing_subprocess(sa_url: str, batch_size: int) -> dict[str, Any]:
    """Run the listing in a fresh interpreter so that its peak RSS is the listing's alone."""
    root = Path(__file__).resolve().parent.parent
    env = dict(os.environ)
    # The caller's PYTHONPATH first, so that the child imports the same sessions_sql.
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [env.get("PYTHONPATH"), str(root)]))
    completed = subprocess.run(
        [sys.executable, "-m", "bench._listing", sa_url, str(batch_size)],
        check=True,
        capture_output=True,
        text=True,
        env=env,
    )
    result: dict[str, Any] = json.loads(completed.stdout)
    return result


async def bench_listing_postgresql(args: argparse.Namespace, sa_url: str) -> dict[str, Any]:
    n = args.listing_sessions
    conn = await asyncpg.connect(asyncpg_dsn(args.pg_url))
    try:
        start = time.perf_counter()
        await conn.execute("TRUNCATE session_values, sessions")
        await conn.execute(
            "INSERT INTO sessions (id) SELECT md5(i::text) FROM generate_series(1, $1::int) i", n
        )
        await conn.execute("VACUUM ANALYZE sessions")
        load = time.perf_counter() - start
    finally:
        await conn.close()
    return {"db": "postgresql", "load_seconds": load, **await _listing(sa_url, args)}


async def bench_listing_sqlite(args: argparse.Namespace, t: Target) -> dict[str, Any]:
    assert isinstance(t.admin, SQLiteAdmin)
    start = time.perf_counter()
    await t.admin.load_sessions(args.listing_sessions)
    load = time.perf_counter() - start
    return {"db": "sqlite", "load_seconds": load, **await _listing(t.sa_url, args)}


async def _listing(sa_url: str, args: argparse.Namespace) -> dict[str, Any]:
    result = await asyncio.to_thread(listing_subprocess, sa_url, args.listing_batch_size)
    if result["sessions"] != args.listing_sessions:
        raise AssertionError(f"listed {result['sessions']} of {args.listing_sessions} sessions")
    return result


async def bench_gc(t: Target, args: argparse.Namespace, w: Workload, kind: str) -> dict[str, Any]:
    """One GC run of ``kind`` (by creation time or by expiry), retried after a failure."""
    what = "old" if kind == "created" else "expired"
    log(f"postgresql: GC of {args.gc_sessions:,} {what} sessions among as many live ones")
    for attempt in range(1, ATTEMPTS + 1):
        assert isinstance(t.admin, PostgresAdmin)
        try:
            outcome = await run_gc(
                t.sa_url,
                t.admin.conn,
                n=args.gc_sessions,
                keys=args.gc_values,
                value=w.value,
                writers=args.gc_writers,
                baseline_seconds=args.gc_baseline,
                batch_size=args.gc_batch_size,
                kind=kind,
            )
            break
        except Exception as error:
            if attempt == ATTEMPTS:
                raise
            await t.recover(f"gc {kind}", error)
    gc = outcome.as_dict()
    log(
        f"postgresql: GC by {kind} {gc['sessions_per_s']:,.0f} sessions/s, write p99 "
        f"{gc['write_p99_ms_during']:.1f} ms during the GC"
    )
    return gc


async def run(args: argparse.Namespace) -> dict[str, Any]:
    w = Workload(args.sessions, args.keys, args.value_size)
    results: list[OpResult] = []
    gcs: dict[str, dict[str, Any]] = {}
    listings: list[dict[str, Any]] = []
    server_version = None
    web: dict[str, Any] | None = None
    citus_results: list[OpResult] = []
    citus_gcs: dict[str, dict[str, Any]] = {}
    database_parts = {"ops", "gc", "listing"} & set(args.parts)
    with tempfile.TemporaryDirectory(prefix="sessions_sql_bench_") as directory:
        if "citus" in args.db and {"ops", "gc"} & set(args.parts):
            t = await open_citus(args)
            try:
                if "ops" in args.parts:
                    citus_results = await bench_operations(t, args, w)
                await t.close_raw()
                await t.sql.close()
                if "gc" in args.parts and args.gc_sessions > 0:
                    for kind in args.gc_kinds:
                        citus_gcs[kind] = await bench_gc_citus(args, w, kind)
                await t.admin.truncate()
            finally:
                await t.admin.close()
        for db in [db for db in args.db if db != "citus"] if database_parts else ():
            if db == "sqlite":
                t = await open_sqlite(args, directory)
            elif db == "mariadb":
                t = await open_mariadb(args)
            else:
                t = await open_postgresql(args, db)
            try:
                if isinstance(t.admin, PostgresAdmin):
                    server_version = await t.admin.server_version()
                if "ops" in args.parts:
                    results += await bench_operations(t, args, w)
                await t.close_raw()
                await t.sql.close()
                if db == "postgresql" and "gc" in args.parts and args.gc_sessions > 0:
                    for kind in args.gc_kinds:
                        gcs[kind] = await bench_gc(t, args, w, kind)
                listed = db in ("postgresql", "sqlite")  # psycopg: the same server as asyncpg
                if "listing" in args.parts and listed and args.listing_sessions > 0:
                    log(f"{db}: listing {args.listing_sessions:,} sessions")
                    for attempt in range(1, ATTEMPTS + 1):
                        try:
                            if db == "postgresql":
                                listing = await bench_listing_postgresql(args, t.sa_url)
                            else:
                                listing = await bench_listing_sqlite(args, t)
                            break
                        except Exception as error:
                            if attempt == ATTEMPTS:
                                raise
                            await t.recover("listing", error)
                    listings.append(listing)
                    log(f"{db}: listing peak RSS {listing['rss_peak_kb'] / 1024:.1f} MB")
                await resilient(t, "cleanup", lambda t: t.admin.truncate())
            finally:
                await t.admin.close()
        if "web" in args.parts:
            web = await run_web(args, directory, log)
        bots: list[dict[str, Any]] = []
        if "bots" in args.parts:
            bots, server_version = await bench_bots(args, directory)
    return {
        "results": results,
        "gc": gcs.get("created"),
        "gc_expired": gcs.get("expired"),
        "listings": listings,
        "web": web,
        "bots": bots,
        "server_version": server_version,
        "citus": citus_results,
        "citus_gc": citus_gcs,
    }


def format_gc(gc: dict[str, Any]) -> str:
    what = "old" if gc["kind"] == "created" else "expired"
    return (
        f"\nGC by {gc['kind']} (postgresql): removed {gc['removed']:,} {what} sessions x "
        f"{gc['values_per_session']} values among {gc['live']:,} live ones in "
        f"{gc['seconds']:.1f} s = {gc['sessions_per_s']:,.0f} sessions/s "
        f"({gc['batches']} batches of {gc['batch_size']}, slowest {gc['max_batch_ms']:.0f} ms)"
        f"\n  write_value from {gc['writers']} tasks: before GC p50 "
        f"{gc['write_p50_ms_before']:.2f} / p99 {gc['write_p99_ms_before']:.2f} ms; during "
        f"GC p50 {gc['write_p50_ms_during']:.2f} / p99 {gc['write_p99_ms_during']:.2f} ms "
        f"/ max {gc['write_max_ms_during']:.1f} ms ({gc['write_ops_during']:,} writes)"
    )


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    args = parse_args(argv)
    started = datetime.now(timezone.utc)
    source = source_state()
    clock = time.perf_counter()
    outcome = asyncio.run(run(args))
    elapsed = time.perf_counter() - clock
    results: list[OpResult] = outcome["results"]
    gc, listings = outcome["gc"], outcome["listings"]
    report = targets(results, gc, listings, outcome["gc_expired"])
    report.update(web_targets(outcome["web"]))
    report["bots"] = bots_target(outcome["bots"])
    citus_results: list[OpResult] = outcome["citus"]
    citus_gc: dict[str, dict[str, Any]] = outcome["citus_gc"]
    if citus_results or citus_gc:
        report.update(
            citus_targets(
                citus_results,
                {kind: runs["citus"] for kind, runs in citus_gc.items()},
                {kind: runs["postgresql"] for kind, runs in citus_gc.items()},
            )
        )

    if results:
        print(format_table(results))
    if citus_results:
        print("\nsessions_sql on Citus (coordinator and two workers) against plain PostgreSQL")
        print(format_table(citus_results, peer="postgresql", subject="citus"))
    for runs in citus_gc.values():
        for db, gc_run in runs.items():
            print(format_gc(gc_run).replace("(postgresql)", f"({db})", 1))
    for gc_run in (gc, outcome["gc_expired"]):
        if gc_run is not None:
            print(format_gc(gc_run))
    for x in listings:
        print(
            f"\nlisting ({x['db']}): {x['sessions']:,} sessions with iter_sessions(batch_size="
            f"{x['batch_size']}) in {x['seconds']:.1f} s ({x['sessions_per_s']:,.0f}/s); "
            f"peak RSS {x['rss_peak_kb'] / 1024:.1f} MB (process before listing "
            f"{x['rss_before_kb'] / 1024:.1f} MB, listing added "
            f"{(x['rss_peak_kb'] - x['rss_before_kb']) / 1024:.1f} MB)"
        )
    if outcome["web"] is not None:
        print(f"\nweb:\n{format_web(outcome['web'])}")
    if outcome["bots"]:
        print("\naiogram FSM storages (bots)")
        print(format_bots(outcome["bots"]))
    print()
    print(format_targets(report))
    print(f"\ntotal {elapsed:.0f} s")

    if args.json is not None:
        document = {
            "command": shlex.join([Path(sys.executable).name, "-m", "bench", *argv]),
            "date": started.isoformat(timespec="seconds"),
            "seconds": round(elapsed, 1),
            "machine": {
                "cpu_count": os.cpu_count(),
                "platform": platform.platform(),
                "python": platform.python_version(),
            },
            "versions": {
                "sqlalchemy": sqlalchemy.__version__,
                "asyncpg": asyncpg.__version__,
                "aiosqlite": aiosqlite.__version__,
                "sqlite": sqlite3.sqlite_version,
                "aiogram": importlib.metadata.version("aiogram"),
                "redis-py": importlib.metadata.version("redis"),
                "postgresql": outcome["server_version"],
            },
            "sessions_sql": source,
            "config": {key: value for key, value in vars(args).items() if key not in ("json",)},
            "incidents": INCIDENTS,
            "results": [r.as_dict() for r in results],
            "gc": gc,
            "gc_expired": outcome["gc_expired"],
            "listings": listings,
            "web": outcome["web"],
            "bots": outcome["bots"],
            "citus": [r.as_dict() for r in citus_results],
            "citus_gc": citus_gc,
            "targets": report,
        }
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(document, indent=2, default=str) + "\n")
        log(f"wrote {args.json}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
