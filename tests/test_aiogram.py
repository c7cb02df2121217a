"""sessions_sql.aiogram: SQLStorage against aiogram's own storages and conventions, atomic
update_data under concurrency, TTLs, and event isolation (across processes on PostgreSQL)."""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import json
import subprocess
import sys
from collections.abc import AsyncIterator
from datetime import timedelta
from pathlib import Path
from types import MappingProxyType
from typing import Any, Literal

import pytest
from aiogram.exceptions import DataNotDictLikeError
from aiogram.fsm.state import State, StatesGroup
from aiogram.fsm.storage.base import DefaultKeyBuilder, KeyBuilder, StorageKey
from aiogram.fsm.storage.memory import MemoryStorage
from sqlalchemy import text
from sqlalchemy.ext.asyncio import create_async_engine

from sessions_sql import MemoryBackend, SessionCollector, SessionError, SQLAlchemyBackend
from sessions_sql.aiogram import SQLEventIsolation, SQLStorage

from .conftest import guard
from .test_races import Child

ROOT = Path(__file__).resolve().parent.parent
KEY = StorageKey(bot_id=42, chat_id=-100, user_id=7)


class Form(StatesGroup):
    name = State()
    age = State()


class Clock:
    """A clock the test moves by hand (Unix seconds)."""

    def __init__(self, now: float = 1_800_000_000) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


@pytest.fixture
async def storage(any_backend: Any) -> SQLStorage:
    return SQLStorage(any_backend)


async def test_nothing_stored_reads_as_none_and_empty(storage: SQLStorage) -> None:
    assert await storage.get_state(KEY) is None
    assert await storage.get_data(KEY) == {}
    assert await storage.get_value(KEY, "missing") is None
    assert await storage.get_value(KEY, "missing", 5) == 5
    # Reading, and removing what is not there, creates nothing.
    await storage.set_state(KEY, None)
    await storage.set_data(KEY, {})
    assert await storage.backend.get_sessions() == []


async def run_script(storage: Any) -> list[Any]:
    """The same calls on any storage; what each returns (and reads back) is recorded."""
    out: list[Any] = []
    other = StorageKey(bot_id=42, chat_id=-100, user_id=8)
    await storage.set_state(KEY, Form.name)
    out += [await storage.get_state(KEY), await storage.get_data(KEY)]
    out.append(await storage.update_data(KEY, {"name": "Ada", "tags": ["a", "b"]}))
    out.append(await storage.update_data(KEY, {"age": 36, "name": "Ada L."}))
    await storage.set_state(KEY, "Form:age")
    out += [await storage.get_state(KEY), await storage.get_data(KEY)]
    out += [await storage.get_value(KEY, "age"), await storage.get_value(KEY, "x", "dflt")]
    # Each part goes without the other.
    await storage.set_state(KEY, None)
    out += [await storage.get_state(KEY), await storage.get_data(KEY)]
    await storage.set_state(KEY, Form.age)
    await storage.set_data(KEY, {"only": {"nested": [1, None, True]}})  # replaces
    out += [await storage.get_state(KEY), await storage.get_data(KEY)]
    await storage.set_data(KEY, {})
    out += [await storage.get_state(KEY), await storage.get_data(KEY)]
    out.append(await storage.update_data(KEY, {}))
    out.append(await storage.update_data(KEY, {"n": 1}))
    # The returned data is a copy: changing it changes nothing stored.
    data = await storage.get_data(KEY)
    data["n"] = 2
    out.append(await storage.get_data(KEY))
    # Other keys are untouched; clear() as FSMContext does it.
    out += [await storage.get_state(other), await storage.get_data(other)]
    await storage.set_state(KEY, None)
    await storage.set_data(KEY, {})
    out += [await storage.get_state(KEY), await storage.get_data(KEY)]
    return out


async def test_behaves_as_aiogram_memory_storage(storage: SQLStorage) -> None:
    expected = await run_script(MemoryStorage())
    assert await run_script(storage) == expected
    assert expected[0] == "Form:name"  # the script does test something
    assert expected[3] == {"name": "Ada L.", "tags": ["a", "b"], "age": 36}


