"""The personal-data map: every table, how its rows are found for one
contact, one channel or one workspace, and from that how each is exported
(data access and portability), erased and expired (retention).

The API's export routes, ``vectory workspace export`` and the erasure and
retention activities all read ``PERSONAL_DATA``; credentials (channel
tokens, webhook secrets, the API key hash, encryption keys) are never
exported. ``tests/test_export.py`` fails when a table is added to the schema
without being declared here.
"""

from __future__ import annotations

import json
import zipfile
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from datetime import UTC, date, datetime
from typing import IO, Any

from sqlalchemy import Engine, Executable, Table, delete, func, or_, select, tuple_, update
from sqlalchemy.sql import ColumnElement
from sqlmodel import Session, SQLModel

from core.db import (
    AiUsage,
    AuditEntry,
    Automation,
    AutomationVersion,
    Broadcast,
    Channel,
    Contact,
    ContactTag,
    DataKey,
    DeadLetter,
    ErasureJob,
    InboxEvent,
    Message,
    RateBucket,
    Run,
    SendRecord,
    Workspace,
    utcnow,
)
from core.ratelimit import buckets_of

BATCH_SIZE = 1000


OPEN_RUN_STATES = ("running", "waiting")


@dataclass(frozen=True)
class Subject:
    """Whose data an erasure deletes: one contact (also when only a dead
    letter of theirs exists), the channels' everything, or the workspace's."""

    scope: str  # "contact" | "channels" | "workspace"
    workspace_id: str
    contact_id: str = ""
    channel_ids: tuple[str, ...] = ()


# Statements for rows that no column names directly (keys that embed ids).
Custom = Callable[[Session, Subject], list[Executable]]


@dataclass(frozen=True)
class PersonalTable:
    """One table of the map.

    Export: ``workspace_scope`` selects the rows of the workspace export
    (``"id"``: the workspace row itself, ``"workspace_id"``, or
    ``"automation_id"``: rows of the workspace's automations); ``None`` with
    ``not_exported`` saying why. ``contact_key`` names the table in the
    contact export. ``excluded`` columns are never exported.

    A contact's rows: ``contact_scope`` is ``"id"`` (the contact itself),
    ``"contact_id"``, ``"run_id"`` (rows of the contact's runs) or
    ``"target"`` (audit entries about the contact); ``contact_custom``
    builds the statements where no column names the contact.

    Erasure deletes a subject's rows, or for ``unlink`` (column, value) only
    overwrites the column that names the contact; ``channel_scope``
    (``"channel_id"``, ``"id"``, ``"automation_id"``) finds an erased
    channel's rows, ``channel_custom`` where no column does;
    ``workspace_column`` an erased workspace's. ``kept`` says why rows
    outlive a workspace's erasure. ``retention`` selects the rows older
    than a cutoff that the daily sweep deletes. ``count`` names the table
    in erasure and retention reports. The map's order is a safe deletion
    order (rows before the rows they point to).
    """

    model: type[SQLModel]
    count: str
    workspace_scope: str | None = None
    not_exported: str = ""
    contact_key: str | None = None
    contact_scope: str | None = None
    contact_custom: Custom | None = None
    excluded: frozenset[str] = frozenset()
    unlink: tuple[str, str] | None = None
    channel_scope: str | None = None
    channel_custom: Custom | None = None
    workspace_column: str | None = None
    kept: str = ""
    retention: Callable[[Table, datetime], ColumnElement[bool]] | None = None

    @property
    def table(self) -> Table:
        return self.model.__table__  # type: ignore[attr-defined]

    @property
    def exported(self) -> bool:
        return self.workspace_scope is not None

    def columns(self) -> list[str]:
        return [c.name for c in self.table.columns if c.name not in self.excluded]


def _send_records_of_contact(db: Session, subject: Subject) -> list[Executable]:
    # A run's sends hold the contact id inside their key, a broadcast's at its end.
    key = SendRecord.__table__.c.idempotency_key  # type: ignore[attr-defined]
    c = subject.contact_id
    return [delete(SendRecord).where(or_(key.contains(f"/{c}/", autoescape=True), key.endswith(f"/{c}", autoescape=True)))]


def _send_records_of_channels(db: Session, subject: Subject) -> list[Executable]:
    return [delete(SendRecord).where(SendRecord.__table__.c.channel_id.in_(_channel_ids(subject)))]  # type: ignore[attr-defined]


def _buckets_of_contact(db: Session, subject: Subject) -> list[Executable]:
    # Telegram's per-chat buckets name the chat id.
    rows = db.execute(
        select(Channel.__table__.c.external_id, Contact.__table__.c.external_id)  # type: ignore[attr-defined]
        .join(Contact, Contact.channel_id == Channel.id)  # type: ignore[arg-type]
        .where(Contact.id == subject.contact_id, Channel.platform == "telegram")  # type: ignore[arg-type]
    ).all()
    return [buckets_of([account], chat_id=chat) for account, chat in rows]


