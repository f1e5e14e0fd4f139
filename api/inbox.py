"""Durable inbox: verified webhook events survive a Temporal outage or overload.

When Temporal cannot take an event (down, or already holding the maximum of
webhooks in flight), the webhook stores it (unique per channel and platform
event id) and still answers 200 at once, so the platform does
not retry for 36 hours against an outage we can absorb and the answer never
waits for Temporal's backlog. The relay drains the inbox with
signal-with-start as soon as it is woken (or every second), oldest first
but conversations' events before comments (a burst of comments does not
hold up other people's DMs), one contact's events in order, several
contacts at a time. While the inbox
holds events, webhooks store theirs too (``app.state.inbox_backlog``), so a
contact's later event never overtakes an earlier stored one. Relaying twice
is harmless: conversations dedupe by event id.

When Temporal is only slow (it has not taken the events within
``webhook_ack_wait_ms``), the webhook stores them and answers too, but its
signal goes on: the rows are held (``InboxState.hold``), deleted when the
signal lands and handed to the relay only if it fails.

An event Temporal refuses for good (``api.dispatch.refusal``: a payload
over its limit, say) is not retried forever, which held up the contact's
later events and kept every webhook going through the database: the relay
moves it to the dead letters (``DeadLetter``) with the reason after one
attempt and goes on. ``vectory inbox dead-letters`` lists them and
``vectory inbox retry`` moves them back (``requeue_dead_letters``).
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable
from dataclasses import asdict

from sqlalchemy import Engine
from sqlalchemy import select as sa_select
from sqlalchemy.exc import IntegrityError
from sqlmodel import Session, col, delete, select
from temporalio.service import RPCError

from api.dispatch import REASON_MAX_CHARS, priority_of, refusal, signal_conversation
from core.contracts import Attachment, InboundEvent, contact_id_for
from core.db import Channel, DeadLetter, InboxEvent, utcnow
from core.observability import INBOX_DEAD_LETTERS

log = logging.getLogger("vectory.inbox")
INBOX = InboxEvent.__table__
DEAD_LETTERS = DeadLetter.__table__

RELAY_INTERVAL_SECONDS = 1.0
RELAY_BATCH = 100
RELAY_CONTACTS_IN_PARALLEL = 16
# The relay shares the API's event loop with the webhooks it must not slow
# down: before each signal it checks that the loop turns around within
# LOOP_BUSY_SECONDS, else it steps back for RELAY_BACKOFF_SECONDS (at most
# RELAY_MAX_DEFERRAL_SECONDS per signal, so it always progresses).
LOOP_BUSY_SECONDS = 0.002
RELAY_BACKOFF_SECONDS = 0.02
RELAY_MAX_DEFERRAL_SECONDS = 1.0


def _rows(routed: list[tuple[Channel, InboundEvent]]) -> list[dict]:
    now = utcnow()
    return [
        {
            "channel_id": channel.id,
            "contact_id": contact_id_for(channel.id, event.sender_id, key=channel.contact_key),
            "event_id": event.event_id,
            "event": asdict(event),
            "created_at": now,
            "priority": priority_of(event).priority_key,
        }
        for channel, event in routed
    ]


def store(engine: Engine, routed: list[tuple[Channel, InboundEvent]]) -> list[int]:
    """Store events; a redelivery already in the inbox is not stored twice.
    Returns the ids of the rows stored."""
    return store_many(engine, [routed])[0]


def store_many(engine: Engine, requests: list[list[tuple[Channel, InboundEvent]]]) -> list[list[int]]:
    """``store`` for several webhooks at once: one transaction of Core
    inserts (on SQLite the write lock is taken once and held briefly: the
    worker waits for it); row by row when one of them is a redelivery."""
    batches = [_rows(routed) for routed in requests]
    try:
        with engine.begin() as conn:
            return [[conn.execute(INBOX.insert(), row).inserted_primary_key[0] for row in rows] for rows in batches]
    except IntegrityError:
        pass
    out: list[list[int]] = []
    for rows in batches:
        stored: list[int] = []
        for row in rows:
            try:
                with engine.begin() as conn:
                    stored.append(conn.execute(INBOX.insert(), row).inserted_primary_key[0])
            except IntegrityError:
                pass
        out.append(stored)
    return out


class InboxWriter:
    """Group commit: the webhooks that store while a write is under way
    share the next transaction, written by one thread at a time.

    Under load (200 webhooks/s on SQLite), one transaction per webhook on
    the thread pool queued behind each other and behind the worker's writes
    for SQLite's write lock (whose busy handler sleeps 1, 2, 5, 10 ms...):
    the store's p99 was 25 ms for a 0.7 ms median.
    """

    def __init__(self, engine: Engine) -> None:
        self.engine = engine
        self._pending: list[tuple[list[tuple[Channel, InboundEvent]], asyncio.Future]] = []
        self._writing: asyncio.Future | None = None

    async def store(self, routed: list[tuple[Channel, InboundEvent]]) -> list[int]:
        future = asyncio.get_running_loop().create_future()
        self._pending.append((routed, future))
        if self._writing is None:
            self._writing = asyncio.ensure_future(self._write())  # kept: the loop holds tasks weakly
        return await future

    async def _write(self) -> None:
        try:
            while self._pending:
                batch, self._pending = self._pending, []
                try:
                    results = await asyncio.to_thread(store_many, self.engine, [routed for routed, _ in batch])
                except Exception as exc:  # noqa: BLE001 - every waiting webhook gets it
                    for _, future in batch:
                        if not future.done():
                            future.set_exception(exc)
                    continue
                for (_, future), ids in zip(batch, results, strict=True):
                    if not future.done():
                        future.set_result(ids)
        finally:
            self._writing = None


def _event(data: dict) -> InboundEvent:
    fields = dict(data)
    fields["attachments"] = [Attachment(**a) for a in fields.get("attachments", [])]
    return InboundEvent(**fields)


async def relay_once(
    engine: Engine,
    client,
    task_queue: str,
    in_flight: set[int] | frozenset = frozenset(),
    remember: Callable[[str], None] | None = None,
) -> int:
    """Hand stored events to Temporal; returns how many left the inbox.

    Contacts in parallel (at most RELAY_CONTACTS_IN_PARALLEL), each
    contact's events in order; a contact's rows are deleted once all of them
    were signalled. An event Temporal refuses for good is set aside as a
    dead letter (``_set_aside``) and the contact's next one goes on. Any
    other failure leaves that contact's rows for the next round
    (re-signalled ones are deduplicated) and is raised after the others.
    Rows whose webhook's own signal is still on its way (``in_flight``) are
    left to it. ``remember`` is told each conversation signalled (the API's
    worker then knows it runs: no eager start is tried for it)."""
    rows = [r for r in await asyncio.to_thread(_load, engine, in_flight) if r.id not in in_flight]
    if not rows:
        return 0
    channels = await asyncio.to_thread(_channels, engine, {r.channel_id for r in rows})
    by_contact: dict[tuple[str, str], list[InboxEvent]] = {}
    for row in rows:
        by_contact.setdefault((row.channel_id, row.contact_id), []).append(row)
    limit = asyncio.Semaphore(RELAY_CONTACTS_IN_PARALLEL)

    async def relay_contact(contact_rows: list[InboxEvent]) -> int:
        async with limit:
            handed = []
            for row in contact_rows:
                channel = channels.get(row.channel_id)
                if channel is None or channel.status != "active":
                    handed.append(row.id)
                    continue
                await _after_webhooks()
                try:
                    event = _event(row.event)
                except (TypeError, ValueError) as err:  # written by another version of the code
                    await asyncio.to_thread(_set_aside, engine, channel, row, f"stored event unreadable: {err}")
                    continue
                try:
                    workflow_id = await signal_conversation(
                        client, task_queue, channel, event.sender_id, "inbound", event
                    )
                except RPCError as err:
                    reason = refusal(err)
                    if reason is None:
                        raise
                    await asyncio.to_thread(_set_aside, engine, channel, row, reason)
                    continue
                handed.append(row.id)
                if remember is not None:
                    remember(workflow_id)
            if handed:
                await asyncio.to_thread(_delete, engine, handed)
            return len(contact_rows)

    results = await asyncio.gather(*(relay_contact(r) for r in by_contact.values()), return_exceptions=True)
    for result in results:
        if isinstance(result, BaseException):
            raise result
    return sum(results)  # type: ignore[arg-type]


def _set_aside(engine: Engine, channel: Channel, row: InboxEvent, reason: str) -> None:
    """Move an inbox row Temporal refused for good to the dead letters, in
    one transaction (a dead letter of the same event, refused again after a
    retry, is replaced). Logged without the event's content."""
    reason = reason[:REASON_MAX_CHARS]
    with engine.begin() as conn:
        conn.execute(DEAD_LETTERS.delete().where(
            DEAD_LETTERS.c.channel_id == row.channel_id, DEAD_LETTERS.c.event_id == row.event_id
        ))
        dead_id = conn.execute(DEAD_LETTERS.insert(), {
            "workspace_id": channel.workspace_id, "channel_id": row.channel_id, "contact_id": row.contact_id,
            "event_id": row.event_id, "event": row.event, "priority": row.priority, "reason": reason,
            "created_at": row.created_at, "dead_lettered_at": utcnow(),
        }).inserted_primary_key[0]
        conn.execute(INBOX.delete().where(INBOX.c.id == row.id))
    INBOX_DEAD_LETTERS.inc()
    log.error("inbox event set aside as dead letter %s (channel %s): Temporal refused it for good: %s",
              dead_id, row.channel_id, reason)


