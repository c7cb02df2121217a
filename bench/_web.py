"""``--parts web``: requests per second of one minimal Starlette application under each
session layer, side by side in one run.

Peers: no sessions; Starlette's cookie ``SessionMiddleware``; starsessions with its
``RedisStore`` (Redis on 127.0.0.1:6379); sessions_sql's middleware on PostgreSQL and on
SQLite. Request kinds: no cookie, read-only with a session, and one key changed.

The application runs in this process and is driven through ``httpx.ASGITransport`` with no
client cookie jar: no HTTP parsing or sockets between client and application, which would cost
every peer the same and only pull the ratios towards 1. What differs between peers (the
middleware, its store client, the store's round trips) is what is timed. The database servers
run on the machine's other core.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import importlib.metadata
import importlib.util
import itertools
import logging
import os
import statistics
import sys
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from datetime import timedelta
from typing import Any, TypeVar

import asyncpg  # type: ignore[import-untyped]
import httpx
import redis
import starlette
from redis.asyncio import Redis
from sqlalchemy import text
from sqlalchemy.engine import make_url
from sqlalchemy.ext.asyncio import create_async_engine
from starlette.applications import Starlette
from starlette.middleware import Middleware
from starlette.middleware.sessions import SessionMiddleware as CookieSessionMiddleware
from starlette.requests import Request
from starlette.responses import PlainTextResponse, Response
from starlette.routing import Route
from starsessions import SessionAutoloadMiddleware
from starsessions import SessionMiddleware as StarSessionsMiddleware
from starsessions.stores.redis import RedisStore

from sessions_sql import SQLAlchemyBackend, migrate
from sessions_sql.asgi import SessionMiddleware

from ._db import asyncpg_dsn, ensure_database, sqlalchemy_url
from ._workload import Sample, run_round

__all__ = ["KINDS", "PEERS", "format_web", "run_web", "web_targets"]

# httpx's ASGITransport tries `import sniffio` on every request; where sniffio is not installed
# each failed import searches sys.path, which costs as much as a session layer's work. Make
# that import fail at once (the transport then uses asyncio, as it would anyway).
if importlib.util.find_spec("sniffio") is None:
    sys.modules["sniffio"] = None  # type: ignore[assignment]

KINDS = ("no_cookie", "read", "write")
PEERS = (
    "no sessions",
    "starlette cookie",
    "starsessions redis",
    "sessions_sql postgresql",
    "sessions_sql pg async-commit",
    "sessions_sql sqlite",
)
_T = TypeVar("_T")

#: The peer each target compares sessions_sql with, per kind, the ratio it must reach, and
#: the rate compared. Requests without a cookie touch no database: this process is their
#: only worker, so requests per CPU second of it is their throughput on a core of their own,
#: which other work on a shared machine does not move as it moves wall-clock rates. The other
#: kinds wait for their stores, so only wall-clock rates measure them.
TARGETS = {
    "no_cookie": ("no sessions", 0.95, "requests_per_cpu_s"),
    "read": ("starsessions redis", 1.0, "requests_per_s"),
    "write": ("starsessions redis", 1.0, "requests_per_s"),
}
REDIS_URL_ENV = "SESSIONS_SQL_BENCH_REDIS_URL"
DEFAULT_REDIS_URL = "redis://127.0.0.1:6379/0"
REDIS_PREFIX = "sessions_sql_bench."
IDLE = timedelta(minutes=30)
COOKIE = "session"
#: Versions of the peers measured, for the JSON.
VERSIONS: dict[str, Any] = {
    "starlette": starlette.__version__,
    "starsessions": importlib.metadata.version("starsessions"),
    "redis_py": redis.__version__,
    "httpx": httpx.__version__,
}

#: What a logged-in user's session holds: an id, a name, roles, a CSRF token and a cart.
SEED = {
    "user_id": 421337,
    "name": "Ada Lovelace",
    "roles": ["reader", "editor"],
    "csrf": "Jm3h2x8Q4kPz7uV0sN1cR5yT9wB6eL2dF4gH8jK0aQ",
    "cart": [{"sku": "A-100", "qty": 1}, {"sku": "B-200", "qty": 2}],
}


async def seed(request: Request) -> Response:
    request.session.update(SEED)
    return PlainTextResponse("seeded")


async def read(request: Request) -> Response:
    return PlainTextResponse(f"user {request.session.get('user_id')}")


async def write(request: Request) -> Response:
    request.session["visits"] = request.session.get("visits", 0) + 1
    return PlainTextResponse(f"visits {request.session['visits']}")


async def read_without_sessions(request: Request) -> Response:
    return PlainTextResponse("user None")


ROUTES = [
    Route("/seed", seed, methods=["POST"]),
    Route("/read", read),
    Route("/write", write, methods=["POST"]),
]


#: Attempts of one step (a repeat, the seeding) before a failure is final.
ATTEMPTS = 5


async def _wait_for_postgresql(args: argparse.Namespace) -> None:
    """Wait until the server accepts connections again (another user may restart it)."""
    for _ in range(600):
        try:
            conn = await asyncpg.connect(asyncpg_dsn(args.pg_url))
        except (OSError, asyncpg.PostgresError, asyncpg.InterfaceError):
            await asyncio.sleep(1)
            continue
        await conn.close()
        return


@dataclass
class Peer:
    """One session layer: its application and how to tear down what it opened."""

    name: str
    app: Starlette
    close: Callable[[], Awaitable[Any]]
    cookies: list[str] = field(default_factory=list)


async def _nothing() -> None:
    return None


def _app(*middleware: Middleware) -> Starlette:
    return Starlette(routes=ROUTES, middleware=list(middleware))


@contextlib.asynccontextmanager
async def peers(args: argparse.Namespace, directory: str) -> AsyncIterator[list[Peer]]:
    """Every peer that this run measures (sessions_sql only on the databases of --db)."""
    opened: list[Peer] = []
    try:
        plain = Starlette(routes=[Route("/read", read_without_sessions)])
        opened.append(Peer("no sessions", plain, _nothing))
        cookie = Middleware(
            CookieSessionMiddleware,
            secret_key="benchmark-secret",
            max_age=int(IDLE.total_seconds()),
            https_only=True,
        )
        opened.append(Peer("starlette cookie", _app(cookie), _nothing))

        redis = Redis.from_url(os.environ.get(REDIS_URL_ENV, DEFAULT_REDIS_URL))
        info = await redis.info("server")
        VERSIONS["redis_server"] = info["redis_version"]
        await _clear_redis(redis)

        async def close_redis() -> None:
            await _clear_redis(redis)
            await redis.aclose()

        star = Middleware(
            StarSessionsMiddleware,
            store=RedisStore(connection=redis, prefix=REDIS_PREFIX),
            lifetime=IDLE,
            rolling=True,  # the expiry follows the last request, as an idle timeout does
        )
        opened.append(
            Peer(
                "starsessions redis", _app(star, Middleware(SessionAutoloadMiddleware)), close_redis
            )
        )

        if "postgresql" in args.db:
            pg_url = sqlalchemy_url(args.pg_url)

            async def prepare_database() -> None:
                await ensure_database(args.pg_url)
                await migrate(pg_url)
                await _empty(pg_url)

            await _until_it_works(args, prepare_database)
            backend = SQLAlchemyBackend.from_url(pg_url, pool_size=args.pool_size, max_overflow=0)
            opened.append(
                _ours(
                    "sessions_sql postgresql",
                    backend,
                    lambda: _until_it_works(args, lambda: _empty(pg_url)),
                )
            )
            # The same database, with commits that do not wait for the WAL flush: the cost of
            # durability, which the Redis peer (no persistence) does not pay.
            relaxed = SQLAlchemyBackend.from_url(
                pg_url,
                pool_size=args.pool_size,
                max_overflow=0,
                connect_args={"server_settings": {"synchronous_commit": "off"}},
            )
            opened.append(_ours(PEERS[4], relaxed, _nothing))
        if "sqlite" in args.db:
            sqlite_url = f"sqlite+aiosqlite:///{os.path.join(directory, 'web.sqlite3')}"
            await migrate(sqlite_url)
            backend = SQLAlchemyBackend.from_url(
                sqlite_url, pool_size=args.pool_size, max_overflow=0
            )
            opened.append(_ours("sessions_sql sqlite", backend, _nothing))  # a temporary file
        yield opened
    finally:
        for peer in opened:
            await peer.close()


def _ours(name: str, backend: SQLAlchemyBackend, cleanup: Callable[[], Awaitable[None]]) -> Peer:
    middleware = Middleware(
        SessionMiddleware, backend=backend, idle_timeout=IDLE, absolute_timeout=timedelta(hours=8)
    )

    async def close() -> None:
        await backend.close()
        await cleanup()

    return Peer(name, _app(middleware), close)


async def _empty(url: str) -> None:
    """Empty the benchmark database's session tables (on a connection of its own)."""
    engine = create_async_engine(url)
    try:
        async with engine.begin() as conn:
            VERSIONS["postgresql"] = (await conn.execute(text("SHOW server_version"))).scalar()
            await conn.execute(text("TRUNCATE sessions, session_values"))
    finally:
        await engine.dispose()


