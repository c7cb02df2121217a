"""Races: many tasks, and two processes, using one database at once (SQLite and PostgreSQL).

Every test runs real concurrency against a real database and then checks the tables with SQL.
Events are ordered with ``time.monotonic_ns()``: CLOCK_MONOTONIC is one clock for every
process of the machine, so readings taken in two processes compare. Readings only order
events (a call's start is read before it is made, its end after it returned); no test
asserts on elapsed time. Loops run for a short time budget; ``HANG_GUARD`` only turns a hang
into a failure.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import random
import sqlite3
import subprocess
import sys
import time
from collections import defaultdict
from collections.abc import Awaitable, Callable
from dataclasses import asdict, dataclass
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import Any, ClassVar

import pytest
from sqlalchemy import bindparam, text
from sqlalchemy.ext.asyncio import AsyncEngine, create_async_engine

from sessions_sql import SessionCollector, SQLAlchemyBackend, migrate

from .conftest import CITUS, DATABASES, PGBOUNCER, empty_database, guard, now, queue_pool

RACE_BUDGET = 2.5  # seconds of racing per workload
LIFETIME = timedelta(days=1)
ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(params=[*DATABASES, *PGBOUNCER, *CITUS])
def db_url(request: pytest.FixtureRequest) -> str:
    """Every database, PostgreSQL through PgBouncer in transaction mode, and Citus."""
    return empty_database(request, request.param)


ORPHANS_AND_EMPTY = """
SELECT
  (SELECT count(*) FROM session_values v
    WHERE NOT EXISTS (SELECT 1 FROM sessions s WHERE s.id = v.session_id)),
  (SELECT count(*) FROM sessions s
    WHERE s.id = :sid
      AND NOT EXISTS (SELECT 1 FROM session_values v WHERE v.session_id = s.id))
