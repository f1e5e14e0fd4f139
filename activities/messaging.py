"""Outbound messaging: one send per idempotency key, whatever the retries."""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable
from concurrent.futures import Future
from dataclasses import dataclass, replace
from datetime import UTC, datetime, timedelta
from types import SimpleNamespace
from typing import NamedTuple

from sqlalchemy import Connection, Engine, Row, bindparam, select
from sqlalchemy.exc import DataError, IntegrityError, StatementError
from sqlmodel import Session
from temporalio import activity
from temporalio.exceptions import ApplicationError

from activities.broadcasts import held_back
from activities.common import ChannelCredentials, credentials_of, load_credentials, to_application_error
from activities.crm import (
    CHANNEL_BY_ID,
    CONTACT_BY_ID,
    CONTACTS,
    INSERT_MESSAGE,
    apply_profile,
    fill_names,
    get_profile,
    record_inbound_event,
    snapshot,
    with_names,
    write_run,
    write_run_in,
)
from core import flowrt
from core.audit import audit_in
from core.contracts import (
    AckCallbackInput,
    AutomationSnapshot,
    BroadcastBatchInput,
    BroadcastBatchResult,
    ContactSnapshot,
    ErrorType,
    FirstSend,
    PublicReplyInput,
    RecordInboundInput,
    RecordInboundResult,
    SendMessageInput,
    SendMessageResult,
)
from core.crypto import TokenVault
from core.db import SendRecord, utcnow
from core.observability import EVENTS_UNRECORDABLE, RUNS_STARTED
from core.platforms import (
    GraphClient,
    PlatformError,
    TelegramClient,
    build_meta_message,
    build_telegram_message,
)
from core.ratelimit import SEND_JITTER_BUDGET, Budget, RateLimiter, public_reply_budgets, send_budgets
from core.settings import Settings, get_settings

log = logging.getLogger(__name__)
SEND_RECORDS = SendRecord.__table__
# Built once (see activities/crm.py CHANNEL_BY_ID).
SENT_ID = select(SEND_RECORDS.c.platform_message_id).where(SEND_RECORDS.c.idempotency_key == bindparam("key"))
INSERT_SEND_RECORD = SEND_RECORDS.insert()

# Errors no retry of the recording can fix: the database refused the event's
# content (a value out of range, text it cannot encode). The known causes are
# cleaned when the webhook is parsed (core/inbound.py); another one must not
# stop the person's conversation (each retry of its task failed again).
def refused_content(err: BaseException) -> bool:
    if isinstance(err, DataError):
        return True
    if isinstance(err, StatementError):  # a driver's error while binding the values
        return isinstance(err.orig, UnicodeError | OverflowError | ValueError)
    return isinstance(err, UnicodeError | OverflowError)


def unrecordable(input: RecordInboundInput, err: BaseException) -> ApplicationError:
    """The non-retryable failure the conversation skips the event on."""
    EVENTS_UNRECORDABLE.inc()
    log.warning("event %s not recordable (%s): skipped", input.event.event_id, type(err).__name__)
    return ApplicationError(
        f"the database refused this event ({type(err).__name__})", type=ErrorType.UNRECORDABLE_EVENT, non_retryable=True
    )


STANDARD_WINDOW = timedelta(hours=24)
HUMAN_AGENT_WINDOW = timedelta(days=7)

# Rate limits (core/ratelimit.py): a cell that frees up within
# RATE_WAIT_INLINE is booked and its wait slept in the activity (well inside
# SEND_TIMEOUT); a longer wait fails the attempt with a retryable
# ``RateLimited`` whose next_retry_delay is the wait, so Temporal holds the
# send durably.
RATE_WAIT_INLINE = 2.0
# A booked cell is used only if the send leaves within this of its moment
# (half of the paced buckets' jitter budget; the other half is for the HTTP
# request to reach the platform); a sender that woke up later books again,
# so late wake-ups cannot bunch sends into one second.
RATE_LATE_TOLERANCE = SEND_JITTER_BUDGET / 2
# Seconds a profile lookup by the send activity may take (before or after
# the message): with the send's HTTP timeout and inline rate wait, well
# inside SEND_TIMEOUT.
PROFILE_LOOKUP = 5.0
PROFILE_ATTEMPTS = 2
PROFILE_RETRY_SECONDS = 0.3


