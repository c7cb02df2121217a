"""The ``sessions-sql`` command: migrate, inspect and clean up a session database.

The database comes from ``--url``, else ``SESSIONS_SQL_URL``, else
``sqlite+aiosqlite:///sessions.db``.
Errors are one line on stderr and a non-zero exit status (2 for usage errors, 1 for others).
Session ids appear only in the output they were asked for, never in error messages.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import logging
import os
import re
import sqlite3
import sys
from collections.abc import Awaitable, Callable
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, NoReturn, TypeVar

from alembic import command
from alembic.util import CommandError
from sqlalchemy import Connection, Select, func, inspect, or_, select
from sqlalchemy.engine import URL, make_url
from sqlalchemy.exc import DBAPIError, SQLAlchemyError
from sqlalchemy.ext.asyncio import AsyncEngine

from ._backend import DEFAULT_BATCH_SIZE, SQLAlchemyBackend, unix_seconds
from ._dialects import dialect_for
from ._migrate import alembic_config
from ._protocol import (
    SessionsSQLError,
    check_cutoff,
    check_key,
    check_now,
    check_session_id,
    created_before_cutoff,
)
from .models import sessions_table, values_table

__all__ = ["main", "parse_age"]

PROG = "sessions-sql"
URL_ENV = "SESSIONS_SQL_URL"
DEFAULT_URL = "sqlite+aiosqlite:///sessions.db"
NOT_MIGRATED = "database is not migrated: run `sessions-sql migrate`"

# A URL naming only the database gets the async driver the package is tested with.
_ASYNC_DRIVERS = {"postgresql": "postgresql+asyncpg", "sqlite": "sqlite+aiosqlite"}
_AGE = re.compile(r"([0-9]+)([smhd])")
_UNIT_SECONDS = {"s": 1, "m": 60, "h": 3600, "d": 86400}
_ESCAPES = {"\\": "\\\\", "\t": "\\t", "\n": "\\n", "\r": "\\r"}

S = sessions_table
V = values_table
_Query = TypeVar("_Query", bound=Select[Any])


class CLIError(Exception):
    """A failure reported as one line on stderr with exit ``status``."""

    def __init__(self, message: str, status: int = 1) -> None:
        super().__init__(message)
        self.status = status


class _Parser(argparse.ArgumentParser):
    """An ArgumentParser whose usage errors become one-line :class:`CLIError`."""

    def error(self, message: str) -> NoReturn:
        raise CLIError(f"{message} (see `{self.prog} --help`)", 2)


# Argument types.


def parse_age(text: str) -> int:
    """Return the seconds of an age such as ``30s``, ``15m``, ``12h`` or ``7d`` (``0s``: every
    session is at least that old)."""
    match = _AGE.fullmatch(text)
    if match is None:
        raise argparse.ArgumentTypeError(
            f"invalid age {text!r}: use a whole number with s, m, h or d (e.g. 7d, or 0s for all)"
        )
    return int(match[1]) * _UNIT_SECONDS[match[2]]


def _positive_int(text: str) -> int:
    if not (text.isascii() and text.isdigit()) or int(text) == 0:
        raise argparse.ArgumentTypeError(f"expected a positive whole number, got {text!r}")
    return int(text)


def _name(check: Callable[[object], str]) -> Callable[[str], str]:
    # The argument is a secret (a session id) or may be: the message never repeats it.
    def convert(text: str) -> str:
        try:
            return check(text)
        except (TypeError, ValueError) as error:
            raise argparse.ArgumentTypeError(str(error)) from None

    return convert


def _schema_name(text: str) -> str:
    if not text:
        raise argparse.ArgumentTypeError("schema must not be empty")
    return text


# Output helpers.


def _text(name: str) -> str:
    """A name on one line of text output: backslash and unprintable characters escaped."""
    if name.isprintable() and "\\" not in name:
        return name
    return "".join(
        _ESCAPES.get(char) or (char if char.isprintable() else repr(char)[1:-1]) for char in name
    )


def _iso(seconds: int) -> str:
    return datetime.fromtimestamp(seconds, timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")


def _json(data: object) -> str:
    return json.dumps(data, ensure_ascii=True)


# Database access.


def _database_url(args: argparse.Namespace) -> URL:
    """The database URL from ``--url``, ``SESSIONS_SQL_URL`` or the default, checked."""
    raw = args.url or os.environ.get(URL_ENV) or DEFAULT_URL
    try:
        url = make_url(raw)
        url = url.set(drivername=_ASYNC_DRIVERS.get(url.drivername, url.drivername))
        is_async = url.get_dialect().get_async_dialect_cls(url).is_async
    except (SQLAlchemyError, ValueError, TypeError):
        # The URL may hold a password: never repeat it.
        raise CLIError("invalid database URL", 2) from None
    if not is_async:
        raise CLIError(
            "the database URL must name an async driver "
            "(postgresql+asyncpg://, postgresql+psycopg:// or sqlite+aiosqlite://)",
            2,
        )
    if args.schema is not None and url.get_backend_name() != "postgresql":
        raise CLIError("--schema is supported on PostgreSQL only", 2)
    return url


def _sqlite_file(url: URL) -> Path | None:
    """The file of a SQLite URL; ``None`` for other databases, memory and ``file:`` URIs."""
    database = url.database
    if url.get_backend_name() != "sqlite" or not database or database == ":memory:":
        return None
    return None if database.startswith("file:") else Path(database)


def _check_sqlite_file(path: Path) -> None:
    """Open (or create) the file once with the sqlite3 module.

    When aiosqlite (0.22) cannot open a database its worker thread prints a traceback after
    the event loop closes; failing here first keeps the error to one line.
    """
    try:
        sqlite3.connect(path).close()
    except sqlite3.Error as error:
        raise CLIError(f"cannot open the database ({type(error).__name__}: {error})") from None


def _missing_tables(conn: Connection, schema: str | None) -> bool:
    inspector = inspect(conn)
    return not all(inspector.has_table(t.name, schema=schema) for t in (S, V))


def _reason(error: BaseException) -> str:
    """The first line of the database's own message (only for errors without statement data)."""
    orig = error.orig if isinstance(error, DBAPIError) and error.orig is not None else error
    message = str(orig).strip().splitlines()
    return f"{type(orig).__name__}: {message[0]}" if message else type(orig).__name__