@pytest.mark.parametrize("data", [[("a", 1)], MappingProxyType({"a": 1}), None, "a=1"])
async def test_set_data_refuses_what_is_not_a_dict(storage: SQLStorage, data: Any) -> None:
    for peer in (MemoryStorage(), storage):
        with pytest.raises(DataNotDictLikeError):
            await peer.set_data(KEY, data)
    assert await storage.backend.get_sessions() == []


async def test_bad_input_is_refused_before_anything_is_written(storage: SQLStorage) -> None:
    with pytest.raises(TypeError, match="JSON"):
        await storage.set_data(KEY, {"a": object()})
    with pytest.raises(TypeError, match="JSON"):
        await storage.update_data(KEY, {"a": {1, 2}})
    with pytest.raises(ValueError, match="characters"):
        await storage.update_data(KEY, {"k" * 251: 1})
    with pytest.raises(TypeError, match="keys must be str"):
        await storage.update_data(KEY, {("a",): 1})
    with pytest.raises(TypeError, match="state"):
        await storage.set_state(KEY, 3)  # type: ignore[arg-type]
    with pytest.raises(TypeError, match="mapping"):
        await storage.update_data(KEY, [("a", 1)])  # type: ignore[arg-type]
    assert await storage.backend.get_sessions() == []
    # JSON's own key names, as RedisStorage's JSON gives them back.
    assert await storage.update_data(KEY, {1: "x", None: "n"}) == {"1": "x", "null": "n"}
    assert await storage.get_data(KEY) == {"1": "x", "null": "n"}


async def test_one_session_per_key_in_the_session_format(
    any_url: str | None, any_backend: Any
) -> None:
    storage = SQLStorage(any_backend)
    await storage.set_state(KEY, Form.name)
    await storage.update_data(KEY, {"name": "Ada", "age": 36})
    sid = "fsm:42:-100:7:default"  # bot id, chat, user, destiny
    assert await any_backend.get_sessions() == [sid]
    values = await any_backend.read_values(sid)
    assert {k: json.loads(v) for k, v in values.items()} == {
        "state": {"expires_at": None, "value": "Form:name"},
        "data:name": {"expires_at": None, "value": "Ada"},
        "data:age": {"expires_at": None, "value": 36},
    }
    if any_url is not None:  # readable with the package's command line
        command = [sys.executable, "-m", "sessions_sql", "--url", any_url, "show", sid, "--json"]
        done = await asyncio.to_thread(subprocess.run, command, capture_output=True, check=True)
        shown = json.loads(done.stdout)
        assert set(shown["value_sizes"]) == {"state", "data:name", "data:age"}
    # A value that is not in the session format is an error, not a silent miss.
    await any_backend.write_value(sid, "state", b"\x80pickle")
    with pytest.raises(SessionError):
        await storage.get_state(KEY)


async def test_bots_business_connections_threads_and_destinies_do_not_collide(
    storage: SQLStorage,
) -> None:
    keys = [
        KEY,
        StorageKey(bot_id=43, chat_id=-100, user_id=7),
        StorageKey(bot_id=42, chat_id=-100, user_id=7, business_connection_id="biz"),
        StorageKey(bot_id=42, chat_id=-100, user_id=7, thread_id=9),
        StorageKey(bot_id=42, chat_id=-100, user_id=7, destiny="scenes_history"),
    ]
    for n, key in enumerate(keys):
        await storage.set_state(key, f"S:{n}")
        await storage.set_data(key, {"n": n})
    for n, key in enumerate(keys):
        assert await storage.get_state(key) == f"S:{n}"
        assert await storage.get_data(key) == {"n": n}
    assert len(await storage.backend.get_sessions()) == len(keys)


class TenantKeyBuilder(KeyBuilder):
    def build(self, key: StorageKey, part: Literal["data", "state", "lock"] | None = None) -> str:
        return f"tenant-a/{key.user_id}" + (f"/{part}" if part else "")


