"""Data access and portability (GDPR art. 15 and 20): export a contact's data
as JSON, or a whole workspace as a streamed ZIP of JSON-lines files. What an
export holds is declared in ``core.personal_data``.
"""

from __future__ import annotations

from collections.abc import Iterator
from datetime import datetime
from typing import Any

from fastapi import APIRouter, Request
from fastapi.responses import StreamingResponse
from pydantic import BaseModel, Field

from api.deps import CurrentWorkspace, SessionDep
from api.routes.contacts import get_owned
from core.audit import audit
from core.db import utcnow
from core.personal_data import contact_document, write_workspace_zip

router = APIRouter(tags=["privacy"])


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
    document: dict[str, Any] = {"exported_at": utcnow(), **contact_document(session, contact)}
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


def stream_workspace_zip(engine, workspace_id: str) -> Iterator[bytes]:
    sink = _ChunkSink()
    for _ in write_workspace_zip(engine, workspace_id, sink):  # type: ignore[arg-type]
        chunk = sink.drain()
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
