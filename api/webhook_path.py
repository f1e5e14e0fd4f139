"""The webhook path, one object per API process: verify → parse → route →
accept. ``accept`` hands events to Temporal when it keeps up and keeps them
in the durable inbox otherwise (api/inbox.py), deciding on the typed state
kept here (webhooks waiting on Temporal, its recent latency, the webhooks'
rate, the circuit breaker). The routes in api/routes/webhooks.py only read
the request and answer.

This is the API's hot path (hundreds of webhooks a second under a burst):
connected channels are cached for ``CHANNEL_CACHE_SECONDS``
(``ChannelCache``)."""

from __future__ import annotations

import asyncio
import json
import logging
import math
import time
from dataclasses import dataclass, field

from fastapi import HTTPException, Request, status
from sqlmodel import Session, select
from starlette.datastructures import State
from temporalio.service import RPCError

from api.dispatch import dispatch_events, refusal
from core.contracts import InboundEvent
from core.crypto import VaultError, constant_time_equals, meta_signature, webhook_secret_context
from core.db import Channel
from core.inbound import MalformedPayload, parse_meta_webhook, parse_telegram_update

log = logging.getLogger("vectory.webhooks")

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



@dataclass
class Routed:
    """A webhook's events with the connected channel of each, and what it
    carried that goes nowhere."""

    events: list[tuple[Channel, InboundEvent]] = field(default_factory=list)
    received: int = 0
    ignored: int = 0


