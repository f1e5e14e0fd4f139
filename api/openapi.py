"""The error answers of the ``/v1`` routes, written into the OpenAPI document
in one place (the routes raise them; this keeps the document saying so)."""

from __future__ import annotations

from typing import Any

from fastapi import FastAPI
from fastapi.openapi.utils import get_openapi

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
# Routes that call Temporal.
TEMPORAL = {"503": "Temporal is not reachable: nothing was done; retry after `Retry-After` seconds."}
TEMPORAL_OPERATIONS = {
    "create_broadcast", "get_broadcast", "cancel_broadcast", "connect_channel", "disconnect_channel",
    "update_contact", "send_human_message", "resume_contact", "erase_contact", "erase_workspace",
    "start_run", "signal_run", "get_run",
}
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


def install(app: FastAPI) -> None:
    """Have ``app.openapi()`` document the error answers above."""

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
                if op in TEMPORAL_OPERATIONS:
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
