"""CRM activities: contacts, the message log, run records.

Synchronous (they run on the worker's thread pool) and idempotent: a retry
after a crash finds its own earlier write and does not repeat it.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable
from datetime import UTC, datetime
from types import SimpleNamespace

from sqlalchemy import Connection, Engine, Row, bindparam, case
from sqlalchemy.exc import IntegrityError
from sqlmodel import Session, select
from temporalio import activity
from temporalio.exceptions import ApplicationError

from activities.common import ChannelCredentials, load_credentials, to_application_error
from core import flowrt
from core.contracts import (
    AutomationSnapshot,
    ContactRef,
    ContactSnapshot,
    ErrorType,
    ProfileInput,
    RecordInboundInput,
    RecordInboundResult,
    RecordRunInput,
    UpdateContactInput,
)
from core.crypto import TokenVault
from core.db import Automation, Channel, Contact, Message, Run, utcnow
from core.flowrt import TRIGGERING_KINDS
from core.limits import (
    MAX_CARRIED_DEFINITION,
    MAX_FIELD_KEY,
    MAX_FIELD_VALUE,
    MAX_FIELDS,
    MAX_FIELDS_SIZE,
    MAX_NAME,
    MAX_TAG,
    MAX_TAGS,
    fields_refused,
    json_size,
    value_length,
)
from core.observability import EVENTS_DEDUPLICATED, RUNS_STARTED
from core.platforms import GraphClient, PlatformError

log = logging.getLogger(__name__)

TERMINAL_RUN_STATES = {"completed", "failed", "cancelled", "terminated"}
# Tables for the Core statements of the hot path (one event, one send).
CHANNELS, CONTACTS, MESSAGES, RUNS = Channel.__table__, Contact.__table__, Message.__table__, Run.__table__
AUTOMATIONS = Automation.__table__

# The hot path's statements, built once with bound parameters: building a
# statement (and its cache key) on every call cost more CPU than SQLite
# took to run it.
CHANNEL_BY_ID = select(CHANNELS).where(CHANNELS.c.id == bindparam("channel_id"))
CONTACT_BY_ID = select(CONTACTS).where(CONTACTS.c.id == bindparam("contact_id"))
# SET takes the columns of the parameters given.
UPDATE_CONTACT = CONTACTS.update().where(CONTACTS.c.id == bindparam("b_contact_id"))
INSERT_CONTACT = CONTACTS.insert()
INSERT_MESSAGE = MESSAGES.insert()
NAME_FIELDS = ("first_name", "last_name", "username")
# Each empty name field filled (b_<field>), a name already known kept.
FILL_NAMES = (
    CONTACTS.update()
    .where(CONTACTS.c.id == bindparam("b_contact_id"))
    .values({f: case((CONTACTS.c[f] == "", bindparam(f"b_{f}", type_=CONTACTS.c[f].type)), else_=CONTACTS.c[f])
             for f in NAME_FIELDS}
            | {"updated_at": bindparam("b_updated_at")})
)
RUN_STATUS = select(RUNS.c.status).where(RUNS.c.id == bindparam("run_id"))
INSERT_RUN = RUNS.insert()
UPDATE_RUN = RUNS.update().where(RUNS.c.id == bindparam("b_run_id"))
ACTIVE_AUTOMATIONS = (
    select(AUTOMATIONS.c.id, AUTOMATIONS.c.version, AUTOMATIONS.c.name, AUTOMATIONS.c.definition)
    .where(AUTOMATIONS.c.channel_id == bindparam("channel_id"), AUTOMATIONS.c.status == "active")
    .order_by(AUTOMATIONS.c.created_at)
)


def snapshot(
    contact: Contact | SimpleNamespace, *, is_new: bool = False, reads: set[str] | None = None
) -> ContactSnapshot:
    """The workflow's view of a contact (an ORM row, or a Core row's values):
    a projection within core/limits.py's limits, so a contact stored before
    them (or grown by flows) cannot outgrow a payload; ``reads``: only the
    fields of these (lowercased) names (``flowrt.fields_read``)."""
    return ContactSnapshot(
        id=contact.id,
        external_id=contact.external_id,
        first_name=(contact.first_name or "")[:MAX_NAME],
        last_name=(contact.last_name or "")[:MAX_NAME],
        username=(contact.username or "")[:MAX_NAME],
        fields=bounded_fields(contact.fields or {}, reads),
        tags=[t[:MAX_TAG] for t in list(contact.tags or [])[:MAX_TAGS] if isinstance(t, str)],
        human_takeover=contact.human_takeover,
        is_new=is_new,
        processing_restricted=contact.processing_restricted,
        consent_withdrawn=contact.consent_withdrawn,
    )


def bounded_fields(fields: dict, reads: set[str] | None = None) -> dict:
    """A contact's fields within the limits, in their order: a longer string
    value cut to MAX_FIELD_VALUE, a field whose key (empty, or over its
    limit: no flow can name it) or other value is over its limit left out,
    and no more than MAX_FIELDS fields or MAX_FIELDS_SIZE
    bytes of JSON (the ones after left out)."""
    out: dict = {}
    budget = MAX_FIELDS_SIZE
    for key, value in fields.items():
        if len(out) >= MAX_FIELDS:
            break
        if not isinstance(key, str) or not 0 < len(key) <= MAX_FIELD_KEY:
            continue
        if reads is not None and key.lower() not in reads:
            continue
        if isinstance(value, str):
            value = value[:MAX_FIELD_VALUE]
        elif value_length(value) > MAX_FIELD_VALUE:
            continue
        size = json_size({key: value})
        if size > budget:
            continue
        budget -= size
        out[key] = value
    return out


def _active_automations(conn: Connection, channel_id: str) -> list[AutomationSnapshot]:
    rows = conn.execute(ACTIVE_AUTOMATIONS, {"channel_id": channel_id}).all()
    return [AutomationSnapshot(id=a.id, version=a.version, name=a.name, definition=a.definition) for a in rows]


def _candidates(conn: Connection, input: RecordInboundInput) -> list[AutomationSnapshot]:
    """The channel's active automations, when the event can start one at all
    (a reaction or a read receipt cannot: they are not read)."""
    return _active_automations(conn, input.channel_id) if input.event.kind in TRIGGERING_KINDS else []


def matched_automations(
    input: RecordInboundInput, automations: list[AutomationSnapshot], contact: ContactSnapshot, *, first_message: bool
) -> list[AutomationSnapshot]:
    """What the conversation needs of the channel's automations for this
    event: the one it starts, or none. The conversation matches the event
    again, against these with the same inputs (``flowrt.select_automation``,
    the same matching rules), so it selects the same one; its history
    carries one automation instead of every active one of the channel (a
    channel's automations outgrew Temporal's payload limit)."""
    if flowrt.held_from_triggers(input.event.kind, contact):
        return []
    automation = flowrt.select_automation(
        automations, input.event, is_first_message=first_message, matching=input.matching
    )
    if automation is None:
        return []
    size = json_size(automation.definition)
    if size > MAX_CARRIED_DEFINITION:
        # Stored before the limits: carried, it would fail the conversation's task in a loop.
        log.warning("automation %s not started: its definition is %d bytes (MAX_CARRIED_DEFINITION %d)",
                    automation.id, size, MAX_CARRIED_DEFINITION)
        return []
    return [automation]


def _match_result(
    input: RecordInboundInput,
    contact: SimpleNamespace | Contact,
    automations: list[AutomationSnapshot],
    *,
    is_new: bool,
    has_previous: bool,
) -> RecordInboundResult:
    """The result for an event: the automation it starts, if any, and the
    contact with only the fields that automation reads."""
    matched = matched_automations(input, automations, snapshot(contact, reads=set()), first_message=not has_previous)
    reads = flowrt.fields_read(matched[0].definition) if matched else set()
    return RecordInboundResult(
        duplicate=False,
        contact=snapshot(contact, is_new=is_new, reads=reads),
        automations=matched,
        has_previous_inbound=has_previous,
    )


# Events that open Meta's messaging window (a comment does not).
WINDOW_KINDS = ("message", "postback", "referral", "story_mention")


def record_inbound_event(
    engine: Engine,
    input: RecordInboundInput,
    on_unnamed_contact: Callable[[Row, list[AutomationSnapshot]], None] | None = None,
    then: Callable[[RecordInboundResult, Row, dict], None] | None = None,
) -> RecordInboundResult:
    """Log an inbound event, create or refresh its contact, and return the
    automation it starts (``_match_result``; the database half of the
    ``record_inbound`` activity, on the worker's thread pool).

    A contact without any name (new, or never looked up: nothing it wrote
    before started an automation) comes back ``is_new``, so its profile is
    looked up when an automation needs it. ``on_unnamed_contact`` is called
    with the channel's row and the automation the event starts (a list of
    one, or empty) as soon as the event turns out to come from such
    a contact (before its rows are written), so the caller can start that
    lookup while they are. ``then`` is called once the event is recorded (not for a
    duplicate), on the same thread, with the result, the channel's row and
    the contact's values as written, so the caller's next checks need not
    read them again.

    The message row is unique per (channel, platform event id): a
    redelivered event comes back ``duplicate=True`` and nothing runs. A row
    written by the same ``recorder`` is this event's own earlier attempt (the
    worker stopped after the commit, before Temporal had the result): it is
    answered as it was then, so a crash never drops the reply. One
    transaction of Core statements (this runs for every event; the ORM's
    unit of work cost about twice as much CPU).
    """
    ev = input.event
    now = utcnow()
    try:
        with engine.begin() as conn:
            channel = conn.execute(CHANNEL_BY_ID, {"channel_id": input.channel_id}).first()
            if channel is None or channel.status != "active":
                return RecordInboundResult(duplicate=False, channel_active=False)
            row = conn.execute(CONTACT_BY_ID, {"contact_id": input.contact_id}).mappings().first()
            is_new = row is None
            has_previous = bool(row and row["last_inbound_at"])
            contact = dict(row) if row is not None else {
                "id": input.contact_id, "workspace_id": input.workspace_id, "channel_id": input.channel_id,
                "external_id": ev.sender_id, "first_name": "", "last_name": "", "username": "", "tags": [],
                "fields": {}, "human_takeover": False, "processing_restricted": False,
                "consent_withdrawn": False, "last_inbound_at": None, "created_at": now,
            }
            changes: dict = {"updated_at": now}
            for attr in ("first_name", "last_name", "username"):
                value = getattr(ev, attr)
                if value:
                    changes[attr] = value
            if ev.kind in WINDOW_KINDS:
                changes["last_inbound_at"] = now
            contact.update(changes)
            unnamed = _unnamed(contact)
            result = _match_result(
                input, SimpleNamespace(**contact), _candidates(conn, input),
                is_new=is_new or unnamed, has_previous=has_previous,
            )
            if unnamed and on_unnamed_contact is not None:
                on_unnamed_contact(channel, result.automations)
            if is_new:
                conn.execute(INSERT_CONTACT, contact)
            else:
                conn.execute(UPDATE_CONTACT, {"b_contact_id": input.contact_id, **changes})
            conn.execute(
                INSERT_MESSAGE,
                {
                    "workspace_id": input.workspace_id,
                    "channel_id": input.channel_id,
                    "contact_id": input.contact_id,
                    "direction": "in",
                    "kind": ev.kind,
                    "text": ev.text,
                    "payload": ev.payload or ev.ref,
                    "platform_event_id": ev.event_id,
                    "run_id": "",
                    "recorded_by": input.recorder,
                    "truncated": ev.truncated,
                    "created_at": _event_time(ev.timestamp_ms, now),
                },
            )
    except IntegrityError:
        retried = _own_earlier_record(engine, input)
        if retried is not None:
            return retried
        EVENTS_DEDUPLICATED.inc()
        return RecordInboundResult(duplicate=True)
    if then is not None:
        then(result, channel, contact)
    return result


def _event_time(timestamp_ms: int, now: datetime) -> datetime:
    """When the person sent it, by the platform's clock (ours when it gave
    none, or none that is a time: the event is still recorded)."""
    if not timestamp_ms:
        return now
    try:
        return datetime.fromtimestamp(timestamp_ms / 1000, UTC)
    except (OverflowError, ValueError, OSError):
        return now


def _unnamed(contact) -> bool:
    return not (contact["first_name"] or contact["last_name"] or contact["username"])


def _own_earlier_record(engine: Engine, input: RecordInboundInput) -> RecordInboundResult | None:
    """The answer to the event when this recorder wrote its row already:
    the contact as it is, and whether it was new then (no message of the
    contact before this one) or had written before (an earlier inbound
    message that opens the window). None for a real redelivery."""
    if not input.recorder:
        return None
    with engine.connect() as conn:
        row = conn.execute(
            select(MESSAGES.c.id, MESSAGES.c.recorded_by).where(
                MESSAGES.c.channel_id == input.channel_id,
                MESSAGES.c.platform_event_id == input.event.event_id,
            )
        ).first()
        if row is None or row.recorded_by != input.recorder:
            return None
        status = conn.execute(select(CHANNELS.c.status).where(CHANNELS.c.id == input.channel_id)).scalar()
        contact = conn.execute(select(CONTACTS).where(CONTACTS.c.id == input.contact_id)).mappings().first()
        if status != "active" or contact is None:
            return RecordInboundResult(duplicate=False, channel_active=status == "active")
        earlier = conn.execute(
            select(MESSAGES.c.direction, MESSAGES.c.kind).where(
                MESSAGES.c.contact_id == input.contact_id, MESSAGES.c.id < row.id
            )
        ).all()
        automations = _candidates(conn, input)
    return _match_result(
        input, SimpleNamespace(**contact), automations,
        is_new=not earlier or _unnamed(contact),
        has_previous=any(m.direction == "in" and m.kind in WINDOW_KINDS for m in earlier),
    )


def _with_set_fields(contact_id: str, fields: dict, changes: dict) -> dict:
    """``fields`` with a flow's ``set_fields`` applied within the limits."""
    for key, value in changes.items():
        if isinstance(value, str):
            value = value[:MAX_FIELD_VALUE]
        updated = {**fields, key: value}
        refused = fields_refused(fields, updated)
        if refused:
            log.warning("contact %s: field %r is not set: %s", contact_id, key, refused)
            continue
        fields = updated
    return fields