class Opening(NamedTuple):
    """The opening message of the automation an event starts: the run's
    workflow id, the step's id and the send."""

    run_id: str
    step_id: str
    send: SendMessageInput


def first_reply_plan(input: RecordInboundInput, record: RecordInboundResult) -> Opening | None:
    """The conversation's routing of a recorded event, for ``first_reply``
    (asked for only when the conversation's own state forwards nothing):
    the opening send of the automation it starts (None: nothing starts, or
    the flow opens otherwise).

    ``record.automations`` is the one automation the event starts, if any
    (``record_inbound_event`` matched it as the conversation does)."""
    event, contact = input.event, record.contact
    if record.duplicate or not record.channel_active or contact is None or event.kind == "comment":
        return None
    if not record.automations:
        return None
    automation = record.automations[0]
    step, _, whole_flow = flowrt.leading_send(automation.definition.get("steps", []))
    if step is None:
        return None
    run_id = flowrt.run_workflow_id(input.workspace_id, automation.id, contact.id, event.event_id)
    send = flowrt.opening_send(
        workspace_id=input.workspace_id, channel_id=input.channel_id, platform=input.platform, run_id=run_id,
        automation=automation, contact=contact, step=step, whole_flow=whole_flow,
        now_iso=datetime.now(UTC).isoformat(),
    )
    return Opening(run_id, step["id"], send)


@dataclass
class _Prepared:
    """A send cleared to go: credentials, its budgets and the answer of their
    first reservation ``(now, wait, key)``, if made."""

    creds: ChannelCredentials
    budgets: list[Budget]
    reservation: tuple[float, float, str] | None  # None: not reserved yet
    contact: dict | None = None  # the contact's row (Meta DMs: read for the window check)


@dataclass
class _ProfileFirst:
    """``profile_first_template``: what the send's own profile lookup gave."""

    looked_up: bool = False
    contact: ContactSnapshot | None = None
    names: dict[str, str] | None = None  # saved with the send's records
    text: str = ""