def _buckets_of_channels(db: Session, subject: Subject) -> list[Executable]:
    accounts = [
        a for a in db.execute(select(Channel.__table__.c.external_id).where(  # type: ignore[attr-defined]
            Channel.__table__.c.id.in_(_channel_ids(subject))  # type: ignore[attr-defined]
        )).scalars() if a
    ]
    return [buckets_of(accounts)] if accounts else []


def _older(column: str) -> Callable[[Table, datetime], ColumnElement[bool]]:
    return lambda table, cutoff: table.c[column] < cutoff


def _closed_runs_ended_before(table: Table, cutoff: datetime) -> ColumnElement[bool]:
    return table.c.status.not_in(OPEN_RUN_STATES) & (table.c.ended_at < cutoff)


PERSONAL_DATA: dict[str, PersonalTable] = {
    "message": PersonalTable(
        Message, "messages", "workspace_id", contact_key="messages", contact_scope="contact_id",
        channel_scope="channel_id", workspace_column="workspace_id", retention=_older("created_at"),
    ),
    "inboxevent": PersonalTable(
        InboxEvent, "inbox", not_exported="transient: webhook events held while Temporal is unreachable, deleted "
        "once relayed (one Temporal refuses for good moves to deadletter, exported)",
        contact_scope="contact_id", channel_scope="channel_id",
    ),
    # A dead letter may be all we hold of a person: an event refused before it was recorded.
    "deadletter": PersonalTable(
        DeadLetter, "dead_letters", "workspace_id", contact_key="dead_letters", contact_scope="contact_id",
        channel_scope="channel_id", workspace_column="workspace_id", retention=_older("created_at"),
    ),
    "sendrecord": PersonalTable(
        SendRecord, "send_records",
        not_exported="idempotency records of outbound sends: only ids, already exported as the message log",
        contact_custom=_send_records_of_contact, channel_custom=_send_records_of_channels,
    ),
    # Usage outlives a contact's erasure without naming whose run it was.
    "aiusage": PersonalTable(
        AiUsage, "ai_usage", "workspace_id", contact_key="ai_usage", contact_scope="run_id",
        unlink=("run_id", ""), workspace_column="workspace_id",
    ),
    "run": PersonalTable(
        Run, "runs", "workspace_id", contact_key="runs", contact_scope="contact_id", channel_scope="channel_id",
        workspace_column="workspace_id", retention=_closed_runs_ended_before,
    ),
    "auditentry": PersonalTable(
        AuditEntry, "audit", "workspace_id", contact_key="audit", contact_scope="target",
        unlink=("target", "erased-contact"),
        kept="accountability: what was done, by whom and when; never content, and no erased contact's id",
    ),
    "erasurejob": PersonalTable(
        ErasureJob, "erasure_jobs", "workspace_id",
        kept="proof and status of the erasure itself (its link stays answerable); a pseudonymous id only",
    ),
    "ratebucket": PersonalTable(
        RateBucket, "rate_buckets", not_exported="transient rate-limit state (platform account and chat ids)",
        contact_custom=_buckets_of_contact, channel_custom=_buckets_of_channels,
    ),
    "contacttag": PersonalTable(
        ContactTag, "contact_tags", "workspace_id", contact_key="tag_keys", contact_scope="contact_id",
        workspace_column="workspace_id",
    ),
    "contact": PersonalTable(
        Contact, "contacts", "workspace_id", contact_key="contact", contact_scope="id",
        channel_scope="channel_id", workspace_column="workspace_id",
    ),
    "automationversion": PersonalTable(
        AutomationVersion, "automation_versions", "automation_id", channel_scope="automation_id",
    ),
    "automation": PersonalTable(
        Automation, "automations", "workspace_id", channel_scope="channel_id", workspace_column="workspace_id",
    ),
    "broadcast": PersonalTable(
        Broadcast, "broadcasts", "workspace_id", channel_scope="channel_id", workspace_column="workspace_id",
    ),
    "channel": PersonalTable(
        Channel, "channels", "workspace_id", channel_scope="id", workspace_column="workspace_id",
        excluded=frozenset({"token_ciphertext", "webhook_secret_ciphertext", "contact_key"}),
    ),
    "datakey": PersonalTable(
        DataKey, "data_keys",
        not_exported="encryption keys (wrapped by the master keyring); credentials, not personal data",
        kept="destroyed by the key store instead (crypto-shredding what Temporal still holds)",
    ),
    "workspace": PersonalTable(
        Workspace, "workspaces", "id", workspace_column="id", excluded=frozenset({"api_key_hash"}),
    ),
}

