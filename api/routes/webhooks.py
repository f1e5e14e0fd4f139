"""Platform webhooks: verify, parse, dedupe (in the conversation), hand to
Temporal, answer 200. Nothing here waits for an automation to run.

These routes are the API's hot path (hundreds per second under a burst), so
they take no FastAPI dependencies (each costs dependency resolution per
request) and answer with prepared JSON bytes instead of a validated
response model (``WebhookAck`` still documents the body in OpenAPI). The
connected channels they route to are cached for ``CHANNEL_CACHE_SECONDS``
(``ChannelCache``)."""

from __future__ import annotations

import asyncio
import json
import logging
import math
import time

from fastapi import APIRouter, HTTPException, Query, Request, status
from fastapi.responses import PlainTextResponse, Response
from pydantic import BaseModel
from sqlmodel import Session, select
from temporalio.service import RPCError

from api.deps import SettingsDep
from api.dispatch import dispatch_events, refusal
from core.crypto import VaultError, constant_time_equals, meta_signature, webhook_secret_context
from core.db import Channel
from core.inbound import MalformedPayload, parse_meta_webhook, parse_telegram_update
from core.observability import observe_webhook

log = logging.getLogger("vectory.webhooks")

router = APIRouter(prefix="/webhooks", tags=["webhooks"])

DISPATCH_TIMEOUT_SECONDS = 2.0
BREAKER_SECONDS = 5.0
# Weight of the newest signal in the moving average of signal latency (the
# average follows a change within ~10 signals).
SIGNAL_LATENCY_WEIGHT = 0.2
# Above this many webhooks a second (a moving average over about a second),
# the API's worker takes no new conversation (api/ingress.py): the API's CPU
# goes to answering webhooks, the worker processes to the conversations.
EAGER_MAX_WEBHOOKS_PER_SECOND = 100.0


CHANNEL_CACHE_SECONDS = 2.0


class WebhookAck(BaseModel):
    received: int
    dispatched: int
    ignored: int


class AckResponse(Response):
    """The 200 answer (a ``WebhookAck`` body), carrying its counts for the
    webhook metrics."""

    media_type = "application/json"

    def __init__(self, received: int, dispatched: int, ignored: int) -> None:
        self.received, self.dispatched, self.ignored = received, dispatched, ignored
        super().__init__(
            f'{{"received":{received},"dispatched":{dispatched},"ignored":{ignored}}}'.encode()
        )


class ChannelCache:
    """Connected channels by id and by (platform, account id), each kept
    CHANNEL_CACHE_SECONDS after it was read from the database.

    Only found channels are kept (an account connected a moment ago is never
    turned away). A channel disconnected or paused within those seconds may
    still be routed to: its conversation reads the channel again before it
    records or runs anything (``record_inbound``) and handles nothing."""

    def __init__(self, ttl: float = CHANNEL_CACHE_SECONDS) -> None:
        self.ttl = ttl
        self._by_account: dict[tuple[str, str], tuple[float, Channel]] = {}
        self._by_id: dict[str, tuple[float, Channel]] = {}

    def accounts(self, platform: str, account_ids: set[str]) -> tuple[dict[str, Channel], set[str]]:
        now = time.monotonic()
        found, missing = {}, set()
        for account_id in account_ids:
            entry = self._by_account.get((platform, account_id))
            if entry is not None and entry[0] > now:
                found[account_id] = entry[1]
            else:
                missing.add(account_id)
        return found, missing

    def by_id(self, channel_id: str) -> Channel | None:
        entry = self._by_id.get(channel_id)
        return entry[1] if entry is not None and entry[0] > time.monotonic() else None

    def put(self, channels: list[Channel]) -> None:
        expires = time.monotonic() + self.ttl
        if len(self._by_id) > 10_000:  # bounded: past 10,000 channels it starts over
            self.clear()
        for channel in channels:
            self._by_id[channel.id] = (expires, channel)
            self._by_account[(channel.platform, channel.external_id)] = (expires, channel)

    def clear(self) -> None:
        self._by_account.clear()
        self._by_id.clear()


async def read_limited_body(request: Request, limit: int) -> bytes:
    declared = request.headers.get("content-length")
    if declared and declared.isdigit() and int(declared) > limit:
        raise HTTPException(status.HTTP_413_CONTENT_TOO_LARGE, f"body larger than {limit} bytes")
    body = bytearray()
    async for chunk in request.stream():
        body.extend(chunk)
        if len(body) > limit:
            raise HTTPException(status.HTTP_413_CONTENT_TOO_LARGE, f"body larger than {limit} bytes")
    return bytes(body)


