"""FastAPI app factory; the API process is ``uvicorn --factory workers.apiserver:create_app``."""

from __future__ import annotations

import asyncio
import logging
from contextlib import asynccontextmanager

from fastapi import FastAPI, Request
from fastapi.encoders import jsonable_encoder
from fastapi.exceptions import RequestValidationError
from fastapi.middleware.cors import CORSMiddleware
from fastapi.responses import JSONResponse
from temporalio.client import Client
from temporalio.service import RPCError, RPCStatusCode

from api import openapi, problems
from api.guard import ApiGuard
from api.inbox import InboxState, InboxWriter, run_relay
from api.ingress import Ingress, WorkerFactory, api_identity
from api.routes import (
    automations,
    broadcasts,
    channels,
    codec,
    contacts,
    export,
    ops,
    privacy,
    privacy_callbacks,
    runs,
    webhooks,
    workspaces,
)
from api.webhook_path import WebhookPath
from core.codec import KeyStore, data_converter
from core.crypto import TokenVault
from core.db import DatabaseNotMigrated, engine_for
from core.limits import json_size
from core.observability import configure_logging, freeze_startup_heap
from core.settings import Settings, get_settings
from core.temporal import connect

log = logging.getLogger("vectory.api")

# Temporal's answers that mean "not now" rather than "wrong request".
TEMPORAL_UNREACHABLE = (RPCStatusCode.UNAVAILABLE, RPCStatusCode.DEADLINE_EXCEEDED, RPCStatusCode.RESOURCE_EXHAUSTED)
RETRY_AFTER_SECONDS = 5
# Request fields whose value a 422 never echoes back (FastAPI's errors carry
# the input they refused: a token would end up in the client's and proxies' logs).
SECRET_FIELDS = frozenset({"access_token", "token", "api_key", "secret", "app_secret", "password"})
# Characters of a refused input a 422 shows.
MAX_ECHO = 200


