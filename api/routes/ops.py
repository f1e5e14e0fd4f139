"""Operations: Prometheus metrics and readiness (liveness is /healthz)."""

from __future__ import annotations

import asyncio
import logging
from datetime import timedelta

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse, Response
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from sqlalchemy import text

log = logging.getLogger("vectory.ops")

router = APIRouter(tags=["health"])

READY_TIMEOUT_SECONDS = 2.0


@router.get(
    "/metrics",
    response_class=Response,
    operation_id="metrics",
    summary="Prometheus metrics of the API process",
)
def metrics() -> Response:
    return Response(generate_latest(), media_type=CONTENT_TYPE_LATEST)


def _select_one(engine) -> None:
    with engine.connect() as conn:
        conn.execute(text("SELECT 1"))


async def _check_database(request: Request) -> str:
    try:
        await asyncio.wait_for(asyncio.to_thread(_select_one, request.app.state.engine), READY_TIMEOUT_SECONDS)
    except TimeoutError:
        log.warning("readiness: database did not answer within %.0f s", READY_TIMEOUT_SECONDS)
        return "timeout"
    except Exception as err:
        log.warning("readiness: database check failed: %s", type(err).__name__)
        return "failed"
    return "ok"


async def _check_temporal(request: Request) -> str:
    client = request.app.state.temporal
    if client is None:
        return "not connected"
    try:
        healthy = await asyncio.wait_for(
            client.service_client.check_health(timeout=timedelta(seconds=READY_TIMEOUT_SECONDS)),
            READY_TIMEOUT_SECONDS,
        )
    except TimeoutError:
        log.warning("readiness: Temporal did not answer within %.0f s", READY_TIMEOUT_SECONDS)
        return "timeout"
    except Exception as err:
        log.warning("readiness: Temporal health check failed: %s", err)
        return "failed"
    return "ok" if healthy else "not serving"


@router.get(
    "/readyz",
    operation_id="readyz",
    summary="Readiness: the database and Temporal answer",
    responses={503: {"description": "A dependency is not ready; `checks` names it."}},
)
async def readyz(request: Request) -> JSONResponse:
    database, temporal = await asyncio.gather(_check_database(request), _check_temporal(request))
    checks = {"database": database, "temporal": temporal}
    ok = all(v == "ok" for v in checks.values())
    return JSONResponse({"ok": ok, "checks": checks}, status_code=200 if ok else 503)