async def test_a_custom_key_builder_is_honoured(storage: SQLStorage) -> None:
    custom = SQLStorage(storage.backend, key_builder=TenantKeyBuilder())
    await custom.set_state(KEY, "S:1")
    await custom.update_data(StorageKey(bot_id=1, chat_id=1, user_id=7), {"a": 1})
    assert await storage.backend.get_sessions() == ["tenant-a/7"]
    assert await custom.get_data(KEY) == {"a": 1}
    # aiogram's DefaultKeyBuilder without destinies refuses scenes, as it does for Redis.
    plain = SQLStorage(storage.backend, key_builder=DefaultKeyBuilder())
    with pytest.raises(ValueError, match="destiny"):
        await plain.get_state(StorageKey(bot_id=1, chat_id=1, user_id=1, destiny="scenes_history"))


def test_constructor_refuses_what_it_cannot_use() -> None:
    with pytest.raises(TypeError, match="SessionExpiry"):
        SQLStorage(object())
    with pytest.raises(TypeError, match="KeyBuilder"):
        SQLStorage(MemoryBackend(), key_builder="fsm")  # type: ignore[arg-type]
    for bad in (0, -5, timedelta(milliseconds=10)):
        with pytest.raises(ValueError, match="at least one second"):
            SQLStorage(MemoryBackend(), state_ttl=bad)
    for wrong in (1.5, "10", True):
        with pytest.raises(TypeError, match="data_ttl"):
            SQLStorage(MemoryBackend(), data_ttl=wrong)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="timeout"):
        SQLStorage(MemoryBackend()).create_isolation(timeout=0)


async def test_from_url_owns_its_backend_and_a_given_one_stays_open(db_url: str) -> None:
    storage = SQLStorage.from_url(db_url, connection_kwargs={"pool_size": 2}, state_ttl=60)
    assert storage.state_ttl == 60
    await storage.set_state(KEY, "S:1")
    await storage.close()
    assert storage.backend.engine.sync_engine.pool.checkedout() == 0
    async with SQLAlchemyBackend.from_url(db_url) as backend:
        shared = SQLStorage(backend)
        assert await shared.get_state(KEY) == "S:1"
        await shared.close()
        assert await backend.read_value("fsm:42:-100:7:default", "state") is not None


# Concurrency: update_data is atomic.


async def test_concurrent_update_data_keeps_every_key(db_url: str) -> None:
    """64 tasks on one storage and 32 on a second storage of its own engine (another
    process's view) update one new key at once, each with keys of its own, three times: no
    error, and every key survives. Each result holds at least the task's own keys."""
    async with (
        SQLAlchemyBackend.from_url(db_url, pool_size=16, max_overflow=0) as one,
        SQLAlchemyBackend.from_url(db_url, pool_size=8, max_overflow=0) as two,
    ):
        storages = [SQLStorage(one), SQLStorage(two)]

        async def task(n: int) -> None:
            for round_ in range(3):
                mine = {f"t{n}r{round_}": n, f"shared{round_}": n}
                result = await storages[n % 3 == 0].update_data(KEY, mine)
                assert result.items() >= {f"t{n}r{round_}": n}.items()

        await guard(asyncio.gather(*(task(n) for n in range(96))), "concurrent update_data")
        data = await storages[0].get_data(KEY)
    assert {k for k in data if k.startswith("t")} == {
        f"t{n}r{r}" for n in range(96) for r in range(3)
    }
    assert {data[f"shared{r}"] for r in range(3)} <= set(range(96))


@contextlib.asynccontextmanager
async def children(tmp_path: Path, script: str, *argvs: list[str]) -> AsyncIterator[list[Child]]:
    """One process per argv running ``script`` (stderr kept for failures), killed if the
    test leaves them running."""
    started: list[Child] = []
    try:
        for n, argv in enumerate(argvs):
            stderr = tmp_path / f"child{n}.stderr"
            with stderr.open("wb") as err:
                process = await asyncio.create_subprocess_exec(
                    sys.executable, "-c", script, *argv,
                    stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=err,
                )  # fmt: skip
            started.append(Child(process, stderr))
        yield started
        for child in started:
            assert await guard(child.process.wait(), "a child's exit") == 0
    finally:
        for child in started:
            if child.process.returncode is None:
                child.process.kill()
                await child.process.wait()