def _redacted(value):
    if isinstance(value, bytes):  # a body that is not JSON, maybe not UTF-8 either
        return value.decode("utf-8", "replace")
    if isinstance(value, dict):
        return {k: "[redacted]" if str(k).lower() in SECRET_FIELDS else _redacted(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_redacted(v) for v in value]
    return value


def without_secrets(errors) -> list:
    """Validation errors with the secrets among their inputs redacted, and
    no input echoed whole once it is long (a refused 10,000-step flow came
    back in a 480 KB answer): a string cut to MAX_ECHO characters, another
    value whose JSON is longer left out."""
    out = []
    for error in errors:
        error = dict(error)
        if "input" in error:
            leaf = error.get("loc", ())[-1:] or ("",)
            secret = str(leaf[0]).lower() in SECRET_FIELDS
            value = "[redacted]" if secret else _redacted(error["input"])
            if isinstance(value, str):
                error["input"] = value if len(value) <= MAX_ECHO else value[:MAX_ECHO] + "…"
            elif json_size(jsonable_encoder(value)) <= MAX_ECHO:
                error["input"] = value
            else:
                del error["input"]
        out.append(error)
    return out


DESCRIPTION = """
Vectory automates direct messages on Instagram, Facebook Messenger and Telegram.
Every automation run is a durable Temporal workflow.

Authenticate with `Authorization: Bearer <workspace API key>`; only
`POST /v1/workspaces` takes the admin token. Objects of another workspace
answer 404. A call that needs Temporal while it is unreachable answers 503
with `Retry-After` and keeps nothing half done; ask again.
"""


def create_app(
    settings: Settings | None = None, temporal: Client | None = None, worker_factory: WorkerFactory | None = None
) -> FastAPI:
    """The API. With a ``worker_factory`` it also runs a worker of its own
    that starts new conversations eagerly (api/ingress.py); without one,
    every event goes by signal-with-start to the worker processes."""
    settings = settings or get_settings()

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        if settings.environment != "test":
            configure_logging("api", settings.log_level)
        tasks = []
        if app.state.temporal is None:
            # Start even when Temporal is down: webhooks then fill the inbox.
            tasks.append(asyncio.create_task(_connect(app)))
        else:
            tasks.append(asyncio.create_task(_run_ingress(app)))
        tasks.append(asyncio.create_task(run_relay(app)))
        freeze_startup_heap()
        yield
        await app.state.ingress.stop()
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)

    async def _run_ingress(app: FastAPI) -> None:
        # The API's worker for the conversations it starts (api/ingress.py).
        if not settings.api_conversation_slots:
            return
        await app.state.ingress.run(app.state.temporal, app.state.engine, app.state.vault, app.state.keys)

    async def _connect(app: FastAPI) -> None:
        while app.state.temporal is None:
            try:
                app.state.temporal = await connect(
                    settings, data_converter(app.state.keys), attempts=1, identity=api_identity()
                )
                log.info("connected to Temporal at %s", settings.temporal_address)
            except RuntimeError as err:
                log.warning("%s; webhooks are kept in the inbox until it answers", err)
                await asyncio.sleep(2)
        await _run_ingress(app)

    app = FastAPI(title="Vectory API", version="0.1.0", description=DESCRIPTION, lifespan=lifespan)
    app.state.settings = settings
    try:
        app.state.engine = engine_for(settings.database_url)
    except DatabaseNotMigrated as exc:
        log.error("refusing to start: %s", exc)
        raise
    app.state.vault = TokenVault(settings.keyring())
    app.state.keys = KeyStore(app.state.engine, app.state.vault)
    app.state.temporal = temporal
    app.state.inbox = InboxState()
    app.state.inbox_writer = InboxWriter(app.state.engine)
    app.state.ingress = Ingress(settings, worker_factory)
    app.state.webhooks = WebhookPath(app.state)
    app.state.inbox_relay = True  # tests pause it
    routers = [
        module.router
        for module in (workspaces, channels, automations, contacts, runs, webhooks, codec, privacy, export,
                       privacy_callbacks, ops, broadcasts)
    ]
    for router in routers:
        app.include_router(router)

    app.add_middleware(ApiGuard)  # /v1 bodies: size, NUL, NaN, depth (api/guard.py)
    if settings.codec_cors_origins:
        # The Temporal UI calls the codec endpoint from the operator's browser.
        app.add_middleware(
            CORSMiddleware,
            allow_origins=[o.strip() for o in settings.codec_cors_origins.split(",") if o.strip()],
            allow_methods=["POST"],
            allow_headers=["Authorization", "Content-Type", "X-Namespace"],
            allow_credentials=True,
        )

    @app.exception_handler(RequestValidationError)
    async def invalid_request(request: Request, exc: RequestValidationError) -> JSONResponse:
        return JSONResponse({"detail": jsonable_encoder(without_secrets(exc.errors()))}, status_code=422)

    @app.exception_handler(RPCError)
    async def temporal_error(request: Request, exc: RPCError) -> JSONResponse:
        # A route that starts, signals or queries a workflow while Temporal
        # is unreachable answers 503 (retry later), not 500. Webhooks never
        # get here: they keep their events in the inbox.
        if exc.status in TEMPORAL_UNREACHABLE:
            log.warning("%s %s: Temporal unreachable (%s)", request.method, request.url.path, exc.status.name)
            return JSONResponse(
                {"detail": "Temporal is not reachable; try again shortly"},
                status_code=503,
                headers={"Retry-After": str(RETRY_AFTER_SECONDS)},
            )
        log.error("%s %s: Temporal refused the call (%s)", request.method, request.url.path, exc.status.name)
        return JSONResponse({"detail": "internal error"}, status_code=500)

    problems.install(app)  # 405s' Allow (api/problems.py)
    openapi.install(app, routers)  # the routes' error answers (api/openapi.py)

    @app.get("/healthz", tags=["health"], operation_id="healthz", summary="Liveness")
    def healthz() -> dict:
        return {"ok": True}

    return app
