"""The worker's HTTP client for the platform APIs (Graph API, Bot API).

aiohttp underneath, not httpx (the stack's HTTP library, still used by the
CLI, the sandbox, the bench and the tests): measured on our 2-core machines,
a keep-alive POST of a Send API body costs the caller 1.9 ms of CPU with
httpx 0.28 and 0.47 ms with aiohttp 3.14 (0.37 ms on uvloop). The worker
makes one or two such calls per reply and is CPU-bound under load, so that
difference is ~10 % of a reply's worker CPU (``bench/README.md``).

The interface is the small part of a client the platform clients use:
``request`` returns status, headers and the whole body (platform responses
are small JSON documents). A request that gets no HTTP response raises
``HttpFailure``, which keeps only whether it timed out: the URL (a Telegram
URL holds the bot token) and the underlying exception's text never travel.
"""

from __future__ import annotations

import json as jsonlib
import ssl
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Protocol

import aiohttp
import certifi

__all__ = ["AiohttpClient", "HttpClient", "HttpFailure", "HttpResponse"]


@dataclass(frozen=True, slots=True)
class HttpResponse:
    status: int
    headers: Mapping[str, str]  # case-insensitive lookups
    content: bytes

    def json(self) -> Any:
        """The body as JSON; ``ValueError`` when it is not."""
        return jsonlib.loads(self.content)


class HttpFailure(Exception):
    """No HTTP response: a network error or a timeout. Never holds the URL."""

    def __init__(self, timed_out: bool, error_type: str) -> None:
        super().__init__("timed out" if timed_out else f"network error ({error_type})")
        self.timed_out = timed_out
        self.error_type = error_type


class HttpClient(Protocol):
    async def request(
        self,
        method: str,
        url: str,
        *,
        params: Mapping[str, str] | None = None,
        json: Any = None,
        headers: Mapping[str, str] | None = None,
    ) -> HttpResponse: ...

    async def aclose(self) -> None: ...


class AiohttpClient:
    """Keep-alive connection pool, one per worker process.

    The session is created on first use, inside the running event loop.
    ``timeout``: seconds for the whole request (connect, send, read).
    """

    def __init__(self, timeout: float, max_connections: int = 100) -> None:
        self._timeout = aiohttp.ClientTimeout(total=timeout)
        self._max_connections = max_connections
        self._session: aiohttp.ClientSession | None = None

    def _open(self) -> aiohttp.ClientSession:
        connector = aiohttp.TCPConnector(
            limit=self._max_connections,
            ssl=ssl.create_default_context(cafile=certifi.where()),
        )
        self._session = aiohttp.ClientSession(
            connector=connector,
            timeout=self._timeout,
            auto_decompress=True,
            raise_for_status=False,
            trust_env=False,
        )
        return self._session

    async def request(
        self,
        method: str,
        url: str,
        *,
        params: Mapping[str, str] | None = None,
        json: Any = None,
        headers: Mapping[str, str] | None = None,
    ) -> HttpResponse:
        session = self._session or self._open()
        send_headers = dict(headers or {})
        data = None
        if json is not None:
            data = jsonlib.dumps(json, separators=(",", ":")).encode()
            send_headers["Content-Type"] = "application/json"
        failure: HttpFailure | None = None
        try:
            async with session.request(
                method, url, params=params, data=data, headers=send_headers, allow_redirects=False
            ) as response:
                content = await response.read()
                return HttpResponse(response.status, response.headers, content)
        except TimeoutError:
            failure = HttpFailure(True, "TimeoutError")
        except (aiohttp.ClientError, OSError, ValueError) as exc:
            failure = HttpFailure(False, type(exc).__name__)
        raise failure  # outside the except block: no exception context holding the URL

    async def aclose(self) -> None:
        if self._session is not None:
            await self._session.close()
            self._session = None
