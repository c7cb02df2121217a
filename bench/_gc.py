"""Garbage collection on PostgreSQL on a large table while other tasks keep writing to live
sessions, by creation time (``remove_sessions_created_before``) or by expiry
(``remove_expired_sessions``).

The data is generated inside the server (``INSERT ... SELECT generate_series``): ``2 * n``
sessions with random-looking ids (``md5(i)``), each with ``keys`` values. For the
``created`` kind the even ones were created two days ago (old), the odd ones within the last
hour; for the ``expired`` kind all were created within the last hour, the even ones expired
an hour ago and the odd ones expire tomorrow. The collector removes the ``n`` even sessions
(and, by cascade, their values) with the default batch size, while ``writers`` tasks
overwrite values of live sessions in a loop through the same backend.
"""

from __future__ import annotations

import asyncio
import hashlib
import itertools
import random
import time
from dataclasses import asdict, dataclass
from datetime import datetime, timedelta, timezone
from typing import Any

import asyncpg  # type: ignore[import-untyped]

from sessions_sql import SQLAlchemyBackend
from sessions_sql._backend import DEFAULT_BATCH_SIZE

from ._workload import percentile

__all__ = ["KINDS", "GCResult", "load_gc_data", "run_gc"]

#: What makes a session collectable: its creation time, or its expiry.
KINDS = ("created", "expired")

_SESSIONS = {
    "created": "INSERT INTO sessions (id, created_at) "
    "SELECT md5(i::text), CASE WHEN i % 2 = 0 "
    "  THEN now() - interval '2 days' - i * interval '10 ms' "
    "  ELSE now() - i * interval '1 ms' END "
    "FROM generate_series(0, $1::int - 1) AS i",
    "expired": "INSERT INTO sessions (id, created_at, expires_at) "
    "SELECT md5(i::text), now() - i * interval '1 ms', CASE WHEN i % 2 = 0 "
    "  THEN now() - interval '1 hour' - i * interval '10 ms' "
    "  ELSE now() + interval '1 day' + i * interval '1 ms' END "
    "FROM generate_series(0, $1::int - 1) AS i",
}


async def load_gc_data(
    conn: asyncpg.Connection, n: int, keys: int, value: bytes, kind: str = "created"
) -> float:
    """Replace all data with ``n`` collectable and ``n`` live sessions; return the seconds
    taken."""
    start = time.perf_counter()
    await conn.execute("TRUNCATE session_values, sessions")
    async with conn.transaction():
        # The rows are consistent by construction: skip the per-row foreign-key triggers.
        await conn.execute("SET LOCAL session_replication_role = replica")
        await conn.execute(_SESSIONS[kind], 2 * n)
        await conn.execute(
            "INSERT INTO session_values (session_id, key, value) "
            "SELECT md5(i::text), 'k' || k, $3::bytea "
            "FROM generate_series(0, $1::int - 1) AS i, generate_series(0, $2::int - 1) AS k",
            2 * n,
            keys,
            value,
        )
    await conn.execute("VACUUM ANALYZE sessions, session_values")
    await conn.execute("CHECKPOINT")
    return time.perf_counter() - start


def live_session(n: int, rng: random.Random) -> str:
    """A random live session of the generated data (odd ``i``: ``md5(i)``)."""
    i = 2 * rng.randrange(n) + 1
    return hashlib.md5(str(i).encode()).hexdigest()


@dataclass(frozen=True)
class GCResult:
    kind: str
    expired: int
    live: int
    values_per_session: int
    batch_size: int
    writers: int
    load_seconds: float
    removed: int
    seconds: float
    sessions_per_s: float
    batches: int
    max_batch_ms: float
    write_ops_during: int
    write_p50_ms_during: float
    write_p99_ms_during: float
    write_max_ms_during: float
    write_ops_before: int
    write_p50_ms_before: float
    write_p99_ms_before: float
    live_left: int

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


async def run_gc(
    sa_url: str,
    conn: asyncpg.Connection,
    *,
    n: int,
    keys: int,
    value: bytes,
    writers: int,
    baseline_seconds: float,
    batch_size: int = DEFAULT_BATCH_SIZE,
    kind: str = "created",
) -> GCResult:
    load_seconds = await load_gc_data(conn, n, keys, value, kind)
    backend = SQLAlchemyBackend.from_url(sa_url, pool_size=writers + 2, max_overflow=0)
    try:
        return await _collect(
            backend, conn, kind, n, keys, value, writers, baseline_seconds, batch_size, load_seconds
        )
    finally:
        await backend.close()


async def _collect(
    backend: SQLAlchemyBackend,
    conn: asyncpg.Connection,
    kind: str,
    n: int,
    keys: int,
    value: bytes,
    writers: int,
    baseline_seconds: float,
    batch_size: int,
    load_seconds: float,
) -> GCResult:
    phase = "warmup"
    latencies: dict[str, list[float]] = {"warmup": [], "before": [], "during": []}
    stop = asyncio.Event()

    async def writer(seed: int) -> None:
        rng = random.Random(seed)
        clock = time.perf_counter
        while not stop.is_set():
            sid = live_session(n, rng)
            key = f"k{rng.randrange(keys)}"
            bucket = latencies[phase]
            start = clock()
            await backend.write_value(sid, key, value)
            bucket.append(clock() - start)

    tasks = [asyncio.create_task(writer(seed)) for seed in range(writers)]
    try:
        await asyncio.sleep(min(1.0, baseline_seconds))
        phase = "before"
        await asyncio.sleep(baseline_seconds)
        phase = "during"

        batch_ends: list[float] = []

        def progress(_count: int) -> None:
            batch_ends.append(time.perf_counter())

        start = time.perf_counter()
        if kind == "created":
            cutoff = datetime.now(timezone.utc) - timedelta(days=1)
            removed = await backend.remove_sessions_created_before(
                cutoff, batch_size=batch_size, progress=progress
            )
        else:
            removed = await backend.remove_expired_sessions(
                batch_size=batch_size, progress=progress
            )
        seconds = time.perf_counter() - start
    finally:
        stop.set()
        await asyncio.gather(*tasks)

    edges = [start, *batch_ends]
    max_batch = max((b - a for a, b in itertools.pairwise(edges)), default=0.0)
    before = sorted(latencies["before"])
    during = sorted(latencies["during"])
    live_left: int = await conn.fetchval("SELECT count(*) FROM sessions")
    return GCResult(
        kind=kind,
        expired=n,
        live=n,
        values_per_session=keys,
        batch_size=batch_size,
        writers=writers,
        load_seconds=load_seconds,
        removed=removed,
        seconds=seconds,
        sessions_per_s=removed / seconds if seconds > 0 else 0.0,
        batches=len(batch_ends),
        max_batch_ms=max_batch * 1000,
        write_ops_during=len(during),
        write_p50_ms_during=percentile(during, 0.5) * 1000,
        write_p99_ms_during=percentile(during, 0.99) * 1000,
        write_max_ms_during=(during[-1] if during else 0.0) * 1000,
        write_ops_before=len(before),
        write_p50_ms_before=percentile(before, 0.5) * 1000,
        write_p99_ms_before=percentile(before, 0.99) * 1000,
        live_left=live_left,
    )
