"""Durable inbox: verified webhook events survive a Temporal outage.

When Temporal cannot take an event, the webhook stores it (unique per
channel and platform event id) and still answers 200, so the platform does
not retry for 36 hours against an outage we can absorb. The relay drains the
inbox with signal-with-start once Temporal answers again, oldest first, one
contact's events in order. Relaying twice is harmless: conversations dedupe
by event id.
"""

from __future__ import annotations

import asyncio
import logging
from dataclasses import asdict

from sqlalchemy import Engine
from sqlalchemy.exc import IntegrityError
from sqlmodel import Session, col, delete, select
from temporalio.service import RPCError

from api.dispatch import signal_conversation
from core.contracts import Attachment, InboundEvent, contact_id_for
from core.db import Channel, InboxEvent

log = logging.getLogger("vectory.inbox")

RELAY_INTERVAL_SECONDS = 1.0
RELAY_BATCH = 500


def store(engine: Engine, routed: list[tuple[Channel, InboundEvent]]) -> int:
    """Store events; a redelivery already in the inbox is not stored twice."""
    stored = 0
    with Session(engine) as db:
        for channel, event in routed:
            db.add(
                InboxEvent(
                    channel_id=channel.id,
                    contact_id=contact_id_for(channel.id, event.sender_id),
                    event_id=event.event_id,
                    event=asdict(event),
                )
            )
            try:
                db.commit()
                stored += 1
            except IntegrityError:
                db.rollback()
    return stored


def _event(data: dict) -> InboundEvent:
    fields = dict(data)
    fields["attachments"] = [Attachment(**a) for a in fields.get("attachments", [])]
    return InboundEvent(**fields)


async def relay_once(engine: Engine, client, task_queue: str) -> int:
    """Hand stored events to Temporal; returns how many were relayed.
    Stops at the first failure (the rest wait for the next round)."""
    rows = await asyncio.to_thread(_load, engine)
    if not rows:
        return 0
    channels = await asyncio.to_thread(_channels, engine, {r.channel_id for r in rows})
    relayed = 0
    for row in rows:
        channel = channels.get(row.channel_id)
        if channel is not None and channel.status == "active":
            event = _event(row.event)
            await signal_conversation(client, task_queue, channel, event.sender_id, "inbound", event)
        await asyncio.to_thread(_delete, engine, row.id)
        relayed += 1
    return relayed


def _load(engine: Engine) -> list[InboxEvent]:
    with Session(engine) as db:
        return list(db.exec(select(InboxEvent).order_by(col(InboxEvent.id)).limit(RELAY_BATCH)).all())


def _channels(engine: Engine, ids: set[str]) -> dict[str, Channel]:
    with Session(engine) as db:
        return {c.id: c for c in db.exec(select(Channel).where(col(Channel.id).in_(ids))).all()}


def _delete(engine: Engine, row_id: int | None) -> None:
    with Session(engine) as db:
        db.exec(delete(InboxEvent).where(InboxEvent.id == row_id))  # type: ignore[call-overload]
        db.commit()


async def run_relay(app) -> None:
    """Background task of the API: drain the inbox whenever Temporal answers."""
    engine = app.state.engine
    while True:
        await asyncio.sleep(RELAY_INTERVAL_SECONDS)
        client = app.state.temporal
        if client is None or not getattr(app.state, "inbox_relay", True):
            continue
        try:
            relayed = await relay_once(engine, client, app.state.settings.task_queue)
            if relayed:
                app.state.temporal_down_until = 0.0  # Temporal answers again: webhooks dispatch directly
                log.info("relayed %d inbox events to Temporal", relayed)
        except RPCError as err:
            log.warning("inbox relay waiting for Temporal: %s", err.status)
        except Exception:
            log.exception("inbox relay failed; retrying")