async def _clear_redis(redis: Redis) -> None:
    keys = [key async for key in redis.scan_iter(match=REDIS_PREFIX + "*", count=1000)]
    if keys:
        await redis.delete(*keys)


class Driver:
    """Sends requests to one application through httpx's ASGI transport, cookie by hand."""

    def __init__(self, app: Starlette) -> None:
        self.transport = httpx.ASGITransport(app=app)

    async def request(self, method: str, path: str, cookie: str | None) -> httpx.Response:
        headers = {} if cookie is None else {"cookie": f"{COOKIE}={cookie}"}
        request = httpx.Request(method, f"https://bench{path}", headers=headers)
        response = await self.transport.handle_async_request(request)
        await response.aread()
        if response.status_code != 200:
            raise AssertionError(f"{path}: HTTP {response.status_code}")
        return response


async def create_sessions(peer: Peer, driver: Driver, count: int) -> None:
    """Log ``count`` users in (untimed) and keep their cookies."""
    for _ in range(count):
        response = await driver.request("POST", "/seed", None)
        for header in response.headers.get_list("set-cookie"):
            name, _, rest = header.partition("=")
            if name == COOKIE:
                peer.cookies.append(rest.split(";", 1)[0])
                break
        else:
            raise AssertionError(f"{peer.name}: /seed set no session cookie")