class _FirstReply:
    """One event's first reply, prepared while ``record_inbound`` records the
    event: ``on_unnamed_contact`` and ``plan`` run on the database thread
    inside ``record_inbound_event``, ``answer`` on the event loop after it.

    - ``lookup``: the contact's profile lookup, started the moment the
      contact turns out unnamed if their event starts an automation;
    - ``opening``: the opening message of the automation the event starts
      (``first_reply_plan``; None: nothing to send first);
    - ``checked``: that send's checks (``_prepare_send``) made right after
      the commit with the channel and contact rows just read and written,
      or the error they raised (raised again by ``answer``).
    """

    def __init__(self, messaging: MessagingActivities, input: RecordInboundInput) -> None:
        self.messaging = messaging
        self.input = input
        self.loop = asyncio.get_running_loop()
        self.lookup: Future[dict[str, str] | None] | None = None
        self.planned = False
        self.opening: Opening | None = None
        self.checked: _Prepared | SendMessageResult | Exception | None = None

    def on_unnamed_contact(self, channel: Row, automations: list[AutomationSnapshot]) -> None:
        """Database thread, before the event's rows are written, with the
        automation the event starts (none: nothing to look up for). A contact
        is looked up only for an automation their event starts (its messages
        may greet them by name), as the conversation would."""
        event = self.input.event
        if channel.platform == "telegram" or not channel.token_ciphertext or event.kind == "comment":
            return
        if not automations:
            return
        try:
            creds = credentials_of(channel, self.messaging.vault, self.input.channel_id, allow_statuses={"active"})
        except Exception as err:  # noqa: BLE001 - no lookup ahead; the send's own checks report it
            log.info("profile lookup not started: %s", type(err).__name__)
            return
        self.lookup = asyncio.run_coroutine_threadsafe(self.messaging._names_of(creds, event.sender_id), self.loop)

    def plan(self, record: RecordInboundResult, channel: Row, contact: dict) -> None:
        """Database thread, once the event is recorded: the match and the
        send's checks with the rows just written (its rate budgets booked
        unless its text waits for the profile lookup: booked after it)."""
        self.planned = True
        self.opening = first_reply_plan(self.input, record)
        if self.opening is None:
            return
        waits = self.lookup is not None and bool(self.opening.send.profile_first_template)
        try:
            self.checked = self.messaging._prepare_send(self.opening.send, reserve=not waits, known=(channel, contact))
        except Exception as err:  # noqa: BLE001 - raised by the send in answer()
            self.checked = err

    async def answer(self, record: RecordInboundResult) -> RecordInboundResult:
        """Send the opening message, if any, and return ``record`` with the
        send's result (``first_send``) and the contact as looked up."""
        names = asyncio.wrap_future(self.lookup) if self.lookup is not None else None
        if not self.planned:
            # Not recorded now: a duplicate, or this recorder's own row from an attempt that stopped.
            self.opening = first_reply_plan(self.input, record)
        if self.opening is None:
            if names is not None:
                await self.messaging._save_looked_up(record, names)
            return record
        run_id, step_id, send = self.opening
        try:
            if isinstance(self.checked, Exception):
                raise self.checked
            result = await self.messaging._send_message(send, names, self.checked)
        except Exception as err:  # noqa: BLE001 - reported; the run sends it with its retries
            error_type = err.type if isinstance(err, ApplicationError) and err.type else type(err).__name__
            log.info("first message left to the run: %s", error_type)
            record.first_send = FirstSend(run_id=run_id, step_id=step_id, error_type=error_type)
            if names is not None:
                await self.messaging._save_looked_up(record, names)
            return record
        record.first_send = FirstSend(run_id=run_id, step_id=step_id, result=result)
        if names is not None and record.contact is not None:
            # The send looked the profile up with these names and saved them.
            record.contact = result.contact or replace(record.contact, is_new=False)
        return record