class CrmActivities:
    def __init__(self, engine: Engine):
        self.engine = engine

    @activity.defn(name="load_match_context")
    def load_match_context(self, input: RecordInboundInput) -> RecordInboundResult:
        """What trigger matching needs, without recording anything (for an
        event that was recorded already)."""
        with Session(self.engine, expire_on_commit=False) as db:
            channel = db.get(Channel, input.channel_id)
            contact = db.get(Contact, input.contact_id)
            if channel is None or channel.status != "active" or contact is None:
                return RecordInboundResult(duplicate=False, channel_active=channel is not None and channel.status == "active")
            return _match_result(
                input, contact, _candidates(db.connection(), input), is_new=False, has_previous=True
            )

    @activity.defn(name="load_contact")
    def load_contact(self, input: ContactRef) -> ContactSnapshot | None:
        with Session(self.engine) as db:
            contact = db.get(Contact, input.contact_id)
            return snapshot(contact) if contact else None

    @activity.defn(name="update_contact")
    def update_contact(self, input: UpdateContactInput) -> ContactSnapshot:
        """Apply tag/field/takeover changes. Idempotent: adding a tag twice or
        setting the same value again leaves the same state.

        A flow's writes keep to the API's limits (core/limits.py): a string
        value is cut to MAX_FIELD_VALUE (a rendered template or a saved reply
        can be longer), and a tag or field that would take the contact over
        its count or size is not added (logged)."""
        with Session(self.engine, expire_on_commit=False) as db:
            contact = db.get(Contact, input.contact_id)
            if contact is None:
                raise ApplicationError(
                    f"contact {input.contact_id} no longer exists", type=ErrorType.CONTACT_GONE, non_retryable=True
                )
            tags = list(contact.tags or [])
            lowered = {t.lower() for t in tags}
            for tag in input.add_tags:
                if tag.lower() not in lowered:
                    if len(tags) >= MAX_TAGS:
                        log.warning("contact %s has %d tags (MAX_TAGS): a tag is not added", contact.id, len(tags))
                        continue
                    tags.append(tag[:MAX_TAG])
                    lowered.add(tag.lower())
            removing = {t.lower() for t in input.remove_tags}
            tags = [t for t in tags if t.lower() not in removing]
            fields = _with_set_fields(contact.id, dict(contact.fields or {}), input.set_fields)
            contact.tags = tags
            contact.fields = fields
            if input.human_takeover is not None:
                contact.human_takeover = input.human_takeover
            contact.updated_at = utcnow()
            db.add(contact)
            db.commit()
            return snapshot(contact)

    @activity.defn(name="record_run")
    def record_run(self, input: RecordRunInput) -> None:
        """Create or update the run's row (status and step trail)."""
        write_run(self.engine, input)