"""


async def rows(engine: AsyncEngine, sql: str, **params: Any) -> list[Any]:
    async with engine.connect() as conn:
        return list((await conn.execute(text(sql), params)).all())


async def check_no_orphans(engine: AsyncEngine, sid: str = "") -> None:
    """No value row without its session; no session ``sid`` without values (one snapshot)."""
    [(orphans, empty)] = await rows(engine, ORPHANS_AND_EMPTY, sid=sid)
    assert orphans == 0, f"{orphans} value rows have no session row"
    assert empty == 0, "a session exists without any value: a write was not atomic"


async def set_created_at(engine: AsyncEngine, created: dict[str, int]) -> None:
    """Backdate sessions to whole Unix seconds (SQLite stores CURRENT_TIMESTAMP's text)."""
    params = []
    for sid, seconds in created.items():
        when: Any = datetime.fromtimestamp(seconds, timezone.utc)
        if engine.dialect.name == "sqlite":
            when = when.strftime("%Y-%m-%d %H:%M:%S")
        params.append({"id": sid, "when": when})
    async with engine.begin() as conn:
        await conn.execute(text("UPDATE sessions SET created_at = :when WHERE id = :id"), params)


async def stored_values(engine: AsyncEngine, sid: str) -> tuple[bool, dict[str, bytes]]:
    """Whether the session row exists, and its values, read in one transaction."""
    async with engine.begin() as conn:
        exists = (
            await conn.execute(text("SELECT count(*) FROM sessions WHERE id = :id"), {"id": sid})
        ).scalar_one()
        result = await conn.execute(
            text("SELECT v.key, v.value FROM session_values v WHERE v.session_id = :id"),
            {"id": sid},
        )
        return exists == 1, {key: bytes(value) for key, value in result}


# 1. Many first writes of one new session at the same instant.

CREATORS = 64
ROUNDS = 4


async def test_first_writes_of_one_session_at_the_same_instant(db_url: str) -> None:
    """64 tasks released together by one Event each write the first values of the same new
    session (half with write_value, half with write_values), with 64 connections already
    open, so that on PostgreSQL every statement reaches the database at once (on SQLite the
    backend queues this process's writes on its lock). No error; exactly one session row;
    every key there, checked in the tables. Several rounds, a new id each."""
    engine = create_async_engine(db_url, **queue_pool(size=CREATORS))
    backend = SQLAlchemyBackend(engine)
    try:
        async with contextlib.AsyncExitStack() as stack:  # open the pool's connections
            for _ in range(CREATORS):
                conn = await stack.enter_async_context(engine.connect())
                # In autocommit: behind PgBouncer an open transaction would hold one of its
                # server connections, and there are fewer of those than CREATORS.
                conn = await conn.execution_options(isolation_level="AUTOCOMMIT")
                await conn.execute(text("SELECT 1"))

        for round_ in range(ROUNDS):
            sid = f"new-session-{round_}"
            go = asyncio.Event()
            waiting = 0

            async def create(n: int, sid: str = sid, go: asyncio.Event = go) -> None:
                nonlocal waiting
                waiting += 1
                await go.wait()
                if n % 2:
                    await backend.write_value(sid, f"k{n}", b"%d" % n)
                else:
                    await backend.write_values(sid, {f"k{n}": b"%d" % n, f"k{n}-b": b"b"})

            tasks = [asyncio.create_task(create(n)) for n in range(CREATORS)]
            while waiting < CREATORS:
                await asyncio.sleep(0)
            go.set()
            await guard(asyncio.gather(*tasks), "the concurrent first writes")

            expected = {f"k{n}": b"%d" % n for n in range(CREATORS)}
            expected |= {f"k{n}-b": b"b" for n in range(0, CREATORS, 2)}
            [(count,)] = await rows(engine, "SELECT count(*) FROM sessions WHERE id = :id", id=sid)
            assert count == 1
            exists, values = await stored_values(engine, sid)
            assert exists and values == expected
            assert await backend.read_values(sid) == expected
            assert isinstance(await backend.get_session_age(sid), int)

        assert sorted(await backend.get_sessions()) == [f"new-session-{r}" for r in range(ROUNDS)]
        await check_no_orphans(engine)
    finally:
        await engine.dispose()


# 2. Writers of a session racing its removal.


@dataclass
class Write:
    key: str
    value: str
    start: int  # monotonic ns read before the call
    end: int  # monotonic ns read after it returned


async def removal_race(
    backend: SQLAlchemyBackend, sid: str, tag: str, deadline: int, writers: int = 6
) -> dict[str, Any]:
    """Writers write ``sid`` (each its own key, and every third call also a key shared by
    all, with write_values) while a remover removes ``sid`` in a loop until ``deadline``.
    Returns the log of acknowledged writes and removals, with their start and end times."""
    writes: list[Write] = []
    removals: list[tuple[int, int]] = []
    stop = asyncio.Event()

    async def writer(n: int) -> None:
        own = f"{tag}w{n}"
        i = 0
        while not stop.is_set():
            value = f"{tag}:{n}:{i}"  # the writer's sequence number i, unique in the run
            start = now()
            if i % 3 == 2:
                await backend.write_values(sid, {own: value.encode(), "shared": value.encode()})
                end = now()
                writes.append(Write("shared", value, start, end))
            else:
                await backend.write_value(sid, own, value.encode())
                end = now()
            writes.append(Write(own, value, start, end))
            i += 1

    async def remover() -> None:
        try:
            while now() < deadline:
                start = now()
                await backend.remove_session(sid)
                removals.append((start, now()))
                await asyncio.sleep(0.002)
        finally:
            stop.set()

    await asyncio.gather(remover(), *(writer(n) for n in range(writers)))
    return {"writes": [asdict(w) for w in writes], "removals": removals}


def check_removal_race(logs: list[dict[str, Any]], exists: bool, stored: dict[str, bytes]) -> None:
    """What is provable after writers raced removals of one session.

    A write commits between its start and its end; so does a removal, which deletes every
    value committed before it. Hence, with R_start the latest start and R_end the latest end
    of any removal:
    - a stored value was written by a call that did not end before R_start (else a removal
      committed after it), and no later call on its key began after it had ended (that one
      committed after it and would have replaced it: the last writer wins);
    - a missing key had no write beginning after R_end (such a write committed after every
      removal and nothing else deletes values);
    - the session row exists exactly when it holds values.
    Overlapping calls prove nothing either way and are not checked.
    """
    writes = [Write(**w) for log in logs for w in log["writes"]]
    removals = [tuple(r) for log in logs for r in log["removals"]]
    assert removals, "no removal ran"
    last_removal_start = max(start for start, _ in removals)
    last_removal_end = max(end for _, end in removals)
    by_key: dict[str, list[Write]] = defaultdict(list)
    for write in writes:
        by_key[write.key].append(write)

    assert set(stored) <= set(by_key), "a key nobody wrote"
    assert exists == bool(stored), "the session row exists without values, or values without it"
    for key, key_writes in by_key.items():
        if key in stored:
            found = [w for w in key_writes if w.value.encode() == stored[key]]
            assert found, f"{key} holds a value that no acknowledged write wrote"
            [write] = found
            assert not write.end < last_removal_start, (
                f"{key} survived a removal that started after its write had returned"
            )
            assert not any(w.start > write.end for w in key_writes), (
                f"{key} holds an older value than a write that began after it returned"
            )
        else:
            lost = [w for w in key_writes if w.start > last_removal_end]
            assert not lost, f"{key} lost a write made after the last removal had returned"


async def sample_orphans(engine: AsyncEngine, sid: str, stop: asyncio.Event) -> int:
    """Check the tables every few milliseconds until ``stop``; return how many samples."""
    samples = 0
    while True:
        done = stop.is_set()
        await check_no_orphans(engine, sid)
        samples += 1
        if done:
            return samples
        await asyncio.sleep(0.01)


async def test_writes_racing_remove_session(
    backend: SQLAlchemyBackend, engine: AsyncEngine
) -> None:
    """Six writers write session X while a remover removes it in a loop for RACE_BUDGET
    seconds. No error of any kind; the tables, sampled during the run and checked at the
    end, never hold a value without its session (nor X without values); what X finally
    holds is what the writes and removals allow (see check_removal_race)."""
    stop = asyncio.Event()
    sampler = asyncio.create_task(sample_orphans(engine, "X", stop))
    try:
        log = await guard(
            removal_race(backend, "X", "p0", now() + int(RACE_BUDGET * 1e9)), "the race"
        )
    finally:
        stop.set()
        samples = await sampler
    assert samples > 1
    assert len(log["removals"]) > 10 and len(log["writes"]) > 10
    exists, stored = await stored_values(engine, "X")
    check_removal_race([log], exists, stored)
    assert await backend.read_values("X") == stored
    await check_no_orphans(engine, "X")


# 3. The collector running while writers keep live sessions busy.

EXPIRED = 150
EXPIRED_BATCH = 7


async def seed_expired(backend: SQLAlchemyBackend, engine: AsyncEngine, fake_now: int) -> list[str]:
    """Sessions the collector must remove: created LIFETIME or more before fake_now, ties
    included, and one exactly at the boundary. Also one just inside, which must stay."""
    lifetime = int(LIFETIME.total_seconds())
    created = {f"old{i}": fake_now - lifetime - 1 - i // 10 for i in range(EXPIRED)}
    created["old-at-boundary"] = fake_now - lifetime  # age == lifetime: removed
    created["young-at-boundary"] = fake_now - lifetime + 1  # age == lifetime - 1: kept
    for chunk in range(0, len(created), 50):
        ids = list(created)[chunk : chunk + 50]
        await asyncio.gather(*(backend.write_values(s, {"a": b"1", "b": b"2"}) for s in ids))
    await set_created_at(engine, created)
    return [sid for sid in created if sid != "young-at-boundary"]


async def gc_race(
    backend: SQLAlchemyBackend,
    engine: AsyncEngine,
    tag: str,
    fake_now: int,
    deadline: int,
    before_final_pass: Callable[[], Awaitable[None]],
    writers: int = 6,
) -> dict[str, Any]:
    """Writers keep their live sessions busy (write, read back, and create new sessions)
    while, until ``deadline``, an expirer keeps making sessions old (write, then backdate)
    and the collector (clock fixed at ``fake_now``) collects in a loop in batches of
    EXPIRED_BATCH. Then several batches of sessions are made old at once and, after
    ``before_final_pass`` (no process makes sessions old any more), the collector makes one
    last pass, writers still busy: it must leave no old session behind. Returns the live
    sessions with their last value, the expired ids made here and how many sessions the
    collector removed."""
    collector = SessionCollector(
        backend,
        period=timedelta(seconds=1),
        lifetime=LIFETIME,
        clock=lambda: fake_now,
        batch_size=EXPIRED_BATCH,
    )
    live: dict[str, str] = {}
    expired: list[str] = []
    removed: list[int] = []
    stop = asyncio.Event()
    lifetime = int(LIFETIME.total_seconds())

    async def writer(n: int) -> None:
        own = f"{tag}live{n}"
        i = 0
        while not stop.is_set():
            value = f"{tag}:{n}:{i}"
            await backend.write_value(own, "a", value.encode())
            live[own] = value
            read = await backend.read_value(own, "a")
            assert read == value.encode(), "a live session lost its value to the collector"
            if i % 4 == 0:
                new = f"{tag}new{n}-{i}"
                await backend.write_values(new, {"a": value.encode(), "b": b"b"})
                live[new] = value
            i += 1

    async def expirer() -> None:
        i = 0
        while now() < deadline:
            sid = f"{tag}late{i}"
            await backend.write_values(sid, {"a": b"1", "b": b"2"})
            await set_created_at(engine, {sid: fake_now - lifetime - i % 3})
            expired.append(sid)
            i += 1
            await asyncio.sleep(0.005)

    async def collect() -> None:
        while now() < deadline:
            removed.append(await collector.collect())
            await asyncio.sleep(0.005)

    async def expire_many() -> None:
        """Several batches of old sessions at once: the final pass must remove them all."""
        bulk = {f"{tag}bulk{i}": fake_now - lifetime - i % 2 for i in range(5 * EXPIRED_BATCH + 3)}
        await asyncio.gather(*(backend.write_values(s, {"a": b"1"}) for s in bulk))
        await set_created_at(engine, bulk)
        expired.extend(bulk)

    async def busy() -> None:
        await asyncio.gather(*(writer(n) for n in range(writers)))

    busy_task = asyncio.create_task(busy())
    try:
        await asyncio.gather(expirer(), collect())
        await expire_many()
        await before_final_pass()
        removed.append(await collector.collect())
    finally:
        stop.set()
        await busy_task
    return {"live": live, "expired": expired, "removed": sum(removed), "passes": len(removed)}


async def check_gc_race(
    backend: SQLAlchemyBackend,
    engine: AsyncEngine,
    fake_now: int,
    seeded: list[str],
    results: list[dict[str, Any]],
) -> None:
    """No expired session left, none removed twice or missed in the count, no live one
    removed or changed, no value without its session."""
    expired = seeded + [sid for result in results for sid in result["expired"]]
    live: dict[str, str] = {}
    for result in results:
        live |= result["live"]
    statement = text("SELECT id FROM sessions WHERE id IN :ids").bindparams(
        bindparam("ids", expanding=True)
    )
    async with engine.connect() as conn:
        left = [row[0] for row in await conn.execute(statement, {"ids": expired})]
        present = {row[0] for row in await conn.execute(statement, {"ids": list(live)})}
    assert not left, f"{len(left)} expired sessions left behind after the last pass"
    oldest_kept: Any = datetime.fromtimestamp(fake_now - LIFETIME.total_seconds() + 1, timezone.utc)
    if engine.dialect.name == "sqlite":
        oldest_kept = oldest_kept.strftime("%Y-%m-%d %H:%M:%S")
    [(too_old,)] = await rows(
        engine, "SELECT count(*) FROM sessions WHERE created_at < :t", t=oldest_kept
    )
    assert too_old == 0
    assert sum(result["removed"] for result in results) == len(expired)
    assert present == set(live), f"live sessions removed: {sorted(set(live) - present)[:5]}"
    for sid, value in live.items():
        assert await backend.read_value(sid, "a") == value.encode(), sid
    assert await backend.read_values("young-at-boundary") == {"a": b"1", "b": b"2"}
    await check_no_orphans(engine)


async def test_collector_racing_busy_writers(
    backend: SQLAlchemyBackend, engine: AsyncEngine
) -> None:
    """The collector (fixed clock, small batches) collects in a loop while six writers keep
    their live sessions busy and an expirer keeps making sessions old; then one final pass,
    writers still busy. No error; every expired session removed and counted once; every
    live session (and one just inside the lifetime) kept, with its last value."""
    fake_now = int(time.time())
    seeded = await seed_expired(backend, engine, fake_now)

    async def nothing() -> None:
        return None

    deadline = now() + int(RACE_BUDGET * 1e9)
    result = await guard(
        gc_race(backend, engine, "p0", fake_now, deadline, nothing), "the collector race"
    )
    assert result["passes"] >= 2 and result["expired"] and len(result["live"]) > 6
    await check_gc_race(backend, engine, fake_now, seeded, [result])


# 4. Two processes doing 2 and 3 against one database.

CHILD = "import sys; from tests.test_races import child_main; child_main(sys.argv[1:])"


def child_main(argv: list[str]) -> None:
    """Entry point of a child process of test_two_processes: the removal race on session X
    and the collector race, at once, coordinated with the parent through stdin/stdout."""
    url, tag, fake_now = argv[0], argv[1], int(argv[2])
    asyncio.run(_child(url, tag, fake_now))


async def _child(url: str, tag: str, fake_now: int) -> None:
    loop = asyncio.get_running_loop()

    async def from_parent(expected: str) -> None:
        line = await loop.run_in_executor(None, sys.stdin.readline)
        if line.strip() != expected:
            raise RuntimeError(f"expected {expected!r} from the parent, got {line!r}")

    def to_parent(line: str) -> None:
        print(line, flush=True)

    async def before_final_pass() -> None:
        to_parent("PHASE1")  # this process no longer makes sessions old
        await from_parent("FINAL")  # nor does the other one

    backend = SQLAlchemyBackend.from_url(url)  # WAL mode on SQLite
    engine = create_async_engine(url)
    try:
        await backend.get_sessions()  # connected
        to_parent("READY")
        await from_parent("GO")
        deadline = now() + int(RACE_BUDGET * 1e9)
        removal, gc = await asyncio.gather(
            removal_race(backend, "X", tag, deadline, writers=4),
            gc_race(backend, engine, tag, fake_now, deadline, before_final_pass, writers=4),
        )
        to_parent("RESULT " + json.dumps({"removal": removal, "gc": gc}))
    finally:
        await engine.dispose()
        await backend.close()


class Child:
    def __init__(self, process: asyncio.subprocess.Process, stderr: Path) -> None:
        self.process = process
        self.stderr = stderr

    async def expect(self, word: str) -> str:
        assert self.process.stdout is not None
        line = (await guard(self.process.stdout.readline(), f"waiting for {word}")).decode()
        if not line.startswith(word):
            await guard(self.process.wait(), "a failed child's exit")
            pytest.fail(
                f"child said {line!r} instead of {word}; exit status "
                f"{self.process.returncode}; stderr:\n{self.stderr.read_text()}",
                pytrace=False,
            )
        return line[len(word) :].strip()

    async def say(self, word: str) -> None:
        assert self.process.stdin is not None
        self.process.stdin.write(f"{word}\n".encode())
        await self.process.stdin.drain()


async def test_two_processes(
    db_url: str, backend: SQLAlchemyBackend, engine: AsyncEngine, tmp_path: Path
) -> None:
    """Two processes (same database; on SQLite the same file in WAL mode, switched by the
    children's from_url) each run the removal race on session X and the collector race at
    once, starting together. The parent samples the tables for values without their session
    during the run, then checks the merged logs with the same checks as tests 2 and 3."""
    fake_now = int(time.time())
    seeded = await seed_expired(backend, engine, fake_now)
    env = dict(
        os.environ, PYTHONPATH=os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])
    )
    children: list[Child] = []
    try:
        for tag in ("p1", "p2"):
            stderr = tmp_path / f"{tag}.stderr"
            with stderr.open("wb") as err:
                process = await asyncio.create_subprocess_exec(
                    sys.executable,
                    "-c",
                    CHILD,
                    db_url,
                    tag,
                    str(fake_now),
                    stdin=subprocess.PIPE,
                    stdout=subprocess.PIPE,
                    stderr=err,
                    cwd=ROOT,
                    env=env,
                    limit=2**26,  # the RESULT line holds the whole log
                )
            children.append(Child(process, stderr))
        for child in children:
            await child.expect("READY")
        stop = asyncio.Event()
        sampler = asyncio.create_task(sample_orphans(engine, "X", stop))
        try:
            for child in children:
                await child.say("GO")
            for child in children:
                await child.expect("PHASE1")
            for child in children:
                await child.say("FINAL")
            results = [json.loads(await child.expect("RESULT")) for child in children]
        finally:
            stop.set()
            samples = await sampler
        for child in children:
            assert await guard(child.process.wait(), "a child's exit") == 0
    finally:
        for child in children:
            if child.process.returncode is None:
                child.process.kill()
                await child.process.wait()
    assert samples > 1
    exists, stored = await stored_values(engine, "X")
    check_removal_race([r["removal"] for r in results], exists, stored)
    await check_gc_race(backend, engine, fake_now, seeded, [r["gc"] for r in results])