def requeue_dead_letters(engine: Engine, ids: list[int] | None = None, workspace_id: str | None = None) -> list[int]:
    """Move dead letters back into the inbox, where the relay (of a running
    API, within a second) hands them over again: those of ``ids``, or every
    one (of ``workspace_id``). Returns the ids moved; an event already in the
    inbox again only loses its dead letter."""
    query = sa_select(DEAD_LETTERS).order_by(DEAD_LETTERS.c.id)
    if ids is not None:
        query = query.where(DEAD_LETTERS.c.id.in_(ids))
    if workspace_id is not None:
        query = query.where(DEAD_LETTERS.c.workspace_id == workspace_id)
    with engine.connect() as conn:
        rows = conn.execute(query).all()
    moved = []
    for row in rows:
        back = {
            "channel_id": row.channel_id, "contact_id": row.contact_id, "event_id": row.event_id,
            "event": row.event, "created_at": utcnow(), "priority": row.priority,
        }
        forget = DEAD_LETTERS.delete().where(DEAD_LETTERS.c.id == row.id)
        try:
            with engine.begin() as conn:
                conn.execute(INBOX.insert(), back)
                conn.execute(forget)
        except IntegrityError:
            with engine.begin() as conn:
                conn.execute(forget)
        moved.append(row.id)
    return moved


