"""Audit log: who did what and when, never message content or personal data.

Targets are our own ids (workspace, channel, contact digest, run); never a
platform user id, a name or a text.
"""

from __future__ import annotations

from sqlalchemy import Connection, Engine
from sqlmodel import Session

from core.db import AuditEntry, utcnow

_INSERT = AuditEntry.__table__.insert()  # built once (hot path: every send)


def audit(session: Session, workspace_id: str, actor: str, action: str, target: str = "", detail: str = "") -> None:
    """Add an entry to the caller's transaction (the caller commits)."""
    session.add(AuditEntry(workspace_id=workspace_id, actor=actor, action=action, target=target, detail=detail[:300]))


def audit_in(conn: Connection, workspace_id: str, actor: str, action: str, target: str = "", detail: str = "") -> None:
    """The same entry, written on the caller's ``Connection`` (Core)."""
    conn.execute(_INSERT, {"workspace_id": workspace_id, "actor": actor, "action": action, "target": target,
                           "detail": detail[:300], "created_at": utcnow()})


def audit_now(engine: Engine, workspace_id: str, actor: str, action: str, target: str = "", detail: str = "") -> None:
    with Session(engine) as session:
        audit(session, workspace_id, actor, action, target, detail)
        session.commit()
