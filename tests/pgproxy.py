"""A TCP proxy in front of PostgreSQL that counts client round trips.

Every round trip of the PostgreSQL protocol ends with the client sending Sync ("S", extended
protocol) or Query ("Q", simple protocol) and waiting for ReadyForQuery, so counting those
messages counts round trips, whatever the driver or SQLAlchemy do above them.
"""

from __future__ import annotations

import asyncio
import contextlib
import struct
from collections.abc import AsyncIterator

from sqlalchemy.engine import URL, make_url


class RoundTripCounter:
    """Listens on 127.0.0.1 (a free port) and forwards to ``host:port``."""

    def __init__(self, host: str, port: int) -> None:
        self.host, self.port = host, port
        self.round_trips = 0
        self._server: asyncio.Server | None = None

    async def start(self) -> int:
        self._server = await asyncio.start_server(self._serve, "127.0.0.1", 0)
        return int(self._server.sockets[0].getsockname()[1])

    async def close(self) -> None:
        if self._server is not None:
            self._server.close()
            await self._server.wait_closed()

    async def _serve(self, client_r: asyncio.StreamReader, client_w: asyncio.StreamWriter) -> None:
        server_r, server_w = await asyncio.open_connection(self.host, self.port)
        directions = [
            asyncio.ensure_future(self._client_to_server(client_r, server_w)),
            asyncio.ensure_future(self._pipe(server_r, client_w)),
        ]
        # When either side closes, close the other (a driver waits for the server to hang up).
        await asyncio.wait(directions, return_when=asyncio.FIRST_COMPLETED)
        for task in directions:
            task.cancel()
        client_w.close()
        server_w.close()

    async def _client_to_server(
        self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter
    ) -> None:
        # The startup message has no type byte: a length, then the body.
        (length,) = struct.unpack("!i", await reader.readexactly(4))
        writer.write(struct.pack("!i", length) + await reader.readexactly(length - 4))
        while True:
            header = await reader.readexactly(5)
            kind, length = header[:1], struct.unpack("!i", header[1:])[0]
            body = await reader.readexactly(length - 4)
            if kind in (b"S", b"Q"):
                self.round_trips += 1
            writer.write(header + body)
            await writer.drain()

    @staticmethod
    async def _pipe(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        while data := await reader.read(65536):
            writer.write(data)
            await writer.drain()


@contextlib.asynccontextmanager
async def counting_round_trips(url: str | URL) -> AsyncIterator[tuple[RoundTripCounter, URL]]:
    """A RoundTripCounter in front of the server of ``url``, and ``url`` through it."""
    url = make_url(url)
    proxy = RoundTripCounter(url.host or "127.0.0.1", url.port or 5432)
    port = await proxy.start()
    try:
        no_tls = (
            {"sslmode": "disable"} if url.get_driver_name() == "psycopg" else {"ssl": "disable"}
        )
        yield proxy, url.set(host="127.0.0.1", port=port, query=no_tls)
    finally:
        await proxy.close()
