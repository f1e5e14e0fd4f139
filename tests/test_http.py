"""The worker's HTTP client (core/http.py) on real sockets: what reaches the
server, and what a refused, silent or broken connection becomes."""

from __future__ import annotations

import asyncio
import json
import socket
import traceback

import pytest

from core.http import AiohttpClient
from core.platforms import GraphClient, PlatformError, TelegramClient

TG_TOKEN = "7000000001:AAH-secretTelegramToken_xyz0123456789"
GRAPH_TOKEN = "IGAAKsecretTOKENvalue1234567890"


class RawServer:
    """An HTTP/1.1 server on asyncio streams that records each request and
    answers with ``reply(head, body) -> bytes | None`` (None: say nothing)."""

    def __init__(self, reply) -> None:
        self.reply = reply
        self.requests: list[tuple[str, dict[str, str], bytes]] = []
        self.connections = 0
        self.close_after_reply = False

    async def __aenter__(self) -> RawServer:
        self.server = await asyncio.start_server(self._serve, "127.0.0.1", 0)
        self.port = self.server.sockets[0].getsockname()[1]
        return self

    async def __aexit__(self, *exc) -> None:
        self.server.close()

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.connections += 1
        try:
            while True:
                head = await reader.readuntil(b"\r\n\r\n")
                lines = head.decode().split("\r\n")
                headers = {
                    k.lower(): v.strip() for k, v in (line.split(":", 1) for line in lines[1:] if line)
                }
                body = await reader.readexactly(int(headers.get("content-length", 0)))
                self.requests.append((lines[0], headers, body))
                answer = self.reply(lines[0], body)
                if answer is None:
                    await asyncio.sleep(3600)
                writer.write(answer)
                await writer.drain()
                if self.close_after_reply:
                    break
        except (asyncio.IncompleteReadError, ConnectionError):
            pass
        finally:
            writer.close()


def response(status: int, payload: object, headers: dict[str, str] | None = None) -> bytes:
    body = json.dumps(payload).encode()
    extra = "".join(f"{k}: {v}\r\n" for k, v in (headers or {}).items())
    return (
        f"HTTP/1.1 {status} X\r\nContent-Type: application/json\r\nContent-Length: {len(body)}\r\n{extra}\r\n"
    ).encode() + body


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


async def telegram_send_error(base_url: str, timeout: float = 5) -> PlatformError:
    """The PlatformError of one sendMessage through the worker's client."""
    http = AiohttpClient(timeout)
    try:
        with pytest.raises(PlatformError) as info:
            await TelegramClient(http, base_url).send_message(TG_TOKEN, {"chat_id": 1, "text": "x"})
    finally:
        await http.aclose()
    return info.value


def assert_no_secret(err: BaseException, secret: str) -> None:
    text = "".join(traceback.format_exception(err))
    assert secret not in text and secret not in repr(err)
    assert err.__cause__ is None and err.__context__ is None


async def test_graph_send_reaches_the_server_as_sent_and_reuses_the_connection() -> None:
    async with RawServer(
        lambda line, body: response(200, {"recipient_id": "42", "message_id": "m_1"})
    ) as srv:
        http = AiohttpClient(5)
        try:
            graph = GraphClient(http, f"http://127.0.0.1:{srv.port}", "v21.0")
            for _ in range(3):
                assert (
                    await graph.send_message(
                        "1784", GRAPH_TOKEN, {"recipient": {"id": "42"}, "message": {"text": "héllo"}}
                    )
                    == "m_1"
                )
            profile_reply = response(200, {"name": "Jane Doe"})
            srv.reply = lambda line, body: profile_reply
            assert await graph.get_profile("42", GRAPH_TOKEN) == {"name": "Jane Doe"}
        finally:
            await http.aclose()
    line, headers, body = srv.requests[0]
    assert line == "POST /v21.0/1784/messages HTTP/1.1"
    assert headers["authorization"] == f"Bearer {GRAPH_TOKEN}"
    assert headers["content-type"] == "application/json"
    assert json.loads(body) == {"recipient": {"id": "42"}, "message": {"text": "héllo"}}
    assert srv.requests[-1][0] == "GET /v21.0/42?fields=name,first_name,last_name,username HTTP/1.1"
    assert srv.connections == 1  # keep-alive: four calls, one connection


async def test_telegram_token_path_and_retry_after_from_a_real_response() -> None:
    throttled = response(
        429, {"ok": False, "error_code": 429, "description": "Too Many Requests"}, {"Retry-After": "7"}
    )
    async with RawServer(lambda line, body: throttled) as srv:
        error = await telegram_send_error(f"http://127.0.0.1:{srv.port}")
    assert srv.requests[0][0] == f"POST /bot{TG_TOKEN}/sendMessage HTTP/1.1"
    assert error.kind == "throttled" and error.retry_after == 7
    assert_no_secret(error, TG_TOKEN)


async def test_refused_connection_is_unavailable_without_the_url() -> None:
    error = await telegram_send_error(f"http://127.0.0.1:{free_port()}")
    assert error.kind == "unavailable" and error.retryable
    assert "network error" in str(error)
    assert_no_secret(error, TG_TOKEN)


async def test_a_silent_server_times_out() -> None:
    async with RawServer(lambda line, body: None) as srv:
        error = await telegram_send_error(f"http://127.0.0.1:{srv.port}", timeout=0.3)
    assert error.kind == "unavailable" and "timed out" in str(error)
    assert_no_secret(error, TG_TOKEN)


async def test_a_connection_closed_mid_response_is_unavailable() -> None:
    partial = b'HTTP/1.1 200 OK\r\nContent-Length: 100\r\n\r\n{"message_id"'
    async with RawServer(lambda line, body: partial) as srv:
        srv.close_after_reply = True
        http = AiohttpClient(5)
        try:
            with pytest.raises(PlatformError) as info:
                await GraphClient(http, f"http://127.0.0.1:{srv.port}", "v21.0").send_message(
                    "1784", GRAPH_TOKEN, {"message": {"text": "x"}}
                )
        finally:
            await http.aclose()
    assert info.value.kind == "unavailable" and "network error" in str(info.value)
    assert_no_secret(info.value, GRAPH_TOKEN)