def _call(peer: Peer, driver: Driver, kind: str) -> Callable[[int], Awaitable[object]]:
    cookies = peer.cookies
    if kind == "no_cookie":
        return lambda i: driver.request("GET", "/read", None)
    if kind == "read":
        return lambda i: driver.request("GET", "/read", cookies[i % len(cookies)])
    return lambda i: driver.request("POST", "/write", cookies[i % len(cookies)])


def _kinds(peer: Peer) -> tuple[str, ...]:
    return ("no_cookie",) if peer.name == "no sessions" else KINDS


async def _sample_other_postgresql_work(args: argparse.Namespace, counts: list[int]) -> None:
    """Every second, count the server's active client backends serving other databases: on
    a shared machine, other work on the same PostgreSQL server competes with the PostgreSQL
    peers (and not with Redis)."""
    database = make_url(args.pg_url).database
    while True:
        try:
            conn = await asyncpg.connect(asyncpg_dsn(args.pg_url))
            try:
                while True:
                    counts.append(
                        await conn.fetchval(
                            "SELECT count(*) FROM pg_stat_activity WHERE state = 'active' "
                            "AND backend_type = 'client backend' AND datname IS DISTINCT FROM $1",
                            database,
                        )
                    )
                    await asyncio.sleep(1)
            finally:
                conn.terminate()
        except Exception:  # the server restarting, say: this is only a diagnostic
            await asyncio.sleep(1)