# 5. Calls cancelled at random points.

CANCELLERS = 32


@pytest.mark.parametrize("owned", [False, True], ids=["host-engine", "from_url"])
async def test_cancelled_calls_leave_pool_and_data_sound(db_url: str, owned: bool) -> None:
    """Tasks writing and removing sessions are cancelled at random points, as a web server
    cancels a request whose client went away, over a pool of 4 connections, on a host's
    engine and on an engine of the backend's own (which on SQLite keeps its connections
    between calls). No connection leaks or is left inside a transaction (afterwards four
    calls at once, one per connection, work), every session is all or nothing (no value
    without its session, no session without values), and the backend serves every call."""
    pool = {**queue_pool(size=4), "pool_timeout": 10}
    if owned:
        backend = SQLAlchemyBackend.from_url(db_url, **pool)
    else:
        backend = SQLAlchemyBackend(create_async_engine(db_url, **pool))
    pool_of = backend.engine.sync_engine.pool
    engine = create_async_engine(db_url)  # for the checks
    rng = random.Random(5)
    cancelled = 0
    try:
        deadline = time.monotonic() + RACE_BUDGET
        round_ = 0
        while time.monotonic() < deadline:
            round_ += 1

            async def work(n: int, round_: int = round_) -> None:
                sid = f"c{n % 8}"
                for i in range(4):
                    if (n + i) % 3 == 0:
                        await backend.remove_session(sid)
                    else:
                        await backend.write_values(sid, {"a": b"%d" % round_, "b": b"%d" % i})

            tasks = [asyncio.create_task(work(n)) for n in range(CANCELLERS)]
            await asyncio.sleep(rng.uniform(0, 0.004))
            for task in tasks:
                if rng.random() < 0.5:
                    task.cancel()
            results = await guard(
                asyncio.gather(*tasks, return_exceptions=True), "the cancelled calls"
            )
            cancelled += sum(isinstance(r, asyncio.CancelledError) for r in results)
            assert not [r for r in results if isinstance(r, Exception)]
            held = pool_of.checkedout()  # type: ignore[attr-defined]
            assert held <= 4 if owned else held == 0
            await check_no_orphans(engine)
            [(empty,)] = await rows(
                engine,
                "SELECT count(*) FROM sessions s WHERE NOT EXISTS "
                "(SELECT 1 FROM session_values v WHERE v.session_id = s.id)",
            )
            assert empty == 0, "a cancelled write_values left a session without values"
        assert cancelled > 0
        # Four calls at once hold all four connections: none was left broken.
        sids = [f"after-{n}" for n in range(4)]
        await guard(asyncio.gather(*(backend.write_value(sid, "k", b"v") for sid in sids)), "calls")
        assert await asyncio.gather(*(backend.read_value(sid, "k") for sid in sids)) == [b"v"] * 4
    finally:
        await engine.dispose()
        await backend.close()
        await backend.engine.dispose()