WORKER = """
import asyncio, sys
from aiogram.fsm.storage.base import StorageKey
from sessions_sql.aiogram import SQLStorage

async def main(url, tag, n):
    storage = SQLStorage.from_url(url)
    key = StorageKey(bot_id=42, chat_id=-100, user_id=7)
    print("READY", flush=True)
    sys.stdin.readline()
    await asyncio.gather(*(storage.update_data(key, {f"{tag}-{i}": i}) for i in range(n)))
    await storage.close()
    print("DONE", flush=True)

asyncio.run(main(sys.argv[1], sys.argv[2], int(sys.argv[3])))
"""


async def test_update_data_from_two_processes_keeps_every_key(db_url: str, tmp_path: Path) -> None:
    async with children(tmp_path, WORKER, [db_url, "p1", "100"], [db_url, "p2", "100"]) as procs:
        for child in procs:
            await child.expect("READY")
        for child in procs:
            await child.say("GO")
        for child in procs:
            await child.expect("DONE")
    async with SQLAlchemyBackend.from_url(db_url) as backend:
        data = await SQLStorage(backend).get_data(KEY)
    assert data == {f"{tag}-{i}": i for tag in ("p1", "p2") for i in range(100)}


# TTLs.


async def test_state_and_data_ttls_as_redis_storage_keeps_them(any_backend: Any) -> None:
    clock = Clock()
    t0 = int(clock.now)
    storage = SQLStorage(any_backend, state_ttl=10, data_ttl=timedelta(seconds=20), clock=clock)
    await storage.set_state(KEY, Form.name)
    await storage.update_data(KEY, {"a": 1})
    clock.now = t0 + 10
    assert await storage.get_state(KEY) == "Form:name"
    clock.now = t0 + 11
    assert await storage.get_state(KEY) is None  # reads do not refresh a TTL
    assert await storage.get_data(KEY) == {"a": 1}
    clock.now = t0 + 15
    assert await storage.update_data(KEY, {"b": 2}) == {"a": 1, "b": 2}  # data TTL restarts
    clock.now = t0 + 35
    assert await storage.get_data(KEY) == {"a": 1, "b": 2}
    assert await storage.get_value(KEY, "a") == 1
    clock.now = t0 + 36
    assert await storage.get_data(KEY) == {}
    assert await storage.get_value(KEY, "a", "gone") == "gone"
    # Expired data does not come back with the next update.
    assert await storage.update_data(KEY, {"c": 3}) == {"c": 3}
    assert await storage.get_data(KEY) == {"c": 3}
    await storage.set_state(KEY, Form.age)
    clock.now = t0 + 36 + 10
    assert await storage.get_state(KEY) == "Form:age"


async def test_collector_removes_a_key_once_both_parts_expired(any_backend: Any) -> None:
    clock = Clock()
    t0 = int(clock.now)
    storage = SQLStorage(any_backend, state_ttl=30, data_ttl=10, clock=clock)
    collector = SessionCollector(any_backend, timedelta(minutes=1), clock=clock)
    await storage.update_data(KEY, {"a": 1})
    clock.now = t0 + 5
    await storage.set_state(KEY, Form.name)  # lives until t0 + 35
    other = StorageKey(bot_id=42, chat_id=1, user_id=1)
    await storage.update_data(other, {"b": 2})  # until t0 + 15, the session until t0 + 35
    clock.now = t0 + 16
    assert await collector.collect() == 0
    assert await storage.get_data(other) == {}  # expired, though not collected yet
    assert await storage.get_state(KEY) == "Form:name"
    clock.now = t0 + 36
    assert await collector.collect() == 2
    assert await any_backend.get_sessions() == []
    assert await storage.get_state(KEY) is None


