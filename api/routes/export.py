"""Data access and portability (GDPR art. 15 and 20): export a contact's data
as JSON, or a whole workspace as a streamed ZIP of JSON-lines files.

What is exported is declared once, in ``EXPORTED_TABLES``; credentials
(channel tokens, webhook secrets, the API key hash, encryption keys) never
are. ``tests/test_export.py`` fails when a table holding a contact or
workspace id is added without being declared here.
"""

from __future__ import annotations

import json
import zipfile
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import UTC, date, datetime
from typing import Any

from fastapi import APIRouter, Request
from fastapi.responses import StreamingResponse
from pydantic import BaseModel, Field
from sqlalchemy import Table, select, tuple_
from sqlalchemy.sql import ColumnElement
from sqlmodel import Session, SQLModel

from api.deps import CurrentWorkspace, SessionDep
from api.routes.contacts import get_owned
from core.audit import audit
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

router = APIRouter(tags=["privacy"])

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


def _jsonable(value: Any) -> Any:
    if isinstance(value, datetime):
        # Stored in UTC; SQLite hands datetimes back without an offset.
        return (value if value.tzinfo else value.replace(tzinfo=UTC)).isoformat()
    if isinstance(value, date):
        return value.isoformat()
    if isinstance(value, bytes):
        return value.hex()
    return value


def _row(spec: TableExport, mapping: Any) -> dict[str, Any]:
    return {name: _jsonable(mapping[name]) for name in spec.columns()}


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


# -- contact export ---------------------------------------------------------------


class ContactExport(BaseModel):
    exported_at: datetime
    contact: dict[str, Any]
    messages: list[dict[str, Any]]
    # Events Temporal refused for good, set aside before they reached the message log.
    dead_letters: list[dict[str, Any]]
    runs: list[dict[str, Any]]
    ai_usage: list[dict[str, Any]]
    audit: list[dict[str, Any]]
    tag_keys: list[dict[str, Any]] = Field(description="The contact's tags as the tag filter looks them up.")


@router.get(
    "/v1/contacts/{contact_id}/export",
    response_model=ContactExport,
    operation_id="export_contact",
    summary="Everything stored about one contact (data access / portability)",
    description=(
        "The contact, its message log, its events set aside as undeliverable (dead letters), its runs, "
        "the AI usage of those runs, the audit entries about it and its tags' lookup keys."
    ),
)
def export_contact(contact_id: str, workspace: CurrentWorkspace, session: SessionDep) -> ContactExport:
    contact = get_owned(session, workspace.id, contact_id)
    document: dict[str, Any] = {"exported_at": utcnow()}
    for name, spec in EXPORTED_TABLES.items():
        if spec.contact_scope is None or spec.contact_key is None:
            continue
        query = _select(spec, _contact_filter(name, spec, contact)).order_by(*_chronological(spec))
        rows = [_row(spec, r) for r in session.execute(query).mappings()]
        document[spec.contact_key] = rows[0] if spec.contact_scope == "id" else rows
    audit(session, workspace.id, "api_key", "contact.export", contact.id)
    session.commit()
    return ContactExport(**document)


# -- workspace export -------------------------------------------------------------


class _ChunkSink:
    """A write-only, non-seekable file: collects what zipfile writes so the
    response generator can hand it on after each batch."""

    def __init__(self) -> None:
        self._chunks: list[bytes] = []

    def write(self, data: bytes) -> int:
        self._chunks.append(bytes(data))
        return len(data)

    def flush(self) -> None:
        pass

    def drain(self) -> bytes:
        out = b"".join(self._chunks)
        self._chunks.clear()
        return out


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
        yield [_row(spec, r) for r in rows]
        if len(rows) < BATCH_SIZE:
            return


def _dumps(row: dict[str, Any]) -> bytes:
    return json.dumps(row, ensure_ascii=False, separators=(",", ":"), default=str).encode() + b"\n"


def stream_workspace_zip(engine, workspace_id: str) -> Iterator[bytes]:
    sink = _ChunkSink()
    counts: dict[str, int] = {}
    with Session(engine) as session, zipfile.ZipFile(sink, mode="w", compression=zipfile.ZIP_DEFLATED) as zf:  # type: ignore[arg-type]
        for name, spec in EXPORTED_TABLES.items():
            counts[name] = 0
            with zf.open(f"{name}.jsonl", "w", force_zip64=True) as handle:
                for batch in _table_batches(session, name, spec, workspace_id):
                    handle.write(b"".join(_dumps(row) for row in batch))
                    counts[name] += len(batch)
                    chunk = sink.drain()
                    if chunk:
                        yield chunk
            chunk = sink.drain()
            if chunk:
                yield chunk
        manifest = {
            "workspace_id": workspace_id,
            "exported_at": _jsonable(utcnow()),
            "tables": counts,
            "excluded": {"columns": excluded_columns(), "tables": dict(NOT_EXPORTED)},
        }
        zf.writestr("manifest.json", json.dumps(manifest, indent=2))
    chunk = sink.drain()  # the central directory, written on close
    if chunk:
        yield chunk


@router.get(
    "/v1/workspace/export",
    operation_id="export_workspace",
    summary="Export the whole workspace as a ZIP of JSON-lines files",
    description=(
        "One `<table>.jsonl` per table (one row per line, datetimes in ISO 8601) and a `manifest.json` with "
        "row counts and what was left out. Tokens, webhook secrets, the API key hash and encryption keys "
        "are never exported."
    ),
    response_class=StreamingResponse,
    responses={200: {"content": {"application/zip": {}}, "description": "A ZIP archive, streamed."}},
)
def export_workspace(request: Request, workspace: CurrentWorkspace, session: SessionDep) -> StreamingResponse:
    audit(session, workspace.id, "api_key", "workspace.export", workspace.id)
    session.commit()
    return StreamingResponse(
        stream_workspace_zip(request.app.state.engine, workspace.id),
        media_type="application/zip",
        headers={"Content-Disposition": f'attachment; filename="vectory-export-{workspace.id}.zip"'},
    )