def _not_json(name: str) -> object:
    raise ValueError(f"{name} is not a JSON value")


def parse_json(body: bytes) -> object:
    try:
        return json.loads(body, parse_constant=_not_json)
    except (ValueError, UnicodeDecodeError) as exc:
        raise HTTPException(status.HTTP_400_BAD_REQUEST, f"malformed JSON: {exc}") from None
    except RecursionError:
        raise HTTPException(status.HTTP_400_BAD_REQUEST, "malformed JSON: nested too deeply") from None


def _active_channels(engine, platform: str, account_ids: set[str]) -> list[Channel]:
    with Session(engine, expire_on_commit=False) as session:
        return list(
            session.exec(
                select(Channel).where(
                    Channel.platform == platform,
                    Channel.status == "active",
                    Channel.external_id.in_(account_ids),  # type: ignore[attr-defined]
                )
            ).all()
        )


def _channel(engine, channel_id: str) -> Channel | None:
    with Session(engine, expire_on_commit=False) as session:
        return session.get(Channel, channel_id)


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


async def _dispatch(request: Request, routed) -> None:
    """Hand events to Temporal directly when it keeps up; otherwise keep them
    in the durable inbox (the relay delivers them, in order per contact) and
    still answer 200 at once. When Temporal has not taken them within
    ``webhook_ack_wait_ms``, they are stored and answered too while the
    signal goes on (``InboxState.hold``: it delivers them, or the relay does
    if it fails).

    The wait is skipped while Temporal's recent signals (a moving average,
    ``state.signal_seconds``) took longer than it.

    A new contact's first message may start their conversation on the
    API's own worker (``api/ingress.py``), only while this is the one
    webhook waiting on Temporal and webhooks arrive at most
    EAGER_MAX_WEBHOOKS_PER_SECOND a second.

    Direct dispatch is skipped while Temporal failed or timed out recently
    (circuit breaker, BREAKER_SECONDS), while the inbox holds events not
    relayed yet (a contact's later event must not overtake an earlier stored
    one), and while ``webhook_max_inflight_dispatches`` webhooks already wait
    on Temporal (overload: the answer must not wait for Temporal's backlog).
    """
    state = request.app.state
    temporal = state.temporal
    inbox = state.inbox
    now = time.monotonic()
    state.webhook_rate = state.webhook_rate * math.exp(state.webhook_rate_at - now) + 1.0
    state.webhook_rate_at = now
    direct = (
        temporal is not None
        and now >= getattr(state, "temporal_down_until", 0.0)
        and not inbox.backlog
        and state.dispatching < state.settings.webhook_max_inflight_dispatches
    )
    signal = None
    if direct:
        state.dispatching += 1
        started = now
        # The API's worker takes a new conversation only while no other
        # webhook waits on Temporal and webhooks come slowly (api/ingress.py):
        # a burst and a high rate go to the worker processes.
        ingress = state.ingress if state.ingress.running else None
        eager = state.dispatching == 1 and state.webhook_rate <= EAGER_MAX_WEBHOOKS_PER_SECOND
        signal = asyncio.ensure_future(
            asyncio.wait_for(
                dispatch_events(temporal, state.settings.task_queue, routed, ingress, eager=eager),
                DISPATCH_TIMEOUT_SECONDS,
            )
        )
        signal.add_done_callback(lambda done: _signal_done(state, done, len(routed), started))
        wait = state.settings.webhook_ack_wait_ms / 1000
        # When Temporal's recent answers took longer than the wait, waiting
        # would only add the wait to the answer: store at once.
        if state.signal_seconds > wait:
            wait = 0
        await asyncio.wait([signal], timeout=wait)
        if signal.done():
            if signal.exception() is None:
                return
            if not isinstance(signal.exception(), (RPCError, TimeoutError)):
                raise signal.exception()
            signal = None  # failed: stored below for the relay
    inbox.storing += 1
    try:
        stored = await state.inbox_writer.store(routed)
    except Exception:
        log.exception("inbox unavailable too: asking the platform to redeliver")
        if signal is not None:
            try:  # the signal is all there is: the answer waits for it
                await signal
                return
            except (RPCError, TimeoutError):
                pass
        raise HTTPException(status.HTTP_503_SERVICE_UNAVAILABLE, "temporarily unavailable; retry") from None
    finally:
        inbox.storing -= 1
    if signal is not None:
        inbox.hold(state.engine, stored, signal)  # delivered by its signal, or by the relay if that fails
    else:
        inbox.stored_one()