async def test_with_one_ttl_the_other_part_lives_on(any_backend: Any) -> None:
    clock = Clock()
    t0 = int(clock.now)
    storage = SQLStorage(any_backend, state_ttl=10, clock=clock)
    collector = SessionCollector(any_backend, timedelta(minutes=1), clock=clock)
    await storage.set_state(KEY, Form.name)
    await storage.set_data(KEY, {"a": 1})
    clock.now = t0 + 1000
    assert await collector.collect() == 0
    assert await storage.get_state(KEY) is None
    assert await storage.get_data(KEY) == {"a": 1}
    # The same keys read without TTLs: a data expiry written with one does not linger.
    timed = SQLStorage(any_backend, data_ttl=5, clock=clock)
    await timed.set_data(KEY, {"b": 1})
    plain = SQLStorage(any_backend, clock=clock)
    await plain.update_data(KEY, {"c": 1})
    clock.now += 100
    assert await plain.get_data(KEY) == {"b": 1, "c": 1}
    # ... and data it let expire stays expired.
    other = StorageKey(bot_id=42, chat_id=1, user_id=1)
    await timed.set_data(other, {"x": 1})
    clock.now += 6
    assert await plain.update_data(other, {"y": 2}) == {"y": 2}
    assert await plain.get_data(other) == {"y": 2}


async def test_a_storage_without_ttls_clears_an_expiry_left_by_one_with_them(
    any_backend: Any,
) -> None:
    clock = Clock()
    sid = "fsm:42:-100:7:default"
    await SQLStorage(any_backend, state_ttl=10, data_ttl=20, clock=clock).update_data(KEY, {"a": 1})
    assert await any_backend.get_session_expiry(sid) == int(clock.now) + 20
    plain = SQLStorage(any_backend, clock=clock)
    assert await plain.update_data(KEY, {"b": 2}) == {"a": 1, "b": 2}
    assert await any_backend.get_session_expiry(sid) is None
    clock.now += 1000
    assert await SessionCollector(any_backend, timedelta(minutes=1), clock=clock).collect() == 0
    assert await plain.get_data(KEY) == {"a": 1, "b": 2}


# Event isolation.


async def holders(isolation: SQLEventIsolation, keys: list[StorageKey]) -> list[tuple[int, str]]:
    """Run one short critical section per key, all at once; return the enter/leave events."""
    events: list[tuple[int, str]] = []

    async def section(n: int, key: StorageKey) -> None:
        async with isolation.lock(key):
            events.append((n, "in"))
            await asyncio.sleep(0.002)
            events.append((n, "out"))

    await guard(asyncio.gather(*(section(n, k) for n, k in enumerate(keys))), "locked sections")
    return events


async def test_isolation_serialises_one_key_and_not_others(any_backend: Any) -> None:
    isolation = SQLStorage(any_backend).create_isolation()
    try:
        same = await holders(isolation, [KEY] * 20)
        assert all(same[i][0] == same[i + 1][0] for i in range(0, 40, 2))  # never interleaved
        # Another key enters while the first is held (else this never ends: guard fails it).
        first_in, second_in = asyncio.Event(), asyncio.Event()

        async def first() -> None:
            async with isolation.lock(KEY):
                first_in.set()
                await second_in.wait()

        async def second() -> None:
            await first_in.wait()
            async with isolation.lock(StorageKey(bot_id=42, chat_id=1, user_id=1)):
                second_in.set()

        await guard(asyncio.gather(first(), second()), "a second key while the first is held")
        assert len(isolation._local) == 0  # no lock kept for keys nobody holds
    finally:
        await isolation.close()


async def advisory_locks(url: str) -> int:
    engine = create_async_engine(url)
    try:
        async with engine.connect() as conn:
            query = (
                "SELECT count(*) FROM pg_locks WHERE locktype = 'advisory' AND granted"
                " AND database = (SELECT oid FROM pg_database WHERE datname = current_database())"
            )
            return int((await conn.execute(text(query))).scalar_one())
    finally:
        await engine.dispose()


