"""The error answers of every route, written into the OpenAPI document in
one place (the routes raise them; this keeps the document saying so): the
``/v1`` routes' by kind of route, the webhooks', codec's and privacy pages'
each. A 422's ``detail`` is always the validation error array
(``api/problems.py``)."""

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
# The routes outside /v1 (platforms, the Temporal UI, people following a
# status link), each with what it answers.
_WEBHOOK_BODY = {
    "413": "Body larger than the webhook limit (`VECTORY_MAX_WEBHOOK_BODY_BYTES`).",
    "503": "Neither Temporal nor the durable inbox could take the events: nothing was kept; the platform retries.",
}
_META_CALLBACK = {
    "400": "`signed_request` missing, forged, expired or malformed, or the body is not a form (not ASCII, say).",
    "413": "Body larger than the callback limit.",
    "415": "Not `application/x-www-form-urlencoded`.",
    "503": "Temporal is not reachable: nothing was started; Meta calls again.",
}
_CODEC = {
    "400": "A payload that is not base64, or encrypted with a key this server does not know.",
    "401": "Missing or invalid codec token.",
    "404": "The codec server is disabled (no `VECTORY_CODEC_TOKEN`).",
    "410": "The payload's workspace was erased: its key is destroyed.",
}
OPERATIONS = {
    "meta_webhook_verify": {"403": "Not a subscription handshake, or the verify token is wrong."},
    "meta_webhook_receive": {
        "400": "The body is not JSON (not UTF-8, say) or not shaped like a Meta webhook.",
        "401": "`X-Hub-Signature-256` missing or not the app secret's signature of the body.",
        **_WEBHOOK_BODY,
    },
    "telegram_webhook_receive": {
        "400": "The body is not JSON (not UTF-8, say) or not a Telegram update.",
        "403": "`X-Telegram-Bot-Api-Secret-Token` missing or wrong.",
        "404": "No Telegram channel with this id.",
        **_WEBHOOK_BODY,
    },
    "meta_deauthorize_callback": _META_CALLBACK,
    "meta_data_deletion_callback": _META_CALLBACK,
    "codec_decode": _CODEC,
    "codec_encode": _CODEC,
    "deletion_status": {"404": "Unknown code."},
}
VALIDATION_422 = {
    "description": COMMON["422"],
    "content": {"application/json": {"schema": {"$ref": "#/components/schemas/HTTPValidationError"}}},
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
            for method, operation in operations.items():
                op = operation.get("operationId", "")
                responses = operation.setdefault("responses", {})
                if not path.startswith("/v1/"):
                    for code, description in OPERATIONS.get(op, {}).items():
                        responses[code] = _error(description)
                    if "422" in responses:
                        responses["422"] = VALIDATION_422
                    continue
                codes = dict(COMMON)
                if "{" in path:
                    codes |= BY_ID
                if op in calls_temporal:
                    codes |= TEMPORAL
                if method in WRITES and op != "create_workspace":
                    codes |= CONFLICTS
                codes |= EXTRA.get(op, {})
                for code, description in codes.items():
                    responses.setdefault(code, _error(description))
                responses["422"] = VALIDATION_422
        app.openapi_schema = schema
        return schema

    app.openapi = openapi  # type: ignore[method-assign]
