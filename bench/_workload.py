"""The measured operations, their data, and the timing of one round.

A *round* runs one operation ``n`` times on one store (raw driver or sessions_sql) from
``concurrency`` tasks sharing a counter, and records every call's latency. Operations that
consume data (removals) get it seeded before the round, untimed, and every round's leftovers
are cleaned up after it, so that the data set is the same for every round.
"""

from __future__ import annotations

import asyncio
import gc
import math
import statistics
import time
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field

from ._db import Row
from ._raw import Store

__all__ = ["OPERATIONS", "Call", "Sample", "Workload", "percentile", "run_round"]

#: The measured operations, in the order they run.
OPERATIONS = (
    "write_value_new",
    "write_value_existing",
    "read_value_hit",
    "read_value_miss",
    "remove_value",
    "get_session_age",
    "remove_session",
    "read_values",
    "write_values",
    "remove_values",
    "read_session",
    "set_session_expiry",
    "save_session",
)

#: Expiries the benchmark sets: far in the future, so nothing it writes ever expires.
EXPIRY_BASE = 4_000_000_000

#: The i-th call of a round.
Call = Callable[[int], Awaitable[object]]


def percentile(sorted_values: Sequence[float], fraction: float) -> float:
    """Nearest-rank percentile of already sorted values."""
    if not sorted_values:
        return math.nan
    rank = max(1, math.ceil(fraction * len(sorted_values)))
    return sorted_values[min(rank, len(sorted_values)) - 1]


@dataclass(frozen=True)
class Sample:
    """One timed round."""

    ops: int
    seconds: float
    p50_ms: float
    p99_ms: float
    #: CPU time this process spent in the round (all its threads).
    cpu_seconds: float = math.nan

    @property
    def ops_per_s(self) -> float:
        return self.ops / self.seconds if self.seconds > 0 else math.nan

    @classmethod
    def of(cls, latencies: list[float], seconds: float, cpu_seconds: float = math.nan) -> Sample:
        ordered = sorted(latencies)
        return cls(
            ops=len(latencies),
            seconds=seconds,
            p50_ms=percentile(ordered, 0.50) * 1000,
            p99_ms=percentile(ordered, 0.99) * 1000,
            cpu_seconds=cpu_seconds,
        )


async def run_round(call: Call, n: int, concurrency: int) -> Sample:
    """Run ``call(0)`` .. ``call(n - 1)`` from ``concurrency`` tasks; time each call."""
    latencies = [0.0] * n
    indexes = iter(range(n))
    clock = time.perf_counter

    async def worker() -> None:
        for i in indexes:  # shared iterator: each index is taken by exactly one task
            start = clock()
            await call(i)
            latencies[i] = clock() - start

    gc.collect()
    cpu = time.process_time()
    start = clock()
    await asyncio.gather(*(worker() for _ in range(min(concurrency, n))))
    return Sample.of(latencies, clock() - start, time.process_time() - cpu)


@dataclass(frozen=True)
class Workload:
    """The base data set (sessions x keys of ``value_size`` bytes) and the operations on it."""

    session_count: int
    key_count: int
    value_size: int
    sessions: tuple[str, ...] = field(init=False)
    keys: tuple[str, ...] = field(init=False)
    value: bytes = field(init=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "sessions", tuple(f"s{i:07d}" for i in range(self.session_count)))
        object.__setattr__(self, "keys", tuple(f"k{i}" for i in range(self.key_count)))
        # Not all the same byte, so that nothing compresses it away.
        pattern = bytes(range(256))
        value = (pattern * (self.value_size // 256 + 1))[: self.value_size]
        object.__setattr__(self, "value", value)

    def base_rows(self) -> list[Row]:
        return [(sid, key, self.value) for sid in self.sessions for key in self.keys]

    def prepare(self, op: str, store: Store, prefix: str, n: int) -> tuple[list[Row], Call]:
        """Return the rows to seed before a round of ``n`` calls of ``op``, and the call.

        ``prefix`` is unique to the round; every id or key the round creates starts with
        ``prefix + "-"`` so that the round's leftovers can be removed afterwards.
        """
        sessions, keys, value = self.sessions, self.keys, self.value
        ns, nk = len(sessions), len(keys)
        mapping = dict.fromkeys(keys, value)

        def session(i: int) -> str:
            return sessions[i % ns]

        def key(i: int) -> str:
            return keys[(i // ns) % nk]

        def scratch(i: int) -> str:
            return f"{prefix}-{i}"

        rows: list[Row] = []
        call: Call
        if op == "write_value_new":
            # A new key in an existing session.
            def call(i: int) -> Awaitable[object]:
                return store.write_value(session(i), scratch(i), value)
        elif op == "write_value_existing":

            def call(i: int) -> Awaitable[object]:
                return store.write_value(session(i), key(i), value)
        elif op == "read_value_hit":

            def call(i: int) -> Awaitable[object]:
                return store.read_value(session(i), key(i))
        elif op == "read_value_miss":
            # An existing session, a missing key.
            def call(i: int) -> Awaitable[object]:
                return store.read_value(session(i), "missing")
        elif op == "remove_value":
            # Removes a key seeded for it in an existing session.
            rows = [(session(i), scratch(i), value) for i in range(n)]

            def call(i: int) -> Awaitable[object]:
                return store.remove_value(session(i), scratch(i))
        elif op == "get_session_age":

            def call(i: int) -> Awaitable[object]:
                return store.get_session_age(session(i))
        elif op == "remove_session":
            # Removes a seeded session holding key_count values.
            rows = [(scratch(i), k, value) for i in range(n) for k in keys]

            def call(i: int) -> Awaitable[object]:
                return store.remove_session(scratch(i))
        elif op == "read_values":

            def call(i: int) -> Awaitable[object]:
                return store.read_values(session(i))
        elif op == "write_values":
            # Replaces all key_count values of an existing session.
            def call(i: int) -> Awaitable[object]:
                return store.write_values(session(i), mapping)
        elif op == "remove_values":
            # Removes all key_count values of a seeded session.
            rows = [(scratch(i), k, value) for i in range(n) for k in keys]

            def call(i: int) -> Awaitable[object]:
                return store.remove_values(scratch(i), keys)
        elif op == "read_session":
            # Loads a whole session (times and key_count values), as a web request does.
            def call(i: int) -> Awaitable[object]:
                return store.read_session(session(i))
        elif op == "set_session_expiry":
            # Pushes an idle expiry forward.
            def call(i: int) -> Awaitable[object]:
                return store.set_session_expiry(session(i), EXPIRY_BASE + i)
        elif op == "save_session":
            # Saves a web request's changes: one changed key, one removed key (seeded for it)
            # and the new expiry, in one call.
            rows = [(session(i), scratch(i), value) for i in range(n)]

            def call(i: int) -> Awaitable[object]:
                return store.update_session(
                    session(i), {key(i): value}, remove=[scratch(i)], expires_at=EXPIRY_BASE + i
                )
        else:
            raise ValueError(f"unknown operation {op!r}")
        return rows, call


def median(values: Sequence[float]) -> float:
    return statistics.median(values) if values else math.nan
