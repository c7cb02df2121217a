"""The ``bots`` part: aiogram FSM operations per update, ``SQLStorage`` on PostgreSQL and
SQLite side by side with aiogram's ``RedisStorage`` (this machine's Redis) and
``MemoryStorage``.

An *update* is what aiogram's FSM middleware and a typical handler do for one message:
``get_state`` + ``get_data`` + ``update_data``. Users have a state and five data keys
(seeded, untimed); serial rounds run one task, concurrent rounds ``--concurrency`` tasks
spread over the users. Rounds of the four storages alternate in a rotating order, and the
ratios are medians of per-repeat ratios to ``RedisStorage``.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
from typing import Any

from aiogram.fsm.storage.base import BaseStorage, DefaultKeyBuilder, StorageKey
from aiogram.fsm.storage.memory import MemoryStorage
from aiogram.fsm.storage.redis import RedisStorage
from redis.asyncio import BlockingConnectionPool, Redis

from sessions_sql import migrate
from sessions_sql.aiogram import SQLStorage

from ._db import PostgresAdmin, ensure_database, sqlalchemy_url
from ._workload import run_round

__all__ = ["BOTS_TARGET", "bench_bots", "bots_target", "format_bots"]

#: Required throughput of SQLStorage on PostgreSQL relative to RedisStorage, per update.
BOTS_TARGET = 0.8
STORAGES = ("sql-postgresql", "sql-postgresql-async", "sql-sqlite", "redis", "memory")
PREFIX = "sessions-sql-bench-fsm"  # Redis keys of this benchmark, removed afterwards


def _key(user: int) -> StorageKey:
    return StorageKey(bot_id=1, chat_id=user, user_id=user)


async def _open(args: argparse.Namespace, directory: str) -> tuple[dict[str, BaseStorage], str]:
    if await ensure_database(args.pg_url):
        print(f"created database {args.pg_url}", file=sys.stderr)
    pg = sqlalchemy_url(args.pg_url)
    await migrate(pg)
    admin = await PostgresAdmin.connect(args.pg_url)
    try:
        await admin.truncate()
        version = await admin.server_version()
    finally:
        await admin.close()
    sqlite = f"sqlite+aiosqlite:///{os.path.join(directory, 'bots.sqlite3')}"
    await migrate(sqlite)
    pool = {"pool_size": args.pool_size, "max_overflow": 0}
    keys = DefaultKeyBuilder(prefix=PREFIX, with_bot_id=True, with_destiny=True)
    redis = Redis(
        connection_pool=BlockingConnectionPool.from_url(
            args.redis_url, max_connections=args.pool_size
        )
    )
    storages: dict[str, BaseStorage] = {
        "sql-postgresql": SQLStorage.from_url(pg, connection_kwargs=pool),
        # The same with asynchronous commit (the durability of Redis's snapshots, not of
        # fsync): a commit returns before its WAL reaches the disk.
        "sql-postgresql-async": SQLStorage.from_url(
            pg,
            connection_kwargs={
                **pool,
                "connect_args": {"server_settings": {"synchronous_commit": "off"}},
            },
        ),
        "sql-sqlite": SQLStorage.from_url(
            sqlite, connection_kwargs={**pool, "connect_args": {"timeout": args.sqlite_timeout}}
        ),
        "redis": RedisStorage(redis, key_builder=keys),
        "memory": MemoryStorage(),
    }
    return storages, version


async def _seed(storage: BaseStorage, users: int) -> None:
    for user in range(users):  # (both PostgreSQL storages seed the same rows)
        await storage.set_state(_key(user), "Form:step")
        await storage.set_data(
            _key(user), {f"field{i}": f"value {i} of user {user}" for i in range(5)}
        )


def _update(storage: BaseStorage, users: int) -> Any:
    async def update(i: int) -> None:
        key = _key(i % users)
        await storage.get_state(key)
        await storage.get_data(key)
        await storage.update_data(key, {"last": i})

    return update


async def bench_bots(args: argparse.Namespace, directory: str) -> tuple[list[dict[str, Any]], str]:
    """Measure every storage in both modes: one result row per (mode, storage), and the
    PostgreSQL server's version."""
    storages, version = await _open(args, directory)
    users = args.sessions
    results = []
    try:
        for storage in storages.values():
            await _seed(storage, users)
            await run_round(_update(storage, users), args.warmup, args.concurrency)
        for mode in args.modes:
            concurrency = 1 if mode == "serial" else args.concurrency
            probe = await run_round(_update(storages["redis"], users), args.warmup, concurrency)
            n = max(20, 2 * concurrency, round(probe.ops_per_s * args.duration))
            samples: dict[str, list[Any]] = {name: [] for name in storages}
            for rep in range(args.repeats):
                order = STORAGES[rep % len(STORAGES) :] + STORAGES[: rep % len(STORAGES)]
                for name in order:
                    sample = await run_round(_update(storages[name], users), n, concurrency)
                    samples[name].append(sample)
            for name in STORAGES:
                ratios = [
                    s.ops_per_s / r.ops_per_s
                    for s, r in zip(samples[name], samples["redis"], strict=True)
                ]
                results.append(
                    {
                        "mode": mode,
                        "storage": name,
                        "concurrency": concurrency,
                        "updates_per_round": n,
                        "updates_per_s": statistics.median(s.ops_per_s for s in samples[name]),
                        "p50_ms": statistics.median(s.p50_ms for s in samples[name]),
                        "p99_ms": statistics.median(s.p99_ms for s in samples[name]),
                        "ratio_to_redis": statistics.median(ratios),
                        "rounds": [round(s.ops_per_s, 1) for s in samples[name]],
                    }
                )
                row = results[-1]
                print(
                    f"bots {mode:10} {name:15} n={n:6d} {row['updates_per_s']:9.0f} updates/s "
                    f"{row['ratio_to_redis']:.2f}x redis",
                    file=sys.stderr,
                    flush=True,
                )
    finally:
        redis_storage = storages["redis"]
        assert isinstance(redis_storage, RedisStorage)
        async for key in redis_storage.redis.scan_iter(match=f"{PREFIX}:*"):
            await redis_storage.redis.delete(key)
        for storage in storages.values():
            await storage.close()
    return results, version