async def _check_ready(backend: SQLAlchemyBackend) -> None:
    """Fail with one clear line if the database is unreachable or not migrated."""
    try:
        async with backend.engine.connect() as conn:
            missing = await conn.run_sync(_missing_tables, backend.schema)
    except (SQLAlchemyError, OSError) as error:
        raise CLIError(f"cannot connect to the database ({_reason(error)})") from None
    if missing:
        raise CLIError(NOT_MIGRATED)


def _reader(backend: SQLAlchemyBackend) -> AsyncEngine:
    """The backend's engine for read-only Core queries, with its schema applied."""
    if backend.schema is None:
        return backend.engine
    return backend.engine.execution_options(schema_translate_map={None: backend.schema})


async def _database_now(backend: SQLAlchemyBackend) -> int:
    """The database clock (the one that stamped the creation times), in Unix seconds."""
    async with _reader(backend).connect() as conn:
        now: datetime = (await conn.execute(select(func.current_timestamp()))).scalar_one()
    return unix_seconds(now)


async def _cutoff(backend: SQLAlchemyBackend, age: int) -> datetime | int:
    """The cutoff selecting the sessions at least ``age`` seconds old, as the collector
    computes it (an age of zero selects every session)."""
    return created_before_cutoff(await _database_now(backend), age)


def _created_before(query: _Query, backend: SQLAlchemyBackend, cutoff: datetime | int) -> _Query:
    """``query`` limited to sessions created before ``cutoff``, compared as the backend's own
    SQL compares it."""
    sql = dialect_for(backend.engine.dialect.name)
    limited: _Query = query.where(sql.created_before)
    return limited.params(cutoff=sql.time_param(check_cutoff(cutoff)))


# Subcommands.


