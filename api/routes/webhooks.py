"""Platform webhooks: read the request, hand it to the webhook path
(api/webhook_path.py: verify, parse, route, accept) and answer 200. Nothing
here waits for an automation to run.

These routes are the API's hot path (hundreds per second under a burst), so
they take no FastAPI dependencies (each costs dependency resolution per
request) and answer with prepared JSON bytes instead of a validated
response model (``WebhookAck`` still documents the body in OpenAPI)."""

from __future__ import annotations

from fastapi import APIRouter, HTTPException, Query, Request, status
from fastapi.responses import PlainTextResponse, Response
from pydantic import BaseModel

from api.deps import SettingsDep
from api.webhook_path import Routed, WebhookPath, read_limited_body
from core.crypto import constant_time_equals
from core.observability import observe_webhook

router = APIRouter(prefix="/webhooks", tags=["webhooks"])


class WebhookAck(BaseModel):
    received: int
    dispatched: int
    ignored: int


class AckResponse(Response):
    """The 200 answer (a ``WebhookAck`` body), carrying its counts for the
    webhook metrics."""

    media_type = "application/json"

    def __init__(self, routed: Routed) -> None:
        self.received, self.dispatched, self.ignored = routed.received, len(routed.events), routed.ignored
        super().__init__(
            f'{{"received":{self.received},"dispatched":{self.dispatched},"ignored":{self.ignored}}}'.encode()
        )


@router.get(
    "/meta",
    response_class=PlainTextResponse,
    operation_id="meta_webhook_verify",
    summary="Meta webhook verification handshake",
)
def meta_verify(
    settings: SettingsDep,
    mode: str = Query("", alias="hub.mode"),
    verify_token: str = Query("", alias="hub.verify_token"),
    challenge: str = Query("", alias="hub.challenge"),
) -> PlainTextResponse:
    if mode == "subscribe" and constant_time_equals(verify_token, settings.meta_verify_token):
        return PlainTextResponse(challenge)
    raise HTTPException(status.HTTP_403_FORBIDDEN, "verification failed")


@router.post(
    "/meta",
    response_model=WebhookAck,
    operation_id="meta_webhook_receive",
    summary="Receive Instagram and Messenger webhook events",
    description=(
        "Verifies `X-Hub-Signature-256` over the raw body with the app secret (401 when forged), "
        "parses every entry and messaging item, and signals each contact's conversation workflow. "
        "Events for accounts that are not connected are acknowledged and ignored."
    ),
)
@observe_webhook("meta")
async def meta_receive(request: Request) -> Response:
    path: WebhookPath = request.app.state.webhooks
    body = await read_limited_body(request, request.app.state.settings.max_webhook_body_bytes)
    path.verify_meta(body, request.headers.get("x-hub-signature-256", ""))
    routed = await path.route_meta(body)
    await path.accept(routed.events)
    return AckResponse(routed)


@router.post(
    "/telegram/{channel_id}",
    response_model=WebhookAck,
    operation_id="telegram_webhook_receive",
    summary="Receive Telegram bot updates",
    description="Checks `X-Telegram-Bot-Api-Secret-Token` (403 when wrong) and signals the contact's conversation.",
)
@observe_webhook("telegram")
async def telegram_receive(channel_id: str, request: Request) -> Response:
    path: WebhookPath = request.app.state.webhooks
    body = await read_limited_body(request, request.app.state.settings.max_webhook_body_bytes)
    channel = await path.telegram_channel(channel_id, request.headers.get("x-telegram-bot-api-secret-token", ""))
    routed = path.route_telegram(channel, body)
    await path.accept(routed.events)
    return AckResponse(routed)