def write_run(engine: Engine, input: RecordRunInput) -> None:
    """Create or update a run's row (status and step trail). A terminal
    status is never overwritten by a late non-terminal one."""
    try:
        with engine.begin() as conn:
            created = write_run_in(conn, input)
    except IntegrityError:
        # A concurrent first write of the same run won; apply ours on top.
        with engine.begin() as conn:
            created = write_run_in(conn, input)
    if created:
        RUNS_STARTED.labels(trigger="any").inc()


def write_run_in(conn: Connection, input: RecordRunInput) -> bool:
    """``write_run`` inside the caller's transaction (Core statements);
    True when it created the row."""
    status = conn.execute(RUN_STATUS, {"run_id": input.run_id}).scalar()
    if status in TERMINAL_RUN_STATES and input.status not in TERMINAL_RUN_STATES:
        return False
    values = {
        "status": input.status,
        "trail": [
            {"step_id": t.step_id, "type": t.type, "status": t.status, "at": t.at, "detail": t.detail}
            for t in input.trail
        ],
    }
    if input.status in TERMINAL_RUN_STATES:
        values["ended_at"] = utcnow()
    if status is None:
        conn.execute(
            INSERT_RUN,
            {
                "id": input.run_id,
                "workspace_id": input.workspace_id,
                "channel_id": input.channel_id,
                "contact_id": input.contact_id,
                "automation_id": input.automation_id,
                "version": input.version,
                "started_at": utcnow(),
                "ended_at": None,
                **values,
            },
        )
        return True
    conn.execute(UPDATE_RUN, {"b_run_id": input.run_id, **values})
    return False