def _signal_done(state, signal: asyncio.Future, events: int, started: float) -> None:
    state.dispatching -= 1
    if signal.cancelled():
        return
    # How long Temporal takes to accept a signal now (moving average).
    state.signal_seconds += SIGNAL_LATENCY_WEIGHT * (time.monotonic() - started - state.signal_seconds)
    err = signal.exception()
    reason = refusal(err) if err is not None else None
    if reason is not None:
        # About these events only: other webhooks still go to Temporal directly.
        log.warning("Temporal refused an event (%s): the inbox relay sets it aside", reason)
    elif isinstance(err, (RPCError, TimeoutError)):
        state.temporal_down_until = time.monotonic() + BREAKER_SECONDS
        log.warning("temporal unavailable (%s): keeping %d events in the inbox", type(err).__name__, events)


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
    state = request.app.state
    settings = state.settings
    body = await read_limited_body(request, settings.max_webhook_body_bytes)
    signature = request.headers.get("x-hub-signature-256", "")
    if not signature or not constant_time_equals(signature, meta_signature(settings.meta_app_secret, body)):
        raise HTTPException(status.HTTP_401_UNAUTHORIZED, "invalid X-Hub-Signature-256")
    payload = parse_json(body)
    try:
        parsed = parse_meta_webhook(payload)
    except MalformedPayload as exc:
        raise HTTPException(status.HTTP_400_BAD_REQUEST, f"malformed webhook: {exc}") from None
    platform = "instagram" if parsed.object == "instagram" else "messenger"
    account_ids = {e.account_id for e in parsed.events}
    channels, missing = state.channels.accounts(platform, account_ids)
    if missing:
        # A short session in a thread, closed before dispatch: holding a pooled
        # connection across the Temporal call exhausted the pool under load
        # and blocked the event loop.
        rows = await asyncio.to_thread(_active_channels, state.engine, platform, missing)
        state.channels.put(rows)
        channels.update({c.external_id: c for c in rows})
    routed = []
    ignored = len(parsed.ignored)
    for event in parsed.events:
        channel = channels.get(event.account_id)
        if channel is None:
            ignored += 1
            log.info("ignored %s event: account not connected", platform)
            continue
        routed.append((channel, event))
    for event_id, reason in parsed.ignored:
        log.info("ignored event %s: %s", event_id, reason)
    if routed:
        await _dispatch(request, routed)
    return AckResponse(received=len(parsed.events) + len(parsed.ignored), dispatched=len(routed), ignored=ignored)


@router.post(
    "/telegram/{channel_id}",
    response_model=WebhookAck,
    operation_id="telegram_webhook_receive",
    summary="Receive Telegram bot updates",
    description="Checks `X-Telegram-Bot-Api-Secret-Token` (403 when wrong) and signals the contact's conversation.",
)
@observe_webhook("telegram")
async def telegram_receive(channel_id: str, request: Request) -> Response:
    state = request.app.state
    settings, vault = state.settings, state.vault
    body = await read_limited_body(request, settings.max_webhook_body_bytes)
    channel = state.channels.by_id(channel_id)
    if channel is None:
        channel = await asyncio.to_thread(_channel, state.engine, channel_id)
        if channel is not None:
            state.channels.put([channel])
    if channel is None or channel.platform != "telegram" or not channel.webhook_secret_ciphertext:
        raise HTTPException(status.HTTP_404_NOT_FOUND, "unknown channel")
    try:
        expected = vault.decrypt(channel.webhook_secret_ciphertext, webhook_secret_context(channel.id))
    except VaultError:
        log.error("telegram webhook secret of channel %s cannot be decrypted", channel.id)
        raise HTTPException(status.HTTP_403_FORBIDDEN, "invalid secret token") from None
    given = request.headers.get("x-telegram-bot-api-secret-token", "")
    if not given or not constant_time_equals(given, expected):
        raise HTTPException(status.HTTP_403_FORBIDDEN, "invalid secret token")
    payload = parse_json(body)
    try:
        parsed = parse_telegram_update(payload, channel.external_id)
    except MalformedPayload as exc:
        raise HTTPException(status.HTTP_400_BAD_REQUEST, f"malformed update: {exc}") from None
    for event_id, reason in parsed.ignored:
        log.info("ignored telegram update %s: %s", event_id, reason)
    routed = [(channel, e) for e in parsed.events] if channel.status == "active" else []
    if routed:
        await _dispatch(request, routed)
    return AckResponse(
        received=len(parsed.events) + len(parsed.ignored),
        dispatched=len(routed),
        ignored=len(parsed.ignored) + len(parsed.events) - len(routed),
    )