async def _after_webhooks() -> None:
    """Give way to webhooks: wait while the event loop is congested (acks
    first, relaying when there is room), but never longer than
    RELAY_MAX_DEFERRAL_SECONDS."""
    deadline = time.monotonic() + RELAY_MAX_DEFERRAL_SECONDS
    while time.monotonic() < deadline:
        started = time.monotonic()
        await asyncio.sleep(0)
        if time.monotonic() - started < LOOP_BUSY_SECONDS:
            return
        await asyncio.sleep(RELAY_BACKOFF_SECONDS)


def _load(engine: Engine, in_flight: set[int] | frozenset = frozenset()) -> list[InboxEvent]:
    """The next rows to relay, contact by contact: the contacts of the first
    RELAY_BATCH rows by priority (conversations' events before comments),
    then oldest first, that are not ``in_flight`` (held by their webhook's
    signal: skipped, so rows behind them are always reached), each with all
    its rows in order (an earlier comment of the same person comes along
    before their DM)."""
    with Session(engine) as db:
        firsts = db.exec(
            select(InboxEvent.id, InboxEvent.contact_id)
            .order_by(col(InboxEvent.priority), col(InboxEvent.id))
            .limit(RELAY_BATCH + len(in_flight))
        ).all()
        contacts = list(dict.fromkeys(contact for row_id, contact in firsts if row_id not in in_flight))[:RELAY_BATCH]
        if not contacts:
            return []
        rows = db.exec(
            select(InboxEvent).where(col(InboxEvent.contact_id).in_(contacts)).order_by(col(InboxEvent.id))
            .limit(2 * RELAY_BATCH)
        ).all()
    place = {contact: i for i, contact in enumerate(contacts)}
    return sorted(rows, key=lambda row: (place[row.contact_id], row.id))