def _migrate(args: argparse.Namespace) -> None:
    """Run an Alembic command of the packaged migrations (synchronously: env.py owns the loop)."""
    url = _database_url(args)
    if args.action in ("current", "history") and args.sql:
        raise CLIError(f"--sql applies to upgrade and downgrade, not {args.action}", 2)
    if args.action == "current" and args.rev is not None:
        raise CLIError("migrate current takes no revision", 2)
    if args.action == "downgrade" and args.rev is None:
        raise CLIError("migrate downgrade needs a revision (e.g. base)", 2)
    if args.citus and (args.action != "upgrade" or args.sql):
        raise CLIError("--citus applies to an upgrade run on the database (not --sql)", 2)
    if args.citus and url.get_backend_name() != "postgresql":
        raise CLIError("--citus needs a Citus coordinator (a postgresql:// URL)", 2)
    path = _sqlite_file(url)
    if path is not None and not args.sql and args.action != "history":
        _check_sqlite_file(path)
    config = alembic_config(
        url=url.render_as_string(hide_password=False), schema=args.schema, citus=args.citus
    )
    config.stdout = sys.stdout
    # Alembic's progress lines ("Running upgrade ...") go to stderr, as with the alembic command.
    log = logging.getLogger("alembic")
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter("%(message)s"))
    level = log.level
    log.addHandler(handler)
    log.setLevel(logging.INFO)
    try:
        if args.action == "upgrade":
            command.upgrade(config, args.rev or "head", sql=args.sql)
        elif args.action == "downgrade":
            # Offline SQL has no database to read the current revision from: assume head.
            offline_range = args.sql and ":" not in args.rev
            command.downgrade(
                config, f"head:{args.rev}" if offline_range else args.rev, sql=args.sql
            )
        elif args.action == "current":
            command.current(config)
        else:
            command.history(config, rev_range=args.rev)
    except (SQLAlchemyError, OSError) as error:  # DDL and version rows only: no session data
        raise CLIError(f"migration failed ({_reason(error)})") from None
    finally:
        log.removeHandler(handler)
        log.setLevel(level)


async def _list(backend: SQLAlchemyBackend, args: argparse.Namespace) -> None:
    """Print session ids with their creation times (and, in JSON, expiries), oldest first."""
    query = select(S.c.id, S.c.created_at, S.c.expires_at).order_by(S.c.created_at, S.c.id)
    if args.older_than is not None:
        query = _created_before(query, backend, await _cutoff(backend, args.older_than))
    if args.limit is not None:
        query = query.limit(args.limit)
    separator = "[\n  " if args.json else ""
    async with _reader(backend).connect() as conn:
        async for session_id, created_at, expires_at in await conn.stream(query):
            seconds = unix_seconds(created_at)
            if args.json:
                item = {"id": session_id, "created_at": _iso(seconds)}
                item["expires_at"] = None if expires_at is None else _iso(unix_seconds(expires_at))
                sys.stdout.write(f"{separator}{_json(item)}")
                separator = ",\n  "
            else:
                print(f"{_text(session_id)}\t{_iso(seconds)}\t{seconds}")
    if args.json:
        print("[]" if separator.startswith("[") else "\n]")


async def _show(backend: SQLAlchemyBackend, args: argparse.Namespace) -> None:
    """Print a session's creation time, expiry and the size of each value."""
    session = await backend.read_session(args.id)
    if session is None:
        raise CLIError("session not found")
    sizes = {key: len(value) for key, value in sorted(session.values.items())}
    created, expires = session.created_at, session.expires_at
    if args.json:
        item: dict[str, Any] = {"id": args.id, "created_at": _iso(created)}
        item["expires_at"] = None if expires is None else _iso(expires)
        item["value_sizes"] = sizes
        print(_json(item))
        return
    print(f"created_at\t{_iso(created)}\t{created}")
    print("expires_at\t-" if expires is None else f"expires_at\t{_iso(expires)}\t{expires}")
    for key, size in sizes.items():
        print(f"{_text(key)}\t{size}")


async def _get(backend: SQLAlchemyBackend, args: argparse.Namespace) -> None:
    """Write one raw value to stdout."""
    value = await backend.read_value(args.id, args.key)
    if value is None:
        raise CLIError("no such session or key")
    sys.stdout.buffer.write(value)
    sys.stdout.buffer.flush()


async def _set(backend: SQLAlchemyBackend, args: argparse.Namespace) -> None:
    """Store stdin, as bytes, under a key (creating the session if needed)."""
    await backend.write_value(args.id, args.key, sys.stdin.buffer.read())


async def _rm(backend: SQLAlchemyBackend, args: argparse.Namespace) -> None:
    """Remove one value, or a whole session; a missing one is not an error."""
    if args.key is None:
        await backend.remove_session(args.id)
    else:
        await backend.remove_value(args.id, args.key)