class WebhookPath:
    """Verify, parse, route and accept the platforms' webhooks.

    The API's services (settings, engine, vault, the Temporal client, its
    worker, the inbox) are read from the app's state at each call: the
    Temporal client arrives once connected, and tests swap them."""

    def __init__(self, app: State) -> None:
        self.app = app
        self.channels = ChannelCache()
        self.dispatching = 0  # webhooks waiting on Temporal right now
        self.signal_seconds = 0.0  # recent signal-with-start latency (moving average)
        self.rate, self.rate_at = 0.0, 0.0  # webhooks a second (moving average)
        self.temporal_down_until = 0.0  # circuit breaker: no direct dispatch before

    # -- verify ------------------------------------------------------------------------

    def verify_meta(self, body: bytes, signature: str) -> None:
        secret = self.app.settings.meta_app_secret
        if not signature or not constant_time_equals(signature, meta_signature(secret, body)):
            raise HTTPException(status.HTTP_401_UNAUTHORIZED, "invalid X-Hub-Signature-256")

    async def telegram_channel(self, channel_id: str, secret_token: str) -> Channel:
        """The bot's channel, once the update's secret token is its own."""
        channel = self.channels.by_id(channel_id)
        if channel is None:
            channel = await asyncio.to_thread(_channel, self.app.engine, channel_id)
            if channel is not None:
                self.channels.put([channel])
        if channel is None or channel.platform != "telegram" or not channel.webhook_secret_ciphertext:
            raise HTTPException(status.HTTP_404_NOT_FOUND, "unknown channel")
        try:
            expected = self.app.vault.decrypt(channel.webhook_secret_ciphertext, webhook_secret_context(channel.id))
        except VaultError:
            log.error("telegram webhook secret of channel %s cannot be decrypted", channel.id)
            raise HTTPException(status.HTTP_403_FORBIDDEN, "invalid secret token") from None
        if not secret_token or not constant_time_equals(secret_token, expected):
            raise HTTPException(status.HTTP_403_FORBIDDEN, "invalid secret token")
        return channel

    # -- parse and route ---------------------------------------------------------------

    async def route_meta(self, body: bytes) -> Routed:
        try:
            parsed = parse_meta_webhook(parse_json(body))
        except MalformedPayload as exc:
            raise HTTPException(status.HTTP_400_BAD_REQUEST, f"malformed webhook: {exc}") from None
        platform = "instagram" if parsed.object == "instagram" else "messenger"
        channels, missing = self.channels.accounts(platform, {e.account_id for e in parsed.events})
        if missing:
            # A short session in a thread, closed before dispatch: holding a pooled
            # connection across the Temporal call exhausted the pool under load
            # and blocked the event loop.
            rows = await asyncio.to_thread(_active_channels, self.app.engine, platform, missing)
            self.channels.put(rows)
            channels.update({c.external_id: c for c in rows})
        routed = Routed(received=len(parsed.events) + len(parsed.ignored), ignored=len(parsed.ignored))
        for event in parsed.events:
            channel = channels.get(event.account_id)
            if channel is None:
                routed.ignored += 1
                log.info("ignored %s event: account not connected", platform)
                continue
            routed.events.append((channel, event))
        for event_id, reason in parsed.ignored:
            log.info("ignored event %s: %s", event_id, reason)
        return routed

    def route_telegram(self, channel: Channel, body: bytes) -> Routed:
        try:
            parsed = parse_telegram_update(parse_json(body), channel.external_id)
        except MalformedPayload as exc:
            raise HTTPException(status.HTTP_400_BAD_REQUEST, f"malformed update: {exc}") from None
        for event_id, reason in parsed.ignored:
            log.info("ignored telegram update %s: %s", event_id, reason)
        events = [(channel, e) for e in parsed.events] if channel.status == "active" else []
        received = len(parsed.events) + len(parsed.ignored)
        return Routed(events, received=received, ignored=received - len(events))

    # -- accept ------------------------------------------------------------------------

    async def accept(self, routed: list[tuple[Channel, InboundEvent]]) -> None:
        """Hand events to Temporal directly when it keeps up; otherwise keep them
        in the durable inbox (the relay delivers them, in order per contact) and
        still answer 200 at once. When Temporal has not taken them within
        ``webhook_ack_wait_ms``, they are stored and answered too while the
        signal goes on (``InboxState.hold``: it delivers them, or the relay does
        if it fails).

        The wait is skipped while Temporal's recent signals (a moving average,
        ``signal_seconds``) took longer than it.

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
        if not routed:
            return
        state = self.app
        temporal = state.temporal
        inbox = state.inbox
        now = time.monotonic()
        self.rate = self.rate * math.exp(self.rate_at - now) + 1.0
        self.rate_at = now
        direct = (
            temporal is not None
            and now >= self.temporal_down_until
            and not inbox.backlog
            and self.dispatching < state.settings.webhook_max_inflight_dispatches
        )
        signal = None
        if direct:
            self.dispatching += 1
            started = now
            # The API's worker takes a new conversation only while no other
            # webhook waits on Temporal and webhooks come slowly (api/ingress.py):
            # a burst and a high rate go to the worker processes.
            ingress = state.ingress if state.ingress.running else None
            eager = self.dispatching == 1 and self.rate <= EAGER_MAX_WEBHOOKS_PER_SECOND
            signal = asyncio.ensure_future(
                asyncio.wait_for(
                    dispatch_events(temporal, state.settings.task_queue, routed, ingress, eager=eager),
                    DISPATCH_TIMEOUT_SECONDS,
                )
            )
            signal.add_done_callback(lambda done: self._signal_done(done, len(routed), started))
            wait = state.settings.webhook_ack_wait_ms / 1000
            # When Temporal's recent answers took longer than the wait, waiting
            # would only add the wait to the answer: store at once.
            if self.signal_seconds > wait:
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

    def _signal_done(self, signal: asyncio.Future, events: int, started: float) -> None:
        self.dispatching -= 1
        if signal.cancelled():
            return
        # How long Temporal takes to accept a signal now (moving average).
        self.signal_seconds += SIGNAL_LATENCY_WEIGHT * (time.monotonic() - started - self.signal_seconds)
        err = signal.exception()
        reason = refusal(err) if err is not None else None
        if reason is not None:
            # About these events only: other webhooks still go to Temporal directly.
            log.warning("Temporal refused an event (%s): the inbox relay sets it aside", reason)
        elif isinstance(err, (RPCError, TimeoutError)):
            self.temporal_down_until = time.monotonic() + BREAKER_SECONDS
            log.warning("temporal unavailable (%s): keeping %d events in the inbox", type(err).__name__, events)