# 6. Writers extending expiries while the collector removes expired sessions.

EXPIRING = 100  # sessions per group
FAR = 4_000_000_000  # an expiry far in the future


async def test_expiry_extensions_racing_the_collector(db_url: str) -> None:
    """Every session starts expired (expiry NOW - 1). Group A is extended before the
    collector starts, group B while it removes expired sessions in small batches, group C
    never. Writers keep extending A and B (set_session_expiry, or update_session with values
    and the new expiry; each writer its own sessions) through the whole race. No call fails;
    no session of A is ever removed (A's values are all there, with the far expiry); every
    session of B that is left has the far expiry and its last acknowledged value (an
    update_session after the removal creates it anew); every session of C is removed."""
    fake_now = 2_000_000_000
    groups = {g: [f"{g}{i}" for i in range(EXPIRING)] for g in "ABC"}
    backend = SQLAlchemyBackend.from_url(db_url)
    collector = SessionCollector(
        backend, period=timedelta(seconds=1), clock=lambda: fake_now, batch_size=EXPIRED_BATCH
    )
    last: dict[str, bytes] = {}
    stop = asyncio.Event()
    removed: list[int] = []
    rng = random.Random(6)
    extenders_n = 6
    try:
        for group in groups.values():
            await asyncio.gather(
                *(backend.write_values(s, {"v": b"0"}, expires_at=fake_now - 1) for s in group)
            )
        for sid in groups["A"]:
            await backend.set_session_expiry(sid, FAR)
            last[sid] = b"0"

        async def extender(n: int) -> None:
            own = (groups["A"] + groups["B"])[n::extenders_n]
            i = 0
            while not stop.is_set():
                i += 1
                sid = rng.choice(own)
                if i % 2:
                    await backend.set_session_expiry(sid, FAR)
                else:
                    value = b"%d-%d" % (n, i)
                    await backend.update_session(sid, {"v": value}, expires_at=FAR)
                    last[sid] = value
                if sid.startswith("A"):
                    assert await backend.get_session_expiry(sid) == FAR

        async def collect() -> None:
            deadline = now() + int(RACE_BUDGET * 1e9)
            while now() < deadline:
                removed.append(await collector.collect())
                await asyncio.sleep(0)

        extenders = [asyncio.create_task(extender(n)) for n in range(extenders_n)]
        try:
            await guard(collect(), "the collector")
        finally:
            stop.set()
            await guard(asyncio.gather(*extenders), "the extenders")
        removed.append(await collector.collect())  # writers done: a last pass

        async def snapshot(sid: str) -> Any:
            return await backend.read_session(sid)

        left = {sid: await snapshot(sid) for group in groups.values() for sid in group}
        for sid in groups["A"]:
            session = left[sid]
            assert session is not None, "a session extended before the collector was removed"
            assert (session.expires_at, session.values) == (FAR, {"v": last[sid]})
        for sid in groups["B"]:
            session = left[sid]
            if session is not None:
                assert session.expires_at == FAR
                assert session.values == {"v": last.get(sid, b"0")}
        assert all(left[sid] is None for sid in groups["C"])
        gone = sum(session is None for session in left.values())
        assert sum(removed) >= gone >= EXPIRING  # all of C, and B sessions taken first
        assert len(removed) > 2
    finally:
        await backend.close()