async def _gc(backend: SQLAlchemyBackend, args: argparse.Namespace) -> None:
    """Remove (or with --dry-run count) the sessions at least --older-than old and, with
    --expired, those whose expiry has passed ("now" is the database clock for both)."""
    now = await _database_now(backend)
    cutoff = None if args.older_than is None else created_before_cutoff(now, args.older_than)
    if args.dry_run:
        sql = dialect_for(backend.engine.dialect.name)
        conditions, params = [], {}
        if cutoff is not None:
            conditions.append(sql.created_before)
            params["cutoff"] = sql.time_param(check_cutoff(cutoff))
        if args.expired:
            conditions.append(sql.expired)
            params["now"] = sql.time_param(check_now(now))
        query = select(func.count()).select_from(S).where(or_(*conditions)).params(**params)
        async with _reader(backend).connect() as conn:
            count = (await conn.execute(query)).scalar_one()
        print(f"would remove {count} sessions")
        return
    reported = removed = 0

    def progress(done: int) -> None:
        nonlocal reported
        if removed + done != reported:
            reported = removed + done
            print(f"removed {reported} sessions...", file=sys.stderr, flush=True)

    if cutoff is not None:
        removed += await backend.remove_sessions_created_before(
            cutoff, batch_size=args.batch_size, progress=progress
        )
    if args.expired:
        removed += await backend.remove_expired_sessions(
            now, batch_size=args.batch_size, progress=progress
        )
    print(f"removed {removed} sessions")


async def _stats(backend: SQLAlchemyBackend, args: argparse.Namespace) -> None:
    """Print counts, creation time range and total value size (one consistent query)."""
    query = select(
        select(func.count()).select_from(S).scalar_subquery(),
        select(func.count()).select_from(V).scalar_subquery(),
        select(func.sum(func.length(V.c.value))).scalar_subquery(),
        select(func.min(S.c.created_at)).scalar_subquery(),
        select(func.max(S.c.created_at)).scalar_subquery(),
    )
    async with _reader(backend).connect() as conn:
        sessions, values, value_bytes, oldest, newest = (await conn.execute(query)).one()
    stats: dict[str, Any] = {
        "sessions": sessions,
        "values": values,
        "value_bytes": int(value_bytes or 0),
        "oldest_created_at": None if oldest is None else _iso(unix_seconds(oldest)),
        "newest_created_at": None if newest is None else _iso(unix_seconds(newest)),
    }
    if args.json:
        print(_json(stats))
        return
    for name, value in stats.items():
        print(f"{name}\t{'-' if value is None else value}")


async def _with_backend(
    args: argparse.Namespace,
    run: Callable[[SQLAlchemyBackend, argparse.Namespace], Awaitable[None]],
) -> None:
    url = _database_url(args)
    path = _sqlite_file(url)
    if path is not None:
        if not path.exists():  # connecting would create an empty file
            raise CLIError(NOT_MIGRATED)
        _check_sqlite_file(path)
    backend = SQLAlchemyBackend.from_url(url, schema=args.schema)
    try:
        await _check_ready(backend)
        await run(backend, args)
    finally:
        await backend.close()


# The parser.