async def _until_it_works(args: argparse.Namespace, step: Callable[[], Awaitable[_T]]) -> _T:
    """Run an untimed step, again after the server is back if it failed."""
    for attempt in range(1, ATTEMPTS + 1):
        try:
            return await step()
        except Exception:
            if attempt == ATTEMPTS:
                raise
            await _wait_for_postgresql(args)
    raise AssertionError("unreachable")


async def run_web(
    args: argparse.Namespace, directory: str, log: Callable[[str], None]
) -> dict[str, Any]:
    """Measure every peer on every request kind; return rounds and medians by kind and peer."""
    rounds: dict[str, dict[str, list[Sample]]] = {kind: {} for kind in KINDS}
    incidents: list[dict[str, str]] = []
    load_before = os.getloadavg()
    other_work: list[int] = []
    sampler = None
    if "postgresql" in args.db:
        sampler = asyncio.create_task(_sample_other_postgresql_work(args, other_work))
    # A failed repeat is recorded in the incidents; its requests' log records are not needed.
    logging.getLogger("sessions_sql.asgi").setLevel(logging.CRITICAL)

    async def retrying(what: str, step: Callable[[], Awaitable[_T]]) -> _T:
        # Like _until_it_works, and the failure is recorded.
        for attempt in range(1, ATTEMPTS + 1):
            try:
                return await step()
            except Exception as error:
                if attempt == ATTEMPTS:
                    raise
                incidents.append({"step": what, "error": repr(error)[:300]})
                log(f"web: {what} failed ({error!r:.200}); waiting for the databases, again")
                await _wait_for_postgresql(args)
        raise AssertionError("unreachable")

    async with peers(args, directory) as measured:
        drivers = {peer.name: Driver(peer.app) for peer in measured}

        async def prepare() -> None:
            for peer in measured:
                peer.cookies.clear()
                if peer.name != "no sessions":
                    await create_sessions(peer, drivers[peer.name], args.web_sessions)
            for peer in measured:
                for kind in _kinds(peer):
                    call = _call(peer, drivers[peer.name], kind)
                    await run_round(call, args.web_warmup, args.concurrency)

        log(f"web: {len(measured)} peers, {args.web_sessions} sessions each; warming up")
        await retrying("seeding and warm-up", prepare)
        order = itertools.cycle([measured, measured[::-1]])
        for kind in KINDS:
            for _ in range(args.web_repeats):
                in_order = [peer for peer in next(order) if kind in _kinds(peer)]

                async def repeat(kind: str = kind, in_order: list[Peer] = in_order) -> list[Sample]:
                    # Every peer's round, back to back; a failed repeat is run again whole.
                    done = []
                    for peer in in_order:
                        call = _call(peer, drivers[peer.name], kind)
                        done.append(await run_round(call, args.web_requests, args.concurrency))
                    return done

                samples = await retrying(f"a {kind} repeat", repeat)
                for peer, sample in zip(in_order, samples, strict=True):
                    rounds[kind].setdefault(peer.name, []).append(sample)
            summary = ", ".join(
                f"{name} {statistics.median(r.ops_per_s for r in done):,.0f}/s"
                for name, done in rounds[kind].items()
            )
            log(f"web {kind:9}: {summary}")
    if sampler is not None:
        sampler.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await sampler
    return {
        "concurrency": args.concurrency,
        "requests_per_round": args.web_requests,
        "sessions": args.web_sessions,
        "transport": "httpx.ASGITransport, in-process",
        "versions": VERSIONS,
        "incidents": incidents,
        # The machine is shared: its load average (1, 5, 15 min) before and after the part.
        "load_average": {"before": load_before, "after": os.getloadavg()},
        # Active queries of other databases on the PostgreSQL server, sampled every second.
        "postgresql_other_active": {
            "samples": len(other_work),
            "median": statistics.median(other_work) if other_work else None,
            "max": max(other_work, default=None),
        },
        "kinds": {
            kind: {name: _summary(done) for name, done in by_peer.items()}
            for kind, by_peer in rounds.items()
        },
    }


