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
import contextlib
import importlib.metadata
import importlib.util
import itertools
import os
import statistics
import sys
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from datetime import timedelta
from typing import Any

import httpx
import redis
import starlette
from redis.asyncio import Redis
from sqlalchemy import text
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

from ._db import ensure_database, sqlalchemy_url
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
    "sessions_sql sqlite",
)
#: The peer each target compares sessions_sql with, per kind, and the ratio it must reach.
TARGETS = {
    "no_cookie": ("no sessions", 0.95),
    "read": ("starsessions redis", 1.0),
    "write": ("starsessions redis", 1.0),
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
            await ensure_database(args.pg_url)
            pg_url = sqlalchemy_url(args.pg_url)
            await migrate(pg_url)
            await _empty(pg_url)
            backend = SQLAlchemyBackend.from_url(pg_url, pool_size=args.pool_size, max_overflow=0)
            opened.append(_ours("sessions_sql postgresql", backend, lambda: _empty(pg_url)))
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


async def run_web(
    args: argparse.Namespace, directory: str, log: Callable[[str], None]
) -> dict[str, Any]:
    """Measure every peer on every request kind; return rounds and medians by kind and peer."""
    rounds: dict[str, dict[str, list[Sample]]] = {kind: {} for kind in KINDS}
    async with peers(args, directory) as measured:
        drivers = {peer.name: Driver(peer.app) for peer in measured}
        for peer in measured:
            if peer.name != "no sessions":
                await create_sessions(peer, drivers[peer.name], args.web_sessions)
        log(f"web: {len(measured)} peers, {args.web_sessions} sessions each; warming up")
        for peer in measured:
            for kind in _kinds(peer):
                call = _call(peer, drivers[peer.name], kind)
                await run_round(call, args.web_warmup, args.concurrency)
        order = itertools.cycle([measured, measured[::-1]])
        for kind in KINDS:
            for _ in range(args.repeats):
                for peer in next(order):
                    if kind not in _kinds(peer):
                        continue
                    call = _call(peer, drivers[peer.name], kind)
                    sample = await run_round(call, args.web_requests, args.concurrency)
                    rounds[kind].setdefault(peer.name, []).append(sample)
            summary = ", ".join(
                f"{name} {statistics.median(s.ops_per_s for s in samples):,.0f}/s"
                for name, samples in rounds[kind].items()
            )
            log(f"web {kind:9}: {summary}")
    return {
        "concurrency": args.concurrency,
        "requests_per_round": args.web_requests,
        "sessions": args.web_sessions,
        "transport": "httpx.ASGITransport, in-process",
        "versions": VERSIONS,
        "kinds": {
            kind: {name: _summary(samples) for name, samples in by_peer.items()}
            for kind, by_peer in rounds.items()
        },
    }


def _summary(samples: list[Sample]) -> dict[str, Any]:
    return {
        "requests_per_s": statistics.median(s.ops_per_s for s in samples),
        "p50_ms": statistics.median(s.p50_ms for s in samples),
        "p99_ms": statistics.median(s.p99_ms for s in samples),
        "rounds": [
            {
                "requests": s.ops,
                "seconds": round(s.seconds, 6),
                "requests_per_s": round(s.ops_per_s, 1),
            }
            for s in samples
        ],
    }


def _rate(web: dict[str, Any], kind: str, peer: str) -> float | None:
    entry = web["kinds"][kind].get(peer)
    return None if entry is None else float(entry["requests_per_s"])


def web_targets(web: dict[str, Any] | None) -> dict[str, Any]:
    """The issue's targets: sessions_sql on PostgreSQL >= 1.0x starsessions with Redis on
    read-only and writing requests; on requests without a cookie within 5% of no sessions."""
    report: dict[str, Any] = {}
    for kind, (peer, minimum) in TARGETS.items():
        ours = None if web is None else _rate(web, kind, "sessions_sql postgresql")
        theirs = None if web is None else _rate(web, kind, peer)
        measured = ours is not None and theirs is not None
        ratio = ours / theirs if ours is not None and theirs is not None else None
        report[f"web_{kind}"] = {
            "description": f"{kind} requests: sessions_sql postgresql >= {minimum:g}x {peer}",
            "measured": measured,
            "met": ratio is not None and ratio >= minimum,
            "ratio": None if ratio is None else round(ratio, 3),
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
        f"requests/s (median over rounds of {web['requests_per_round']} requests from "
        f"{web['concurrency']} concurrent tasks, {web['transport']})"
    )
    return "\n".join(out)