EXPORTED_TABLES: dict[str, PersonalTable] = {n: t for n, t in PERSONAL_DATA.items() if t.exported}
NOT_EXPORTED: dict[str, str] = {n: t.not_exported for n, t in PERSONAL_DATA.items() if not t.exported}


def contact_tables() -> set[str]:
    """Names of the tables the contact export covers."""
    return {name for name, spec in EXPORTED_TABLES.items() if spec.contact_key is not None}


def excluded_columns() -> dict[str, list[str]]:
    return {name: sorted(spec.excluded) for name, spec in EXPORTED_TABLES.items() if spec.excluded}


# -- erasure and retention --------------------------------------------------------


def _channel_ids(subject: Subject):
    if subject.scope == "workspace":
        return select(Channel.__table__.c.id).where(Channel.__table__.c.workspace_id == subject.workspace_id)  # type: ignore[attr-defined]
    return list(subject.channel_ids) or [""]


def _contact_ids(subject: Subject):
    contacts = Contact.__table__  # type: ignore[attr-defined]
    if subject.scope == "contact":
        return [subject.contact_id]
    if subject.scope == "channels":
        return select(contacts.c.id).where(contacts.c.channel_id.in_(list(subject.channel_ids) or [""]))
    return select(contacts.c.id).where(contacts.c.workspace_id == subject.workspace_id)


def _contact_rows(spec: PersonalTable, ids) -> ColumnElement[bool]:
    table = spec.table
    if spec.contact_scope == "run_id":
        runs = Run.__table__  # type: ignore[attr-defined]
        return table.c.run_id.in_(select(runs.c.id).where(runs.c.contact_id.in_(ids)))
    column = {"id": "id", "contact_id": "contact_id", "target": "target"}[spec.contact_scope or ""]
    return table.c[column].in_(ids)


def _channel_rows(spec: PersonalTable, ids) -> ColumnElement[bool]:
    table = spec.table
    if spec.channel_scope == "automation_id":
        automations = Automation.__table__  # type: ignore[attr-defined]
        return table.c.automation_id.in_(select(automations.c.id).where(automations.c.channel_id.in_(ids)))
    return table.c[spec.channel_scope or ""].in_(ids)


def erasure_statements(db: Session, subject: Subject) -> Iterator[tuple[str, Executable]]:
    """(count name, statement) for every change erasing ``subject``, in the
    map's order. Idempotent: a second run finds nothing left to change."""
    contacts, channels = _contact_ids(subject), _channel_ids(subject)
    for spec in PERSONAL_DATA.values():
        table = spec.table
        in_workspace = table.c.workspace_id == subject.workspace_id if "workspace_id" in table.c else None
        if subject.scope == "workspace" and spec.workspace_column:
            yield spec.count, delete(table).where(table.c[spec.workspace_column] == subject.workspace_id)
            continue
        if spec.contact_scope:
            where = _contact_rows(spec, contacts)
            if in_workspace is not None:
                where = in_workspace & where
            if spec.unlink:
                column, value = spec.unlink
                yield f"{spec.count}_unlinked", update(table).where(where).values({column: value})
            else:
                yield spec.count, delete(table).where(where)
        if spec.contact_custom and subject.scope == "contact":  # a channel's erasure covers these below
            yield from ((spec.count, s) for s in spec.contact_custom(db, subject))
        if subject.scope != "contact":
            if spec.channel_scope:
                yield spec.count, delete(table).where(_channel_rows(spec, channels))
            if spec.channel_custom:
                yield from ((spec.count, s) for s in spec.channel_custom(db, subject))


def retention_statements(workspace_id: str, cutoff: datetime) -> Iterator[tuple[str, Executable]]:
    """(count name, DELETE) of a workspace's rows older than ``cutoff``."""
    for spec in PERSONAL_DATA.values():
        if spec.retention is not None:
            table = spec.table
            yield spec.count, delete(table).where(table.c.workspace_id == workspace_id, spec.retention(table, cutoff))


# -- export ----------------------------------------------------------------------

# -- rows to JSON ----------------------------------------------------------------


def jsonable(value: Any) -> Any:
    if isinstance(value, datetime):
        # Stored in UTC; SQLite hands datetimes back without an offset.
        return (value if value.tzinfo else value.replace(tzinfo=UTC)).isoformat()
    if isinstance(value, date):
        return value.isoformat()
    if isinstance(value, bytes):
        return value.hex()
    return value


def export_row(spec: PersonalTable, mapping: Any) -> dict[str, Any]:
    return {name: jsonable(mapping[name]) for name in spec.columns()}


def _select(spec: PersonalTable, where: ColumnElement[bool]):
    table = spec.table
    return select(*(table.c[name] for name in spec.columns())).where(where)