class ProfileActivities:
    """Fill in a new Meta contact's name from the platform profile, so the
    CRM shows it and templates greet people by name (the conversation's
    lookup after an event that started nothing; the reply path looks up with
    its send). Telegram updates carry names already."""

    def __init__(self, engine: Engine, vault: TokenVault, graph: GraphClient, instagram: GraphClient):
        self.engine = engine
        self.vault = vault
        self.graph = graph
        self.instagram = instagram

    @activity.defn(name="fetch_profile")
    async def fetch_profile(self, input: ProfileInput) -> ContactSnapshot | None:
        creds = await asyncio.to_thread(
            load_credentials, self.engine, self.vault, input.channel_id, allow_statuses={"active"}
        )
        if creds.platform == "telegram":
            return None
        client = self.instagram if creds.platform == "instagram" else self.graph
        try:
            return await look_up_profile(self.engine, client, creds, input.contact_id, input.external_id)
        except PlatformError as err:
            raise to_application_error(err, engine=self.engine, channel_id=input.channel_id) from None


async def get_profile(client: GraphClient, creds: ChannelCredentials, external_id: str) -> dict[str, str]:
    """A Meta contact's names from the platform profile (``PlatformError``
    when the platform refuses)."""
    # Instagram profiles have name and username only; Pages expose first/last names.
    fields = "name,username" if creds.platform == "instagram" else "first_name,last_name,name"
    profile = await client.get_profile(external_id, creds.token, fields=fields)
    name = str(profile.get("name") or "").strip()
    return {
        "first_name": str(profile.get("first_name") or (name.split()[0] if name else "")).strip()[:200],
        "last_name": str(profile.get("last_name") or "").strip()[:200],
        "username": str(profile.get("username") or "").strip()[:200],
    }