def _summary(done: list[Sample]) -> dict[str, Any]:
    return {
        "requests_per_s": statistics.median(r.ops_per_s for r in done),
        "requests_per_cpu_s": statistics.median(r.ops / r.cpu_seconds for r in done),
        "p50_ms": statistics.median(r.p50_ms for r in done),
        "p99_ms": statistics.median(r.p99_ms for r in done),
        "rounds": [
            {
                "requests": r.ops,
                "seconds": round(r.seconds, 6),
                "cpu_seconds": round(r.cpu_seconds, 6),
                "requests_per_s": round(r.ops_per_s, 1),
                "requests_per_cpu_s": round(r.ops / r.cpu_seconds, 1),
            }
            for r in done
        ],
    }


def _ratios(web: dict[str, Any], kind: str, ours: str, theirs: str, rate: str) -> list[float]:
    """(ours / theirs) of a rate, per repeat: the two rounds of a repeat ran back to back, so
    that a shared machine's slow drifts hit both alike."""
    by_peer = web["kinds"][kind]
    if ours not in by_peer or theirs not in by_peer:
        return []
    pairs = zip(by_peer[ours]["rounds"], by_peer[theirs]["rounds"], strict=True)
    return [float(a[rate]) / float(b[rate]) for a, b in pairs]


def web_targets(web: dict[str, Any] | None) -> dict[str, Any]:
    """The issue's targets: sessions_sql on PostgreSQL >= 1.0x starsessions with Redis on
    read-only and writing requests; on requests without a cookie within 5% of no sessions.
    Each ratio is the median over the repeats of the ratio within a repeat."""
    report: dict[str, Any] = {}
    for kind, (peer, minimum, rate) in TARGETS.items():
        ours = "sessions_sql postgresql"
        ratios = [] if web is None else _ratios(web, kind, ours, peer, rate)
        ratio = statistics.median(ratios) if ratios else None
        unit = "requests per CPU second" if rate == "requests_per_cpu_s" else "requests/s"
        report[f"web_{kind}"] = {
            "description": f"{kind} requests: {ours} >= {minimum:g}x {peer} ({unit})",
            "rate": rate,
            "measured": ratio is not None,
            "met": ratio is not None and ratio >= minimum,
            "ratio": None if ratio is None else round(ratio, 3),
            "ratios": [round(r, 3) for r in ratios],
        }
    return report


def format_web(web: dict[str, Any]) -> str:
    names = [p for p in PEERS if any(p in web["kinds"][k] for k in KINDS)]
    header = ("kind", *names)
    lines = [header]
    for kind in KINDS:
        cells = [kind]
        for name in names:
            entry = web["kinds"][kind].get(name)
            cells.append("-" if entry is None else f"{entry['requests_per_s']:,.0f}")
        lines.append(tuple(cells))
    for kind in KINDS:
        cells = [f"{kind} per CPU s"]
        for name in names:
            entry = web["kinds"][kind].get(name)
            cells.append("-" if entry is None else f"{entry['requests_per_cpu_s']:,.0f}")
        lines.append(tuple(cells))
    for kind in KINDS:
        cells = [f"{kind} p99 ms"]
        for name in names:
            entry = web["kinds"][kind].get(name)
            cells.append("-" if entry is None else f"{entry['p99_ms']:.2f}")
        lines.append(tuple(cells))
    widths = [max(len(line[i]) for line in lines) for i in range(len(header))]
    out = []
    for n, line in enumerate(lines):
        out.append(
            "  ".join(
                c.ljust(widths[i]) if i == 0 else c.rjust(widths[i]) for i, c in enumerate(line)
            )
        )
        if n == 0:
            out.append("  ".join("-" * w for w in widths))
    out.append(
        f"requests/s and requests per CPU second of this process (medians over rounds of "
        f"{web['requests_per_round']} requests from {web['concurrency']} concurrent tasks, "
        f"{web['transport']})"
    )
    return "\n".join(out)
