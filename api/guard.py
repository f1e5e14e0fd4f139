"""What no ``/v1`` route should see, refused before routing (ASGI middleware).

- A body over ``MAX_BODY_BYTES``: 413. A route builds workflow inputs from
  its body, and Temporal refuses payloads over 2 MB (a 500 after the route
  had stored its row, before this guard).
- A NUL character in the path, the query or any string of a JSON body:
  422. PostgreSQL text cannot hold one: the write failed after the platform
  had the message, and every retry sent it again. A lone UTF-16 surrogate
  (``"\\ud800"``) cannot be stored either: 422.
- ``NaN`` / ``Infinity`` (not JSON, though Python's parser takes them) and
  JSON nested deeper than ``MAX_DEPTH``: 422. Either one stored made the
  contact unreadable, or made the validation error itself fail to render.

Malformed JSON is left to the route, whose 422 names the position. The
webhooks keep their own limits (``/webhooks``: a platform's body is never
refused for its content), and ``/codec`` takes the Temporal UI's payloads.
"""

from __future__ import annotations

import json
from typing import Any

from core.inbound import SURROGATE_RE
from core.limits import MAX_BODY_BYTES

MAX_DEPTH = 32
PREFIX = "/v1"


class _NotJson(ValueError):
    pass


def _no_constant(name: str) -> Any:
    raise _NotJson(f"{name} is not a JSON value")


def body_problem(body: bytes) -> tuple[list[str | int], str] | None:
    """(location, message) of the first thing the guard refuses in a JSON
    body, or None (also for a body that is not JSON at all)."""
    try:
        data = json.loads(body, parse_constant=_no_constant)
    except _NotJson as err:
        return [], str(err)
    except RecursionError:
        return [], f"JSON nested deeper than {MAX_DEPTH} levels"
    except ValueError:
        return None
    stack: list[tuple[Any, list[str | int]]] = [(data, [])]
    while stack:
        value, path = stack.pop()
        if len(path) > MAX_DEPTH:
            return path[:MAX_DEPTH], f"JSON nested deeper than {MAX_DEPTH} levels"
        if isinstance(value, str):
            if "\x00" in value:
                return path, "NUL characters (\\u0000) are not allowed"
            if SURROGATE_RE.search(value):
                return path, "a lone UTF-16 surrogate (\\ud800-\\udfff) is not a character"
        elif isinstance(value, dict):
            for key, item in value.items():
                if "\x00" in key:
                    return path, "NUL characters (\\u0000) are not allowed in keys"
                stack.append((item, [*path, key]))
        elif isinstance(value, list):
            stack.extend((item, [*path, i]) for i, item in enumerate(value))
    return None


class ApiGuard:
    def __init__(self, app) -> None:
        self.app = app

    async def __call__(self, scope, receive, send) -> None:
        path = scope.get("path", "")
        if scope["type"] != "http" or not (path == PREFIX or path.startswith(PREFIX + "/")):
            await self.app(scope, receive, send)
            return
        query = scope.get("query_string", b"")
        if "\x00" in path or b"%00" in query or b"\x00" in query:
            await _refuse(send, 422, [_error(["path" if "\x00" in path else "query"], "NUL characters are not allowed")])
            return
        declared = dict(scope.get("headers") or []).get(b"content-length")
        if declared is not None and declared.isdigit() and int(declared) > MAX_BODY_BYTES:
            await _refuse(send, 413, f"request body over {MAX_BODY_BYTES} bytes")
            return
        messages, size = [], 0
        while True:
            message = await receive()
            messages.append(message)
            if message["type"] != "http.request":
                break
            size += len(message.get("body", b""))
            if size > MAX_BODY_BYTES:
                await _refuse(send, 413, f"request body over {MAX_BODY_BYTES} bytes")
                return
            if not message.get("more_body", False):
                break
        body = b"".join(m.get("body", b"") for m in messages if m["type"] == "http.request")
        problem = body_problem(body) if body else None
        if problem is not None:
            await _refuse(send, 422, [_error(["body", *problem[0]], problem[1])])
            return

        async def replay():
            if messages:
                return messages.pop(0)
            return await receive()

        await self.app(scope, replay, send)


def _error(loc: list[str | int], msg: str) -> dict[str, Any]:
    return {"type": "value_error", "loc": loc, "msg": msg}


async def _refuse(send, status: int, detail: Any) -> None:
    body = json.dumps({"detail": detail}).encode()
    await send({
        "type": "http.response.start",
        "status": status,
        "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())],
    })
    await send({"type": "http.response.body", "body": body})
