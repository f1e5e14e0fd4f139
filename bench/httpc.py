"""A minimal keep-alive HTTP/1.1 client on asyncio streams, for the load generator.

httpx costs about a millisecond of client CPU per request, which on a 2-core
machine would show up in the very latencies we measure. This client writes a
prebuilt request and reads a Content-Length (or chunked) response, nothing
else: enough for uvicorn talking to uvicorn on loopback.
"""

from __future__ import annotations

import asyncio
import json
import time
from typing import Any

IDLE_SECONDS = 3.0  # uvicorn closes idle keep-alive connections after 5 s


class HttpError(Exception):
    pass


class _Conn:
    __slots__ = ("reader", "writer", "used_at")

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader = reader
        self.writer = writer
        self.used_at = time.monotonic()

    def close(self) -> None:
        self.writer.close()


class HttpPool:
    """Connections to one host:port; a request takes an idle one or opens one."""

    def __init__(self, host: str, port: int) -> None:
        self.host = host
        self.port = port
        self._idle: list[_Conn] = []

    async def _connect(self) -> _Conn:
        reader, writer = await asyncio.open_connection(self.host, self.port, limit=1 << 24)
        return _Conn(reader, writer)

    async def warm(self, count: int) -> None:
        conns = [await self._connect() for _ in range(count)]
        self._idle.extend(conns)

    def _take(self) -> _Conn | None:
        now = time.monotonic()
        while self._idle:
            conn = self._idle.pop()
            if now - conn.used_at < IDLE_SECONDS:
                return conn
            conn.close()
        return None

    async def request(
        self, method: str, path: str, body: bytes = b"", headers: dict[str, str] | None = None,
        deadline: float = 60.0,
    ) -> tuple[int, bytes]:
        """One request; ``HttpError`` when no answer came within ``deadline`` seconds."""
        head = [f"{method} {path} HTTP/1.1", f"Host: {self.host}:{self.port}", f"Content-Length: {len(body)}"]
        for key, value in (headers or {}).items():
            head.append(f"{key}: {value}")
        raw = ("\r\n".join(head) + "\r\n\r\n").encode() + body
        conn = self._take()
        reused = conn is not None
        if conn is None:
            conn = await self._connect()
        try:
            return await asyncio.wait_for(self._exchange(conn, raw), deadline)
        except TimeoutError:
            conn.close()
            raise HttpError(f"no answer within {deadline:g} s") from None
        except (ConnectionError, asyncio.IncompleteReadError, HttpError):
            conn.close()
            if not reused:
                raise
        # The server closed an idle connection before reading the request: once more on a new one.
        conn = await self._connect()
        try:
            return await asyncio.wait_for(self._exchange(conn, raw), deadline)
        except TimeoutError:
            conn.close()
            raise HttpError(f"no answer within {deadline:g} s") from None
        except BaseException:
            conn.close()
            raise

    async def _exchange(self, conn: _Conn, raw: bytes) -> tuple[int, bytes]:
        conn.writer.write(raw)
        await conn.writer.drain()
        status_line = await conn.reader.readline()
        if not status_line:
            raise HttpError("connection closed before the response")
        parts = status_line.split(b" ", 2)
        status = int(parts[1])
        length: int | None = None
        chunked = False
        close = False
        while True:
            line = await conn.reader.readline()
            if line in (b"\r\n", b"\n", b""):
                break
            name, _, value = line.partition(b":")
            name = name.strip().lower()
            value = value.strip()
            if name == b"content-length":
                length = int(value)
            elif name == b"transfer-encoding" and b"chunked" in value.lower():
                chunked = True
            elif name == b"connection" and value.lower() == b"close":
                close = True
        if chunked:
            chunks = []
            while True:
                size = int((await conn.reader.readline()).split(b";")[0].strip(), 16)
                if size == 0:
                    await conn.reader.readline()
                    break
                chunks.append(await conn.reader.readexactly(size))
                await conn.reader.readline()
            data = b"".join(chunks)
        elif length is not None:
            data = await conn.reader.readexactly(length)
        else:
            data = await conn.reader.read()
            close = True
        if close:
            conn.close()
        else:
            conn.used_at = time.monotonic()
            self._idle.append(conn)
        return status, data

    async def get_json(self, path: str) -> Any:
        status, data = await self.request("GET", path)
        if status != 200:
            raise HttpError(f"GET {path}: {status} {data[:200]!r}")
        return json.loads(data)

    def close(self) -> None:
        for conn in self._idle:
            conn.close()
        self._idle.clear()