def build_parser() -> argparse.ArgumentParser:
    """The argument parser of ``sessions-sql``."""
    url_help = f"database URL (default: ${URL_ENV}, else {DEFAULT_URL})"
    schema_help = "PostgreSQL schema holding the tables (default: the search path)"
    # Accepted after the subcommand too; SUPPRESS keeps a value given before it.
    common = _Parser(add_help=False)
    common.add_argument("--url", default=argparse.SUPPRESS, help=url_help)
    common.add_argument("--schema", type=_schema_name, default=argparse.SUPPRESS, help=schema_help)

    parser = _Parser(
        prog=PROG,
        description="Migrate, inspect and clean up a sessions_sql database.",
        epilog="Ages are a whole number with a unit: 30s, 15m, 12h, 7d (0s: every session).",
    )
    parser.add_argument("--url", help=url_help)
    parser.add_argument("--schema", type=_schema_name, help=schema_help)
    commands = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    session_id = _name(check_session_id)
    key = _name(check_key)

    def add(name: str, summary: str, run: Any) -> argparse.ArgumentParser:
        sub = commands.add_parser(name, help=summary, description=summary, parents=[common])
        sub.set_defaults(run=run)
        return sub

    sub = add("migrate", "Create or upgrade the tables (Alembic), or show their revision.", None)
    sub.add_argument(
        "action",
        nargs="?",
        default="upgrade",
        choices=["upgrade", "downgrade", "current", "history"],
        help="default: upgrade",
    )
    sub.add_argument(
        "rev",
        nargs="?",
        metavar="REV",
        help="target revision (upgrade: default head; downgrade: required, e.g. base, and "
        "with --sql counted from head); for history a range such as base:head",
    )
    sub.add_argument(
        "--sql", action="store_true", help="print the SQL for a DBA instead of running it"
    )
    sub.add_argument(
        "--citus",
        action="store_true",
        help="after the upgrade, distribute the tables on this Citus coordinator by session id",
    )

    sub = add("list", "List session ids with creation times (UTC ISO 8601, Unix seconds).", _list)
    sub.add_argument("--older-than", type=parse_age, metavar="AGE", help="at least this old")
    sub.add_argument("--limit", type=_positive_int, metavar="N", help="at most N sessions")
    sub.add_argument(
        "--json", action="store_true", help='a JSON array of {"id", "created_at", "expires_at"}'
    )

    sub = add("show", "Show a session's creation time, expiry and the size of each value.", _show)
    sub.add_argument("id", type=session_id, metavar="ID")
    sub.add_argument("--json", action="store_true", help="print a JSON object")

    sub = add("get", "Write a value's raw bytes to stdout.", _get)
    sub.add_argument("id", type=session_id, metavar="ID")
    sub.add_argument("key", type=key, metavar="KEY")

    sub = add("set", "Store stdin (bytes) as a value, creating the session if needed.", _set)
    sub.add_argument("id", type=session_id, metavar="ID")
    sub.add_argument("key", type=key, metavar="KEY")

    sub = add("rm", "Remove a value, or the whole session when no KEY is given.", _rm)
    sub.add_argument("id", type=session_id, metavar="ID")
    sub.add_argument("key", type=key, metavar="KEY", nargs="?")

    sub = add("gc", "Remove the sessions at least --older-than old, and/or --expired ones.", _gc)
    sub.add_argument("--older-than", type=parse_age, metavar="AGE", help="e.g. 7d")
    sub.add_argument("--expired", action="store_true", help="sessions whose expiry has passed")
    sub.add_argument("--dry-run", action="store_true", help="only count them")
    sub.add_argument(
        "--batch-size",
        type=_positive_int,
        metavar="N",
        default=DEFAULT_BATCH_SIZE,
        help=f"sessions removed per transaction (default: {DEFAULT_BATCH_SIZE})",
    )

    sub = add("stats", "Count sessions, values and value bytes; oldest and newest.", _stats)
    sub.add_argument("--json", action="store_true", help="print a JSON object")
    return parser


def _error(message: str) -> None:
    print(f"{PROG}: error: {' '.join(message.split())}", file=sys.stderr)


def main(argv: list[str] | None = None) -> int:
    """Run ``sessions-sql`` with ``argv`` (default: the process arguments); return the status."""
    try:
        args = build_parser().parse_args(argv)
        if args.run is _gc and args.older_than is None and not args.expired:
            raise CLIError("gc needs --older-than AGE, --expired, or both (see `--help`)", 2)
        if args.run is None:
            _migrate(args)
        else:
            asyncio.run(_with_backend(args, args.run))
    except SystemExit as exit_:  # --help
        return exit_.code if isinstance(exit_.code, int) else 0
    except CLIError as error:
        _error(str(error))
        return error.status
    except SessionsSQLError as error:  # messages name no id, key or value
        _error(str(error))
        return 1
    except (ValueError, TypeError) as error:  # argument validation
        _error(str(error))
        return 2
    except DBAPIError as error:  # may carry statement parameters: name the error only
        sqlstate = getattr(error.orig, "sqlstate", None)
        suffix = f" (SQLSTATE {sqlstate})" if sqlstate else ""
        _error(f"the database raised {type(error.orig).__name__}{suffix}")
        return 1
    except SQLAlchemyError as error:
        _error(f"database error ({type(error).__name__})")
        return 1
    except CommandError as error:  # Alembic: unknown revision and the like
        _error(str(error))
        return 1
    except BrokenPipeError:  # the reader went away (`sessions-sql list | head`)
        with contextlib.suppress(OSError, ValueError):  # no error at exit when flushing
            os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 1
    except ImportError as error:
        _error(f"database driver not installed ({error})")
        return 1
    except OSError as error:
        _error(f"{type(error).__name__}: {error}")
        return 1
    except KeyboardInterrupt:
        _error("interrupted")
        return 130
    except Exception as error:  # a bug: still one line, and no data from the message
        _error(f"unexpected {type(error).__name__}")
        return 1
    return 0