async def test_isolation_is_released_on_exception_cancellation_and_timeout(
    any_url: str | None, any_backend: Any
) -> None:
    isolation = SQLStorage(any_backend).create_isolation(timeout=0.3)
    try:
        with pytest.raises(ZeroDivisionError):
            async with isolation.lock(KEY):
                raise ZeroDivisionError
        entered = asyncio.Event()

        async def hold_forever() -> None:
            async with isolation.lock(KEY):
                entered.set()
                await asyncio.Event().wait()

        holder = asyncio.create_task(hold_forever())
        await guard(entered.wait(), "the holder entering")
        if any_url is not None and any_url.startswith("postgresql"):
            assert await advisory_locks(any_url) == 1
        waiters = [asyncio.create_task(holders(isolation, [KEY])) for _ in range(3)]
        await asyncio.sleep(0.05)
        waiters[0].cancel()  # cancelled while waiting: it must never get the lock
        with pytest.raises(TimeoutError):
            await guard(waiters[1], "a waiter timing out")
        holder.cancel()  # cancelled while holding
        assert await guard(asyncio.gather(holder, return_exceptions=True), "the holder")
        with pytest.raises(asyncio.CancelledError):
            await waiters[0]
        # The last waiter either timed out too or got the lock once the holder left.
        await guard(asyncio.gather(waiters[2], return_exceptions=True), "the last waiter")
        assert len(await holders(isolation, [KEY, KEY])) == 4  # free again
        if any_url is not None and any_url.startswith("postgresql"):
            assert await advisory_locks(any_url) == 0
    finally:
        await isolation.close()


LOCKED_WORKER = """
import asyncio, json, sys, time
from aiogram.fsm.storage.base import StorageKey
from sessions_sql.aiogram import SQLStorage

async def main(url, role, n):
    storage = SQLStorage.from_url(url)
    isolation = storage.create_isolation()
    key = StorageKey(bot_id=42, chat_id=-100, user_id=7)
    spans = []
    print("READY", flush=True)
    sys.stdin.readline()

    async def handler(i):
        asked = time.monotonic_ns()
        async with isolation.lock(key):
            start = time.monotonic_ns()
            if role == "first" and i == 0:  # hold the lock until the parent says so
                print("HOLDING", flush=True)
                await asyncio.to_thread(sys.stdin.readline)
            # A read-modify-write that only isolation keeps whole.
            count = (await storage.get_data(key)).get("count", 0)
            await asyncio.sleep(0.001)
            await storage.set_data(key, {"count": count + 1})
            spans.append((start, time.monotonic_ns(), asked))

    tasks = [asyncio.ensure_future(handler(i)) for i in range(n)]
    await asyncio.sleep(0)  # every handler has asked for the lock
    if role == "second":
        print("ASKED", flush=True)
    await asyncio.gather(*tasks)
    await isolation.close()
    await storage.close()
    print("RESULT", json.dumps(spans), flush=True)

asyncio.run(main(sys.argv[1], sys.argv[2], int(sys.argv[3])))
"""


async def test_two_processes_never_interleave_handlers_of_one_key(
    postgres_url: str, tmp_path: Path
) -> None:
    """Two processes, 40 handlers of one key each. The first holds the lock until every
    handler of the second has asked for it, so that they contend; then both run freely."""
    engine = create_async_engine(postgres_url)
    async with engine.begin() as conn:
        await conn.execute(text("TRUNCATE sessions, session_values"))
    await engine.dispose()
    argvs = ([postgres_url, "first", "40"], [postgres_url, "second", "40"])
    async with children(tmp_path, LOCKED_WORKER, *argvs) as (first, second):
        for child in (first, second):
            await child.expect("READY")
        await first.say("GO")
        await first.expect("HOLDING")
        await second.say("GO")
        await second.expect("ASKED")
        await first.say("RELEASE")
        runs = [json.loads(await child.expect("RESULT")) for child in (first, second)]
    spans = sorted((start, end) for run in runs for start, end, _ in run)
    assert len(spans) == 80
    assert all(a[1] <= b[0] for a, b in itertools.pairwise(spans))  # no two overlap
    # The second process's handlers all asked while the first held the lock.
    held_until = min(end for _, end, _ in runs[0])
    assert max(asked for _, _, asked in runs[1]) < held_until
    assert min(start for start, _, _ in runs[1]) > held_until
    async with SQLAlchemyBackend.from_url(postgres_url) as backend:
        assert await SQLStorage(backend).get_data(KEY) == {"count": 80}


def test_importing_sessions_sql_imports_no_framework() -> None:
    code = "import sys, sessions_sql; print('aiogram' in sys.modules, 'telegram' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.split() == ["False", "False"]
