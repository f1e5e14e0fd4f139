"""What a data export holds: the personal-data tables, how each is scoped to a
workspace or a contact, and the columns never exported (credentials: channel
tokens, webhook secrets, the API key hash, encryption keys).

The API's export routes and ``vectory workspace export`` both write from
here. ``tests/test_export.py`` fails when a table holding a contact or
workspace id is added without being declared in ``EXPORTED_TABLES``.
"""

from __future__ import annotations

import json
import zipfile
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from datetime import UTC, date, datetime
from typing import IO, Any

from sqlalchemy import Engine, Table, func, select, tuple_
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
    DeadLetter,
    ErasureJob,
    Message,
    Run,
    Workspace,
    utcnow,
)

BATCH_SIZE = 1000


@dataclass(frozen=True)
class TableExport:
    """How one table is exported.

    ``workspace_scope`` selects the rows of the workspace export: ``"id"``
    (the workspace row itself), ``"workspace_id"`` or ``"automation_id"``
    (rows of the workspace's automations).

    ``contact_key`` / ``contact_scope`` put the table in the contact export:
    the key in the document, and how rows are selected: ``"id"`` (the contact
    itself), ``"contact_id"``, ``"run_id"`` (rows of the contact's runs) or
    ``"target"`` (audit entries about the contact).

    ``excluded`` columns are never exported, in either export.
    """

    model: type[SQLModel]
    workspace_scope: str
    contact_key: str | None = None
    contact_scope: str | None = None
    excluded: frozenset[str] = frozenset()

    @property
    def table(self) -> Table:
        return self.model.__table__  # type: ignore[attr-defined]

    def columns(self) -> list[str]:
        return [c.name for c in self.table.columns if c.name not in self.excluded]


EXPORTED_TABLES: dict[str, TableExport] = {
    "workspace": TableExport(Workspace, "id", excluded=frozenset({"api_key_hash"})),
    "channel": TableExport(
        Channel, "workspace_id", excluded=frozenset({"token_ciphertext", "webhook_secret_ciphertext", "contact_key"})
    ),
    "automation": TableExport(Automation, "workspace_id"),
    "automationversion": TableExport(AutomationVersion, "automation_id"),
    "contact": TableExport(Contact, "workspace_id", contact_key="contact", contact_scope="id"),
    "contacttag": TableExport(ContactTag, "workspace_id", contact_key="tag_keys", contact_scope="contact_id"),
    "message": TableExport(Message, "workspace_id", contact_key="messages", contact_scope="contact_id"),
    "deadletter": TableExport(DeadLetter, "workspace_id", contact_key="dead_letters", contact_scope="contact_id"),
    "run": TableExport(Run, "workspace_id", contact_key="runs", contact_scope="contact_id"),
    "aiusage": TableExport(AiUsage, "workspace_id", contact_key="ai_usage", contact_scope="run_id"),
    "auditentry": TableExport(AuditEntry, "workspace_id", contact_key="audit", contact_scope="target"),
    "erasurejob": TableExport(ErasureJob, "workspace_id"),
    "broadcast": TableExport(Broadcast, "workspace_id"),
}

NOT_EXPORTED: dict[str, str] = {
    "datakey": "encryption keys (wrapped by the master keyring); credentials, not personal data",
    "sendrecord": "idempotency records of outbound sends: only ids, already exported as the message log",
    "inboxevent": "transient: webhook events held while Temporal is unreachable, deleted once relayed "
    "(one Temporal refuses for good moves to deadletter, exported)",
    "ratebucket": "transient rate-limit state (platform account and chat ids); deleted on erasure",
}


def contact_tables() -> set[str]:
    """Names of the tables the contact export covers."""
    return {name for name, spec in EXPORTED_TABLES.items() if spec.contact_scope is not None}


def excluded_columns() -> dict[str, list[str]]:
    return {name: sorted(spec.excluded) for name, spec in EXPORTED_TABLES.items() if spec.excluded}


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


def export_row(spec: TableExport, mapping: Any) -> dict[str, Any]:
    return {name: jsonable(mapping[name]) for name in spec.columns()}


def _select(spec: TableExport, where: ColumnElement[bool]):
    table = spec.table
    return select(*(table.c[name] for name in spec.columns())).where(where)


def _workspace_filter(name: str, spec: TableExport, workspace_id: str) -> ColumnElement[bool]:
    table = spec.table
    if spec.workspace_scope == "id":
        return table.c.id == workspace_id
    if spec.workspace_scope == "workspace_id":
        return table.c.workspace_id == workspace_id
    if spec.workspace_scope == "automation_id":
        automations = Automation.__table__  # type: ignore[attr-defined]
        return table.c.automation_id.in_(select(automations.c.id).where(automations.c.workspace_id == workspace_id))
    raise ValueError(f"{name}: unknown workspace scope {spec.workspace_scope!r}")


def _contact_filter(name: str, spec: TableExport, contact: Contact) -> ColumnElement[bool]:
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


def _chronological(spec: TableExport) -> list:
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


def _table_batches(session: Session, name: str, spec: TableExport, workspace_id: str) -> Iterator[list[dict]]:
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