# 7. A write cancelled inside its transaction, at the point that once left SQLite locked.


class CancelledAsItReturns(sqlite3.Connection):
    """A SQLite connection whose next ``executemany`` cancels ``victim`` as it returns, and
    keeps its cursor alive (whose statement executemany leaves unreset). A cancellation
    that lands just after aiosqlite resolved the call does the same: the traceback of the
    CancelledError holds aiosqlite's future, so the cursor, while the task or it lives."""

    victim: ClassVar[tuple[asyncio.AbstractEventLoop, asyncio.Task[None]] | None] = None
    cursors: ClassVar[list[sqlite3.Cursor]] = []

    def executemany(self, *args: Any) -> sqlite3.Cursor:
        cursor = super().executemany(*args)
        victim, CancelledAsItReturns.victim = CancelledAsItReturns.victim, None
        if victim is not None:
            loop, task = victim
            CancelledAsItReturns.cursors.append(cursor)
            loop.call_soon_threadsafe(task.cancel)
        return cursor


@pytest.mark.parametrize("owned", [False, True], ids=["host-engine", "from_url"])
async def test_write_cancelled_inside_its_transaction_leaves_no_sqlite_lock(
    sqlite_url: str, owned: bool
) -> None:
    """A SQLite write cancelled inside its transaction, while a cursor of its statements is
    still alive, ends that transaction before its connection is discarded: the next write
    gets SQLite's write lock (rather than waiting out the busy timeout behind a closed
    connection that still holds it), and the cancelled write left nothing behind."""
    await migrate(sqlite_url)
    options: dict[str, Any] = {"connect_args": {"factory": CancelledAsItReturns}}
    if owned:
        backend = SQLAlchemyBackend.from_url(sqlite_url, **options)
    else:
        backend = SQLAlchemyBackend(create_async_engine(sqlite_url, **options))
    engine = create_async_engine(sqlite_url)  # for the checks
    try:
        write = asyncio.create_task(backend.write_values("s", {"a": b"1", "b": b"2"}))
        CancelledAsItReturns.victim = (asyncio.get_running_loop(), write)
        await asyncio.wait({write})
        assert write.cancelled()
        await guard(backend.write_value("next", "k", b"v"), "the write after the cancelled one")
        assert await stored_values(engine, "s") == (False, {})
        assert await stored_values(engine, "next") == (True, {"k": b"v"})
    finally:
        CancelledAsItReturns.victim = None
        CancelledAsItReturns.cursors.clear()
        await engine.dispose()
        await backend.close()
        await backend.engine.dispose()