def _workspace_filter(name: str, spec: PersonalTable, workspace_id: str) -> ColumnElement[bool]:
    table = spec.table
    if spec.workspace_scope == "id":
        return table.c.id == workspace_id
    if spec.workspace_scope == "workspace_id":
        return table.c.workspace_id == workspace_id
    if spec.workspace_scope == "automation_id":
        automations = Automation.__table__  # type: ignore[attr-defined]
        return table.c.automation_id.in_(select(automations.c.id).where(automations.c.workspace_id == workspace_id))
    raise ValueError(f"{name}: unknown workspace scope {spec.workspace_scope!r}")


def _contact_filter(name: str, spec: PersonalTable, contact: Contact) -> ColumnElement[bool]:
    table = spec.table
    if spec.contact_scope == "id":
        return table.c.id == contact.id
    # Every other scope also stays inside the contact's workspace.
    same_workspace = table.c.workspace_id == contact.workspace_id
    if spec.contact_scope == "contact_id":
        return same_workspace & (table.c.contact_id == contact.id)
    if spec.contact_scope == "run_id":
        runs = Run.__table__  # type: ignore[attr-defined]
        return same_workspace & table.c.run_id.in_(select(runs.c.id).where(runs.c.contact_id == contact.id))
    if spec.contact_scope == "target":
        return same_workspace & (table.c.target == contact.id)
    raise ValueError(f"{name}: unknown contact scope {spec.contact_scope!r}")


def _chronological(spec: PersonalTable) -> list:
    """Oldest first where the table has a timestamp, then by key."""
    table = spec.table
    first = [table.c[name] for name in ("created_at", "started_at") if name in table.c][:1]
    return first + list(table.primary_key.columns)


def contact_document(session: Session, contact: Contact) -> dict[str, Any]:
    """Every row about one contact, keyed as in the contact export, oldest first."""
    document: dict[str, Any] = {}
    for name, spec in EXPORTED_TABLES.items():
        if spec.contact_scope is None or spec.contact_key is None:
            continue
        query = _select(spec, _contact_filter(name, spec, contact)).order_by(*_chronological(spec))
        rows = [export_row(spec, r) for r in session.execute(query).mappings()]
        document[spec.contact_key] = rows[0] if spec.contact_scope == "id" else rows
    return document


def _table_batches(session: Session, name: str, spec: PersonalTable, workspace_id: str) -> Iterator[list[dict]]:
    """Rows in primary-key order, BATCH_SIZE at a time (keyset pagination)."""
    pk = list(spec.table.primary_key.columns)
    key = pk[0] if len(pk) == 1 else tuple_(*pk)
    where = _workspace_filter(name, spec, workspace_id)
    last = None
    while True:
        query = _select(spec, where if last is None else where & (key > last))
        rows = list(session.execute(query.order_by(*pk).limit(BATCH_SIZE)).mappings())
        if not rows:
            return
        last = rows[-1][pk[0].name] if len(pk) == 1 else tuple_(*(rows[-1][c.name] for c in pk))
        yield [export_row(spec, r) for r in rows]
        if len(rows) < BATCH_SIZE:
            return


def _dumps(row: dict[str, Any]) -> bytes:
    return json.dumps(row, ensure_ascii=False, separators=(",", ":"), default=str).encode() + b"\n"


Progress = Callable[[str, int, int], None]  # (table, rows written, rows in the table)


def write_workspace_zip(
    engine: Engine, workspace_id: str, out: IO[bytes], progress: Progress | None = None
) -> Iterator[dict[str, int]]:
    """Write the workspace archive to ``out``: one ``<table>.jsonl`` per table
    and a ``manifest.json``. Yields the row counts so far after every batch,
    so a caller can stream what was written; the last yield follows the
    central directory, written on close."""
    counts: dict[str, int] = {}
    with Session(engine) as session, zipfile.ZipFile(out, mode="w", compression=zipfile.ZIP_DEFLATED) as zf:
        for name, spec in EXPORTED_TABLES.items():
            total = 0
            if progress is not None:
                where = _workspace_filter(name, spec, workspace_id)
                total = session.execute(select(func.count()).select_from(spec.table).where(where)).scalar_one()
                progress(name, 0, total)
            counts[name] = 0
            with zf.open(f"{name}.jsonl", "w", force_zip64=True) as handle:
                for batch in _table_batches(session, name, spec, workspace_id):
                    handle.write(b"".join(_dumps(row) for row in batch))
                    counts[name] += len(batch)
                    if progress is not None:
                        progress(name, counts[name], max(total, counts[name]))
                    yield counts
            yield counts
        manifest = {
            "workspace_id": workspace_id,
            "exported_at": jsonable(utcnow()),
            "tables": counts,
            "excluded": {"columns": excluded_columns(), "tables": dict(NOT_EXPORTED)},
        }
        zf.writestr("manifest.json", json.dumps(manifest, indent=2))
    yield counts