def with_names(contact: dict, names: dict[str, str]) -> dict:
    """A contact row with its empty name fields filled from ``names``."""
    return {**contact, **{field: contact[field] or value for field, value in names.items()}}


def fill_names(conn: Connection, contact_id: str, names: dict[str, str]) -> None:
    """Fill the contact's empty name fields (a name already known, or set by
    someone meanwhile, is kept)."""
    conn.execute(
        FILL_NAMES,
        {"b_contact_id": contact_id, "b_updated_at": utcnow()} | {f"b_{f}": names.get(f, "") for f in NAME_FIELDS},
    )


async def look_up_profile(
    engine: Engine, client: GraphClient, creds: ChannelCredentials, contact_id: str, external_id: str
) -> ContactSnapshot | None:
    """Fill in a Meta contact's empty name fields from the platform profile
    (``PlatformError`` when the platform refuses)."""
    names = await get_profile(client, creds, external_id)
    return await asyncio.to_thread(apply_profile, engine, contact_id, names)


def apply_profile(engine: Engine, contact_id: str, names: dict[str, str]) -> ContactSnapshot | None:
    with engine.begin() as conn:
        fill_names(conn, contact_id, names)
        row = conn.execute(select(CONTACTS).where(CONTACTS.c.id == contact_id)).mappings().first()
    return snapshot(SimpleNamespace(**row)) if row is not None else None