def bots_target(results: list[dict[str, Any]]) -> dict[str, Any]:
    rows = [r for r in results if r["storage"] == "sql-postgresql"]
    return {
        "description": f"SQLStorage on PostgreSQL >= {BOTS_TARGET}x RedisStorage per update",
        "measured": bool(rows),
        "met": bool(rows) and all(r["ratio_to_redis"] >= BOTS_TARGET for r in rows),
        "misses": [
            {
                "db": "postgresql",
                "mode": r["mode"],
                "op": "fsm update",
                "ratio": r["ratio_to_redis"],
            }
            for r in rows
            if r["ratio_to_redis"] < BOTS_TARGET
        ],
    }


def format_bots(results: list[dict[str, Any]]) -> str:
    header = ("mode", "storage", "updates/s", "x redis", "p50 ms", "p99 ms")
    lines = [header]
    for r in results:
        lines.append(
            (
                r["mode"],
                r["storage"],
                f"{r['updates_per_s']:,.0f}",
                f"{r['ratio_to_redis']:.2f}",
                f"{r['p50_ms']:.3f}",
                f"{r['p99_ms']:.3f}",
            )
        )
    widths = [max(len(line[i]) for line in lines) for i in range(len(header))]
    out = []
    for n, line in enumerate(lines):
        cells = [c.ljust(widths[i]) if i < 2 else c.rjust(widths[i]) for i, c in enumerate(line)]
        out.append("  ".join(cells).rstrip())
        if n == 0:
            out.append("  ".join("-" * w for w in widths))
    out.append("an update = get_state + get_data + update_data; latencies per update")
    return "\n".join(out)