def _channels(engine: Engine, ids: set[str]) -> dict[str, Channel]:
    with Session(engine) as db:
        return {c.id: c for c in db.exec(select(Channel).where(col(Channel.id).in_(ids))).all()}


def _delete(engine: Engine, row_ids: list[int | None]) -> None:
    with Session(engine) as db:
        db.exec(delete(InboxEvent).where(col(InboxEvent.id).in_(row_ids)))  # type: ignore[call-overload]
        db.commit()


class InboxState:
    """The API process's view of its inbox (one event loop: no locks)."""

    def __init__(self) -> None:
        # True until the relay found the inbox empty (also at start: rows may
        # be left from before a restart). Webhooks store while it is set.
        self.backlog = True
        self.storing = 0  # webhooks storing right now
        self.stored = 0  # stores completed (the relay's "nothing new" check)
        # Rows kept while their webhook's signal was slow to land: that signal
        # delivers them (and deletes them); the relay leaves them alone.
        self.in_flight: set[int] = set()
        self.delivered: list[int] = []  # held rows whose signal landed: to delete
        self.cleaner: asyncio.Task | None = None
        self.wakeup = asyncio.Event()
        self.wakeup.set()  # the relay's first round runs at once

    def stored_one(self) -> None:
        self.backlog = True
        self.stored += 1
        self.wakeup.set()

    def hold(self, engine: Engine, row_ids: list[int], signal: asyncio.Future) -> None:
        """Rows stored for events whose signal is still on its way: deleted
        once it lands (several webhooks' rows in one statement), handed to
        the relay if it fails."""
        self.in_flight.update(row_ids)

        def landed(done: asyncio.Future) -> None:
            self.in_flight.difference_update(row_ids)
            if done.cancelled() or done.exception() is not None:
                self.stored_one()  # the relay delivers them, in order behind them
                return
            self.delivered.extend(row_ids)
            if self.cleaner is None or self.cleaner.done():
                self.cleaner = asyncio.ensure_future(self._delete_delivered(engine))

        signal.add_done_callback(landed)

    async def _delete_delivered(self, engine: Engine) -> None:
        while self.delivered:
            batch, self.delivered = self.delivered[:RELAY_BATCH], self.delivered[RELAY_BATCH:]
            try:
                await asyncio.to_thread(_delete, engine, batch)
            except Exception as err:
                # Left in the inbox: the relay signals them again (deduplicated).
                log.warning("inbox rows of delivered webhooks not deleted: %s", err)


async def run_relay(app) -> None:
    """Background task of the API: drain the inbox when woken by a webhook
    that stored events, or every RELAY_INTERVAL_SECONDS."""
    engine = app.state.engine
    inbox: InboxState = app.state.inbox
    while True:
        try:
            await asyncio.wait_for(inbox.wakeup.wait(), RELAY_INTERVAL_SECONDS)
        except TimeoutError:
            pass
        inbox.wakeup.clear()
        client = app.state.temporal
        if client is None or not app.state.inbox_relay:
            continue
        try:
            while True:
                seen = inbox.stored
                ingress = app.state.ingress
                relayed = await relay_once(
                    engine, client, app.state.settings.task_queue, inbox.in_flight,
                    remember=ingress.remember if ingress.running else None,
                )
                if relayed:
                    app.state.webhooks.temporal_down_until = 0.0  # Temporal answers again
                    log.info("relayed %d inbox events to Temporal", relayed)
                    continue
                if inbox.storing == 0 and inbox.stored == seen:
                    inbox.backlog = False  # empty, and nothing stored meanwhile: webhooks dispatch directly
                break
        except RPCError as err:
            log.warning("inbox relay waiting for Temporal (%s): %s", err.status.name, err.message[:REASON_MAX_CHARS])
        except Exception:
            log.exception("inbox relay failed; retrying")
