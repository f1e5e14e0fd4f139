"""The error answers of the ``/v1`` routes, written into the OpenAPI document
in one place (the routes raise them; this keeps the document saying so)."""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

from fastapi import APIRouter, FastAPI
from fastapi.dependencies.models import Dependant
from fastapi.openapi.utils import get_openapi
from fastapi.routing import APIRoute

from api.deps import get_temporal

ERROR_SCHEMA = {
    "type": "object",
    "properties": {"detail": {"anyOf": [{"type": "string"}, {"type": "array", "items": {"type": "object"}}]}},
    "required": ["detail"],
}

# Every /v1 route.
COMMON = {
    "401": "Missing or invalid API key (`POST /v1/workspaces`: the admin token).",
    "413": "Request body over 1 MiB.",
    "422": "Invalid input: the request's `detail` names each problem and where it is.",
}
# A /v1 route whose path names an object.
BY_ID = {"404": "No such object in this workspace (another workspace's ids answer 404 too)."}
# Routes that call Temporal (those that depend on ``api.deps.get_temporal``).
TEMPORAL = {"503": "Temporal is not reachable: nothing was done; retry after `Retry-After` seconds."}
# Every write (POST, PUT, PATCH): while the workspace is being erased, and
# where the object's state forbids it (a disconnected channel, a contact
# handed over to a human...).
CONFLICTS = {"409": "Not possible in the present state (the message says why), or the workspace is being erased."}
WRITES = {"post", "put", "patch"}
EXTRA = {
    "send_human_message": {"502": "The platform refused the message; the message says why."},
}


def _error(description: str) -> dict[str, Any]:
    return {"description": description, "content": {"application/json": {"schema": ERROR_SCHEMA}}}


def _calls_temporal(dependant: Dependant) -> bool:
    return any(d.call is get_temporal or _calls_temporal(d) for d in dependant.dependencies)


def temporal_operations(routers: Iterable[APIRouter]) -> set[str]:
    """Operation ids of the routes that take a Temporal client."""
    return {
        route.operation_id
        for router in routers
        for route in router.routes
        if isinstance(route, APIRoute) and route.operation_id and _calls_temporal(route.dependant)
    }


def install(app: FastAPI, routers: Iterable[APIRouter]) -> None:
    """Have ``app.openapi()`` document the error answers above for the
    routes of ``routers`` (the ones ``app`` includes)."""
    calls_temporal = temporal_operations(routers)

    def openapi() -> dict[str, Any]:
        if app.openapi_schema:
            return app.openapi_schema
        schema = get_openapi(title=app.title, version=app.version, description=app.description, routes=app.routes)
        for path, operations in schema.get("paths", {}).items():
            if not path.startswith("/v1/"):
                continue
            for method, operation in operations.items():
                codes = dict(COMMON)
                if "{" in path:
                    codes |= BY_ID
                op = operation.get("operationId", "")
                if op in calls_temporal:
                    codes |= TEMPORAL
                if method in WRITES and op != "create_workspace":
                    codes |= CONFLICTS
                codes |= EXTRA.get(op, {})
                responses = operation.setdefault("responses", {})
                for code, description in codes.items():
                    responses.setdefault(code, _error(description))
        app.openapi_schema = schema
        return schema

    app.openapi = openapi  # type: ignore[method-assign]
