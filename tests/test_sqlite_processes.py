"""Several processes on one SQLite file, as a web app run with several workers
(``uvicorn --workers 4``, gunicorn) uses it.

Each worker process starts the way an application does (``migrate`` then
``SQLAlchemyBackend.from_url``) at the same instant on the same new file, then writes and reads
for a few seconds while the others write. No call may fail (connect-time pragmas and the
migration included: every statement waits for SQLite's lock within the busy timeout), and
every write a worker saw acknowledged is in the file afterwards.
"""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from sessions_sql import SQLAlchemyBackend, migrate

from .conftest import guard, now

WORKERS = 4
BUDGET = 3.0  # seconds of writing per worker
ROOT = Path(__file__).resolve().parents[1]
WORKER = (
    "import sys; from tests.test_sqlite_processes import worker_main; worker_main(sys.argv[1:])"
)


def worker_main(argv: list[str]) -> None:
    """A worker process: waits for the start instant the parent gives on stdin, then runs."""
    url, tag = argv
    print("READY", flush=True)
    start = int(sys.stdin.readline())
    asyncio.run(_worker(url, tag, start))


async def _worker(url: str, tag: str, start: int) -> None:
    await asyncio.sleep(max(0, start - now()) / 1e9)
    await migrate(url)
    acknowledged: dict[str, dict[str, str | None]] = {}
    async with SQLAlchemyBackend.from_url(url) as backend:
        deadline = time.monotonic() + BUDGET
        i = 0
        while time.monotonic() < deadline:
            i += 1
            own, shared = f"{tag}-{i % 16}", "shared"
            value = f"{tag}:{i}"
            # Keys of this worker only: its acknowledged writes are what the file must hold.
            await backend.write_value(own, "n", value.encode())
            acknowledged.setdefault(own, {})["n"] = value
            await backend.write_values(shared, {f"{tag}-a": value.encode(), f"{tag}-b": b"b"})
            acknowledged.setdefault(shared, {}).update({f"{tag}-a": value, f"{tag}-b": "b"})
            if i % 5 == 0:
                await backend.remove_value(shared, f"{tag}-b")
                acknowledged[shared][f"{tag}-b"] = None
            if i % 7 == 0:
                await backend.remove_values(own, ["n"])
                acknowledged[own]["n"] = None
            read = await backend.read_value(own, "n")
            expected = acknowledged[own]["n"]
            if read != (None if expected is None else expected.encode()):
                raise AssertionError("a worker did not read back its own acknowledged write")
            await backend.read_values(shared)
            await backend.get_session_age(own)
        sessions = await backend.get_sessions()
    print("RESULT " + json.dumps({"writes": i, "acknowledged": acknowledged, "seen": sessions}))


async def _spawn(url: str, tag: str, stderr: Path) -> asyncio.subprocess.Process:
    env = dict(
        os.environ, PYTHONPATH=os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])
    )
    with stderr.open("wb") as err:
        return await asyncio.create_subprocess_exec(
            sys.executable,
            "-c",
            WORKER,
            url,
            tag,
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=err,
            cwd=ROOT,
            env=env,
            limit=2**24,
        )


async def test_worker_processes_on_one_new_file(tmp_path: Path) -> None:
    url = f"sqlite+aiosqlite:///{tmp_path / 'shared.db'}"
    tags = [f"w{n}" for n in range(WORKERS)]
    stderrs = {tag: tmp_path / f"{tag}.stderr" for tag in tags}
    workers = {tag: await _spawn(url, tag, stderrs[tag]) for tag in tags}
    results: dict[str, dict[str, Any]] = {}
    try:
        for worker in workers.values():
            assert worker.stdout is not None
            line = await guard(worker.stdout.readline(), "a worker's start-up")
            assert line == b"READY\n", line
        start = now() + 200_000_000  # 0.2 s from now, the same instant for every worker
        for worker in workers.values():
            assert worker.stdin is not None
            worker.stdin.write(f"{start}\n".encode())
            await worker.stdin.drain()
        for tag, worker in workers.items():
            stdout, _ = await guard(worker.communicate(), "a worker")
            errors = stderrs[tag].read_text()
            assert worker.returncode == 0, f"worker {tag} failed:\n{errors}"
            assert errors == "", f"worker {tag} wrote to stderr:\n{errors}"
            (line,) = stdout.decode().splitlines()
            assert line.startswith("RESULT ")
            results[tag] = json.loads(line.removeprefix("RESULT "))
    finally:
        for worker in workers.values():
            if worker.returncode is None:
                worker.kill()
                await worker.wait()

    async with SQLAlchemyBackend.from_url(url) as backend:
        stored = {sid: await backend.read_values(sid) for sid in await backend.get_sessions()}
    for tag, result in results.items():
        assert result["writes"] > 10, f"worker {tag} hardly wrote"
        for sid, keys in result["acknowledged"].items():
            assert sid in stored, f"a session worker {tag} wrote is missing"
            for key, value in keys.items():
                assert stored[sid].get(key) == (None if value is None else value.encode()), (
                    f"worker {tag}'s last acknowledged write of {key!r} is not in the file"
                )
    # Every worker saw the others' sessions: they shared one database.
    assert all({"shared", *(f"{t}-1" for t in tags)} <= set(r["seen"]) for r in results.values())