class MessagingActivities:
    def __init__(
        self,
        engine: Engine,
        vault: TokenVault,
        graph: GraphClient,
        instagram: GraphClient,
        telegram: TelegramClient,
        settings: Settings | None = None,
    ):
        self.engine = engine
        self.vault = vault
        self.graph = graph
        self.instagram = instagram
        self.telegram = telegram
        self.settings = settings or get_settings()
        self.limiter = RateLimiter(engine)

    async def _take_rate_budget(
        self, budgets: list[Budget], first: tuple[float, float, str] | None = None
    ) -> None:
        """Take one cell of every budget (all or nothing, durable in the
        database). A cell free within RATE_WAIT_INLINE is booked and waited
        for here (concurrent sends queue in booking order, one per slot);
        a longer wait raises a retryable ``RateLimited`` with the wait as
        next_retry_delay and books nothing. ``first``: the answer of a
        reservation the caller already made, ``(now, wait, key)``."""
        deadline = time.monotonic() + RATE_WAIT_INLINE * 2
        while True:
            if first is not None:
                now, wait, key = first
                first = None
            else:
                now = time.time()
                wait, key = await asyncio.to_thread(self.limiter.reserve, budgets, now, max_wait=RATE_WAIT_INLINE)
            if key:
                raise ApplicationError(
                    f"rate limit {key}: next slot in {wait:.1f}s",
                    type=ErrorType.RATE_LIMITED,
                    next_retry_delay=timedelta(seconds=wait),
                )
            if wait <= 0:
                return
            await asyncio.sleep(wait)
            if time.time() - (now + wait) <= RATE_LATE_TOLERANCE:
                return
            if time.monotonic() > deadline:  # the worker is too busy to keep a slot: Temporal retries
                raise ApplicationError(
                    "rate limit: woke up too late for the booked slots",
                    type=ErrorType.RATE_LIMITED,
                    next_retry_delay=timedelta(seconds=1),
                )

    def _prepare_send(
        self, input: SendMessageInput, reserve: bool = True, known: tuple[Row, dict] | None = None
    ) -> SendMessageResult | _Prepared:
        """The checks before a send, in one trip to the database thread: the
        recorded result when this idempotency key was sent already, else the
        channel's credentials once the messaging window allows the send, with
        the first reservation of its rate budgets made (with ``reserve``;
        not when a profile lookup comes between the checks and the send).
        ``known``: the channel's row and the contact's values, read (and
        written) a moment ago in this thread by ``record_inbound``."""
        with self.engine.connect() as conn:
            sent_id = conn.execute(SENT_ID, {"key": input.idempotency_key}).scalar()
            if sent_id is None:
                if known is None:
                    channel = conn.execute(CHANNEL_BY_ID, {"channel_id": input.channel_id}).first()
                else:
                    channel = known[0]
                creds = credentials_of(channel, self.vault, input.channel_id, allow_statuses={"active"})
                contact = None
                if creds.platform != "telegram" and not input.comment_id:
                    if known is None:
                        row = conn.execute(CONTACT_BY_ID, {"contact_id": input.contact_id}).mappings().first()
                        contact = dict(row) if row is not None else None
                    else:
                        contact = known[1]
                    self._check_window(input, contact["last_inbound_at"] if contact else None)
        if sent_id is not None:
            if input.completes_run is not None:
                write_run(self.engine, input.completes_run)
            return SendMessageResult(platform_message_id=sent_id, deduplicated=True)
        budgets = send_budgets(
            creds.platform,
            creds.external_id,
            input.recipient_id,
            private_reply=bool(input.comment_id),
            human=input.human_agent,
            settings=self.settings,
        )
        if not reserve:
            # The profile lookup comes first: a cell booked now could be
            # used late, so the budgets are reserved after it.
            return _Prepared(creds, budgets, None, contact)
        now = time.time()
        wait, key = self.limiter.reserve(budgets, now, max_wait=RATE_WAIT_INLINE)
        return _Prepared(creds, budgets, (now, wait, key), contact)

    def _existing_send(self, key: str) -> str | None:
        with Session(self.engine) as db:
            record = db.get(SendRecord, key)
            return record.platform_message_id if record else None

    def _record_send(
        self,
        input: SendMessageInput,
        creds: ChannelCredentials,
        message_id: str,
        sent_at: datetime,
        names: dict[str, str] | None = None,
    ) -> None:
        """The idempotency record, the message log row, the token-use audit
        entry, the names of the contact's profile (``names``) and the run
        this send completes, in one transaction of Core statements (the
        ORM's unit of work cost three times the CPU)."""
        try:
            with self.engine.begin() as conn:
                if names:
                    fill_names(conn, input.contact_id, names)
                self._insert_send_rows(conn, input, creds, message_id, sent_at)
                if input.completes_run is not None:
                    created = write_run_in(conn, input.completes_run)
            if input.completes_run is not None and created:
                RUNS_STARTED.labels(trigger="any").inc()
            return
        except IntegrityError:
            pass  # a concurrent attempt recorded the same send (or wrote the run first)
        if names:
            with self.engine.begin() as conn:
                fill_names(conn, input.contact_id, names)
        try:
            with self.engine.begin() as conn:
                self._insert_send_rows(conn, input, creds, message_id, sent_at)
        except IntegrityError:
            pass
        if input.completes_run is not None:
            write_run(self.engine, input.completes_run)

    @staticmethod
    def _insert_send_rows(
        conn: Connection, input: SendMessageInput, creds: ChannelCredentials, message_id: str, sent_at: datetime
    ) -> None:
        now = utcnow()
        conn.execute(
            INSERT_SEND_RECORD,
            {
                "idempotency_key": input.idempotency_key,
                "channel_id": input.channel_id,
                "platform_message_id": message_id,
                "created_at": now,
            },
        )
        conn.execute(
            INSERT_MESSAGE,
            {
                "workspace_id": creds.workspace_id,
                "channel_id": input.channel_id,
                "contact_id": input.contact_id,
                "direction": "out",
                "kind": "message",
                # PostgreSQL text cannot hold NUL (an AI reply may carry one):
                # a failed write here would make every retry send again.
                "text": input.text.replace("\x00", ""),
                "payload": "",
                "platform_event_id": message_id,
                "run_id": input.run_id,
                "created_at": sent_at,
            },
        )
        audit_in(conn, creds.workspace_id, "worker", "token.use", input.channel_id, "send_message")

    def _check_window(self, input: SendMessageInput, last: datetime | None) -> None:
        """Meta only delivers within 24 h of the person's last message (7 days
        for human-agent replies). A send outside is not attempted blindly."""
        window = HUMAN_AGENT_WINDOW if input.human_agent else STANDARD_WINDOW
        if last is None:
            raise ApplicationError(
                "outside the messaging window: the person has not written to us",
                type=ErrorType.OUTSIDE_WINDOW,
                non_retryable=True,
            )
        if last.tzinfo is None:
            last = last.replace(tzinfo=UTC)
        age = utcnow() - last
        if age > window:
            raise ApplicationError(
                f"outside the {'7-day human-agent' if input.human_agent else '24-hour'} messaging window: "
                f"the person last wrote {int(age.total_seconds() // 3600)} h ago",
                type=ErrorType.OUTSIDE_WINDOW,
                non_retryable=True,
            )

    @activity.defn(name="reply_to_comment")
    async def reply_to_comment(self, input: PublicReplyInput) -> SendMessageResult:
        """A public reply under a top-level comment (once per idempotency key)."""
        existing = await asyncio.to_thread(self._existing_send, input.idempotency_key)
        if existing is not None:
            return SendMessageResult(platform_message_id=existing, deduplicated=True)
        creds = await asyncio.to_thread(
            load_credentials, self.engine, self.vault, input.channel_id, allow_statuses={"active"}
        )
        client = self.instagram if creds.platform == "instagram" else self.graph
        await self._take_rate_budget(public_reply_budgets(creds.external_id))
        try:
            reply_id = await client.reply_to_comment(input.comment_id, creds.token, input.text)
        except PlatformError as err:
            raise to_application_error(err, engine=self.engine, channel_id=input.channel_id) from None
        await asyncio.to_thread(self._record_public_reply, input, reply_id)
        return SendMessageResult(platform_message_id=reply_id)

    def _record_public_reply(self, input: PublicReplyInput, reply_id: str) -> None:
        with Session(self.engine) as db:
            db.add(SendRecord(idempotency_key=input.idempotency_key, channel_id=input.channel_id,
                              platform_message_id=reply_id))
            try:
                db.commit()
            except IntegrityError:
                db.rollback()

    @activity.defn(name="record_inbound")
    async def record_inbound(self, input: RecordInboundInput) -> RecordInboundResult:
        """Record an inbound event (``record_inbound_event``) and, with
        ``first_reply``, answer it (``_FirstReply``): the event matched
        against the channel's automations as the conversation matches it, and
        a flow that opens with a message has it sent here (``send_message``,
        same input as the conversation's own send would have) instead of by a
        second local activity. One try, on the first attempt only: a failed
        send is reported (``FirstSend.error_type``) and the run sends it
        durably; a retried attempt leaves the send to the conversation.

        When the event of a Meta contact without a name (new, or whose
        earlier messages started nothing) starts an automation, their profile
        is then looked up while the event is being recorded (the flow's
        messages may greet them by name) and the contact comes back looked up
        (``is_new`` False, names saved), so neither the send nor the
        conversation looks it up again. A message that starts nothing brings
        no lookup here: the conversation has ``fetch_profile`` look it up
        once it has routed the event, off the reply path."""
        try:
            if not (input.first_reply and activity.info().attempt == 1):
                return await asyncio.to_thread(record_inbound_event, self.engine, input)
            first = _FirstReply(self, input)
            record = await asyncio.to_thread(
                record_inbound_event, self.engine, input, first.on_unnamed_contact, first.plan
            )
        except Exception as err:
            if not refused_content(err):
                raise
            raise unrecordable(input, err) from None
        return await first.answer(record)

    async def _save_looked_up(self, record: RecordInboundResult, lookup: asyncio.Future[dict[str, str] | None]) -> None:
        """The contact of ``record`` once its profile lookup is done: the
        names found saved, and not new any more (nobody looks it up again)."""
        if record.contact is None or record.duplicate or not record.channel_active:
            lookup.cancel()
            return
        names = await lookup
        saved = await asyncio.to_thread(apply_profile, self.engine, record.contact.id, names) if names else None
        record.contact = saved or replace(record.contact, is_new=False)

    @activity.defn(name="send_message")
    async def send_message(self, input: SendMessageInput) -> SendMessageResult:
        """Send one message to a contact (``_send``), and record the run it
        completes, if any, with it (also when it was found sent already).
        A new contact's profile is looked up by this activity (one activity
        instead of two): with ``profile_first_template``, before the send,
        the message rendered for it and the names saved with the send's
        records; with ``then_fetch_profile``, once the message is out."""
        return await self._send_message(input)

    async def _send_message(
        self,
        input: SendMessageInput,
        names: Awaitable[dict[str, str] | None] | None = None,
        checked: _Prepared | SendMessageResult | None = None,
    ) -> SendMessageResult:
        """``send_message``; ``names``: its profile lookup, started already;
        ``checked``: its checks, made already (``_prepare_send``)."""
        profile = _ProfileFirst() if input.profile_first_template else None
        result, creds = await self._send_with_credentials(input, profile, names, checked)
        if profile is not None and profile.looked_up:
            result.profile_looked_up, result.contact, result.text = True, profile.contact, profile.text
            if result.deduplicated and profile.names:  # sent before: its records are written already
                result.contact = await asyncio.to_thread(apply_profile, self.engine, input.contact_id, profile.names)
        elif input.then_fetch_profile:
            result.contact = await self._look_up_profile(input, creds, names)
            result.profile_looked_up = True
        return result

    async def _render_for_profile(
        self, input: SendMessageInput, prepared: _Prepared, profile: _ProfileFirst, names: dict[str, str] | None
    ) -> SendMessageInput:
        """``profile_first_template``: the template rendered for the contact
        with the names of its profile lookup (None: it failed)."""
        profile.looked_up, profile.text = True, input.text
        if not names or prepared.contact is None:
            return input
        profile.names = names
        profile.contact = snapshot(SimpleNamespace(**with_names(prepared.contact, names)))
        input = self._rendered_for(input, profile.contact)
        profile.text = input.text
        return input

    @staticmethod
    def _rendered_for(input: SendMessageInput, contact: ContactSnapshot) -> SendMessageInput:
        """The input with its template rendered for the looked-up contact
        (and the completed run's trail showing that text)."""
        text = flowrt.render(input.profile_first_template, contact, {})
        run = input.completes_run
        if run is not None and run.trail:
            run = replace(run, trail=[*run.trail[:-1], replace(run.trail[-1], detail=text[:200])])
        return replace(input, text=text, completes_run=run)

    async def _names_of(self, creds: ChannelCredentials, external_id: str) -> dict[str, str] | None:
        """A Meta contact's names from their profile (two attempts, as the
        ``fetch_profile`` activity's retry policy gives), or None. Best
        effort: a failure is logged (an invalid token still marks the
        channel), never raised, and the lookup gets at most PROFILE_LOOKUP
        seconds so the send's own timeout is never at stake."""
        if creds.platform == "telegram":
            return None
        client = self.instagram if creds.platform == "instagram" else self.graph

        async def attempts() -> dict[str, str]:
            for attempt in range(PROFILE_ATTEMPTS):
                try:
                    return await get_profile(client, creds, external_id)
                except PlatformError as err:
                    if not err.retryable or attempt + 1 == PROFILE_ATTEMPTS:
                        raise
                await asyncio.sleep(PROFILE_RETRY_SECONDS)
            raise AssertionError("unreachable")

        try:
            return await asyncio.wait_for(attempts(), PROFILE_LOOKUP)
        except PlatformError as err:
            failure = to_application_error(err, engine=self.engine, channel_id=creds.channel_id)
            log.info("profile lookup failed: %s", failure.type)
        except TimeoutError:
            log.info("profile lookup failed: TimeoutError")
        except Exception as err:  # noqa: BLE001 - best effort: the message goes out without the name
            log.warning("profile lookup failed: %s", type(err).__name__)
        return None

    async def _look_up_profile(
        self,
        input: SendMessageInput,
        creds: ChannelCredentials | None,
        names: Awaitable[dict[str, str] | None] | None = None,
    ) -> ContactSnapshot | None:
        """``then_fetch_profile``: the contact's profile once the message is
        out (``names``: the lookup already under way), saved. Best effort,
        as ``_names_of``."""
        if names is None:
            try:
                if creds is None:  # the send was found recorded already
                    creds = await asyncio.to_thread(
                        load_credentials, self.engine, self.vault, input.channel_id, allow_statuses={"active"}
                    )
            except ApplicationError as err:
                log.info("profile lookup failed: %s", err.type)
                return None
            names = self._names_of(creds, input.recipient_id)
        found = await names
        return await asyncio.to_thread(apply_profile, self.engine, input.contact_id, found) if found else None

    @activity.defn(name="send_broadcast_batch")
    async def send_broadcast_batch(self, input: BroadcastBatchInput) -> BroadcastBatchResult:
        """Send one broadcast page, one recipient after the other.

        Each message goes through ``_send`` (idempotency record, window
        check, rate budgets), so a retried batch never sends twice. One
        sequential sender per page keeps a paced budget's slots in order
        (no activity per recipient competing for them) and costs one
        activity instead of hundreds. Progress is heartbeated after every
        recipient; a retry resumes from it. A recipient outside the window
        is skipped and one the platform refuses is counted failed; throttling
        and rate-limit waits longer than the inline wait fail the attempt
        with the wait as next_retry_delay (Temporal holds the batch durably),
        and an unusable channel (token invalid, disconnected) stops the batch
        with the reason in ``stopped``.

        The page's contacts are read again when the batch starts: the text
        is rendered for each (``{{contact.*}}``), and a contact deleted,
        restricted or handed to a human since the page was chosen is skipped
        (``deleted``, ``restricted``, ``human_takeover``).
        """
        start, result = 0, BroadcastBatchResult()
        details = activity.info().heartbeat_details
        if details:
            start = int(details[0])
            result = BroadcastBatchResult(sent=int(details[1]), failed=int(details[2]), skipped=dict(details[3]))
        pending = input.recipients[start:]
        contacts = await asyncio.to_thread(self._broadcast_contacts, [r.contact_id for r in pending])
        personal = flowrt.uses_contact(input.text)
        for index, recipient in enumerate(pending, start):
            contact = contacts.get(recipient.contact_id)
            reason = "deleted" if contact is None else held_back(contact)
            if reason:
                result.skipped[reason] = result.skipped.get(reason, 0) + 1
                activity.heartbeat(index + 1, result.sent, result.failed, result.skipped)
                continue
            try:
                await self._send(
                    SendMessageInput(
                        channel_id=input.channel_id,
                        contact_id=recipient.contact_id,
                        recipient_id=recipient.external_id,
                        idempotency_key=f"{input.key_prefix}/{recipient.contact_id}",
                        text=flowrt.render(input.text, snapshot(contact)) if personal else input.text,
                        quick_replies=input.quick_replies,
                        buttons=input.buttons,
                    )
                )
                # A send found already recorded beyond the heartbeated
                # progress was made by the previous attempt: not counted yet.
                result.sent += 1
            except ApplicationError as err:
                if err.type == ErrorType.OUTSIDE_WINDOW:
                    result.skipped["outside_window"] = result.skipped.get("outside_window", 0) + 1
                elif err.type == ErrorType.PLATFORM_REJECTED:
                    result.failed += 1
                elif err.type in (ErrorType.TOKEN_INVALID, ErrorType.CHANNEL_UNAVAILABLE):
                    result.stopped = f"{err.type}: {err.message}"
                    return result
                else:
                    raise
            activity.heartbeat(index + 1, result.sent, result.failed, result.skipped)
        return result

    def _broadcast_contacts(self, contact_ids: list[str]) -> dict[str, SimpleNamespace]:
        """The contacts of a broadcast page, as they are now, by id."""
        with self.engine.connect() as conn:
            rows = conn.execute(select(CONTACTS).where(CONTACTS.c.id.in_(contact_ids))).mappings().all()
        return {row["id"]: SimpleNamespace(**row) for row in rows}

    async def _send(self, input: SendMessageInput) -> SendMessageResult:
        return (await self._send_with_credentials(input))[0]

    async def _send_with_credentials(
        self,
        input: SendMessageInput,
        profile: _ProfileFirst | None = None,
        names: Awaitable[dict[str, str] | None] | None = None,
        checked: _Prepared | SendMessageResult | None = None,
    ) -> tuple[SendMessageResult, ChannelCredentials | None]:
        """Send one message to a contact; also returns the channel's
        credentials (None when the send was found recorded already). With
        ``profile``, the message is rendered for the contact's profile
        (looked up once the checks passed, or ``names``: the lookup under
        way already) and their names are recorded with the send; its rate
        budgets are booked once the names are in. ``checked``: the checks'
        answer, when the caller made them.

        Before calling the platform, the idempotency record is checked: an
        attempt that finds a recorded platform message id returns it without
        sending again. The record is written as soon as the platform accepts.
        After the idempotency and window checks and before the platform call,
        one cell of each rate budget is taken (``send_budgets``): a send over
        budget is delayed (slept, or retried by Temporal after the wait),
        never dropped.
        """
        found: dict[str, str] | None = None
        if profile is not None and names is not None:
            found = await names
        # The rate-budget cells are booked with the checks unless a profile
        # lookup is still to come between them and the send.
        reserve = profile is None or names is not None
        prepared = checked if checked is not None else await asyncio.to_thread(self._prepare_send, input, reserve)
        if isinstance(prepared, SendMessageResult):
            if profile is not None and names is not None:
                profile.looked_up, profile.text, profile.names = True, input.text, found
            return prepared, None
        creds = prepared.creds
        if profile is not None:
            if names is None and prepared.contact is not None:
                found = await self._names_of(creds, input.recipient_id)
            input = await self._render_for_profile(input, prepared, profile, found)
        await self._take_rate_budget(prepared.budgets, prepared.reservation)
        # The log orders by the moment we asked the platform to deliver, not
        # when its answer came back (the person may already be replying).
        sent_at = utcnow()
        try:
            if creds.platform == "telegram":
                body = build_telegram_message(input.recipient_id, input.text, input.quick_replies, input.buttons)
                message_id = await self.telegram.send_message(creds.token, body)
            else:
                client = self.instagram if creds.platform == "instagram" else self.graph
                body = build_meta_message(
                    input.recipient_id, input.text, input.quick_replies, input.buttons, human_agent=input.human_agent
                )
                if input.comment_id:
                    body["recipient"] = {"comment_id": input.comment_id}
                message_id = await client.send_message(creds.external_id, creds.token, body)
        except PlatformError as err:
            raise to_application_error(err, engine=self.engine, channel_id=input.channel_id) from None
        names = profile.names if profile is not None else None
        await asyncio.to_thread(self._record_send, input, creds, message_id, sent_at, names)
        return SendMessageResult(platform_message_id=message_id), creds

    @activity.defn(name="acknowledge_callback")
    async def acknowledge_callback(self, input: AckCallbackInput) -> None:
        """Answer a Telegram inline-button callback so the client stops its spinner."""
        creds = await asyncio.to_thread(
            load_credentials, self.engine, self.vault, input.channel_id, allow_statuses={"active"}
        )
        if creds.platform != "telegram":
            return
        try:
            await self.telegram.answer_callback_query(creds.token, input.callback_query_id)
        except PlatformError as err:
            raise to_application_error(err, engine=self.engine, channel_id=input.channel_id) from None
