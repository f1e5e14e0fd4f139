"""Error answers in the shapes the OpenAPI document promises.

- A 422 always has ``detail`` as the array FastAPI's validation errors use
  (``loc``, ``msg``, ``type``), also when a route finds the problem itself
  (``unprocessable``): a client reads every 422 the same way.
- A 405's ``Allow`` lists every method the path answers. Starlette lists
  only those of the first route whose path matched, so ``PUT /webhooks/meta``
  said ``GET`` though ``POST`` is served there too.
"""

from __future__ import annotations

from collections.abc import Sequence

from fastapi import FastAPI, HTTPException, Request, status
from fastapi.exception_handlers import http_exception_handler
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.routing import Match
from starlette.types import Scope

__all__ = ["allowed_methods", "install", "unprocessable"]


def unprocessable(loc: Sequence[str | int], msg: str) -> HTTPException:
    """A 422 naming where the problem is (``("body", "channel_id")``)."""
    return HTTPException(
        status.HTTP_422_UNPROCESSABLE_CONTENT, [{"type": "value_error", "loc": list(loc), "msg": msg}]
    )


METHODS = ("GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS")


def allowed_methods(app: FastAPI, scope: Scope) -> list[str]:
    """Every method some route serves at the request's path: asked of the
    routes themselves (``matches``), as routing would for that method."""
    return [
        method
        for method in METHODS
        if any(route.matches({**scope, "method": method})[0] == Match.FULL for route in app.router.routes)
    ]


def install(app: FastAPI) -> None:
    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, exc: StarletteHTTPException):
        if exc.status_code == status.HTTP_405_METHOD_NOT_ALLOWED:
            headers = {**(exc.headers or {}), "Allow": ", ".join(allowed_methods(request.app, request.scope))}
            exc = StarletteHTTPException(exc.status_code, exc.detail, headers=headers)
        return await http_exception_handler(request, exc)
