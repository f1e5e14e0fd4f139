"""Privacy rights through the API: erasure, retention, audit log."""

from __future__ import annotations

from datetime import datetime

from fastapi import APIRouter, HTTPException, Query, status
from pydantic import BaseModel, Field
from sqlmodel import col, func, select

from api.deps import MAX_OFFSET, CurrentWorkspace, SessionDep, SettingsDep, TemporalDep
from api.erasure import existing_job, start_erasure, status_url
from core.audit import audit
from core.db import AuditEntry, Contact, ErasureJob

router = APIRouter(tags=["privacy"])


class ErasureJobPublic(BaseModel):
    id: str
    scope: str
    status: str
    detail: str
    created_at: datetime
    completed_at: datetime | None
    status_url: str = Field(
        description="A page anyone with the code can check, without an API key (also once the workspace is erased)."
    )


class WorkspaceSettings(BaseModel):
    model_config = {"extra": "forbid"}
    retention_days: int | None = Field(None, ge=1, le=3650, description="Message log retention in days.")


class WorkspaceSettingsPublic(BaseModel):
    id: str
    name: str
    retention_days: int


class AuditPublic(BaseModel):
    id: int
    actor: str
    action: str
    target: str
    detail: str
    created_at: datetime


class AuditList(BaseModel):
    data: list[AuditPublic]
    count: int = Field(description="All that match the filters; `data` is the page (`limit`, `offset`).")


def job_public(job: ErasureJob, public_url: str) -> ErasureJobPublic:
    return ErasureJobPublic(
        id=job.id,
        scope=job.scope,
        status=job.status,
        detail=job.detail,
        created_at=job.created_at,
        completed_at=job.completed_at,
        status_url=status_url(public_url, job.id),
    )


@router.delete(
    "/v1/contacts/{contact_id}",
    status_code=status.HTTP_202_ACCEPTED,
    response_model=ErasureJobPublic,
    operation_id="erase_contact",
    summary="Erase a contact: stop their workflows and delete every row about them",
    description=(
        "Idempotent: erasing a contact already being (or having been) erased returns the existing job; "
        "a contact who wrote again after their erasure gets a new one. "
        "503 when Temporal is unreachable: the job is kept, and asking again starts it."
    ),
)
async def erase_contact(
    contact_id: str, workspace: CurrentWorkspace, session: SessionDep, temporal: TemporalDep, settings: SettingsDep
) -> ErasureJobPublic:
    contact = session.get(Contact, contact_id)
    if contact is not None and contact.workspace_id != workspace.id:
        contact = None
    if contact is None and existing_job(session, workspace.id, "contact", contact_id) is None:
        raise HTTPException(status.HTTP_404_NOT_FOUND, "contact not found")
    # Also for an existing job: one still pending has its workflow started,
    # and one completed before the person wrote again gives way to a new one.
    job, _ = await start_erasure(
        temporal, settings, session, workspace_id=workspace.id, scope="contact", target=contact_id,
        source="api", actor="api_key", contact_id=contact_id, holds_data=contact is not None,
    )
    return job_public(job, settings.public_url)


@router.delete(
    "/v1/workspace",
    status_code=status.HTTP_202_ACCEPTED,
    response_model=ErasureJobPublic,
    operation_id="erase_workspace",
    summary="Erase the workspace: revoke every channel, delete all data, destroy its encryption keys",
    description=(
        "The API key stops working when the erasure completes; follow `status_url` without it. "
        "503 when Temporal is unreachable: the job is kept, and asking again starts it."
    ),
)
async def erase_workspace(
    workspace: CurrentWorkspace, session: SessionDep, temporal: TemporalDep, settings: SettingsDep
) -> ErasureJobPublic:
    if existing_job(session, workspace.id, "workspace", workspace.id) is None:
        workspace.status = "erasing"
        session.add(workspace)
        session.commit()
    # Also for an existing job: one still pending has its workflow started.
    job, _ = await start_erasure(
        temporal, settings, session, workspace_id=workspace.id, scope="workspace", target=workspace.id,
        source="api", actor="api_key",
    )
    return job_public(job, settings.public_url)


@router.get("/v1/erasures/{job_id}", response_model=ErasureJobPublic, operation_id="get_erasure", summary="An erasure job")
def get_erasure(job_id: str, workspace: CurrentWorkspace, session: SessionDep, settings: SettingsDep) -> ErasureJobPublic:
    job = session.get(ErasureJob, job_id)
    if job is None or job.workspace_id != workspace.id:
        raise HTTPException(status.HTTP_404_NOT_FOUND, "erasure job not found")
    return job_public(job, settings.public_url)


@router.patch(
    "/v1/workspace",
    response_model=WorkspaceSettingsPublic,
    operation_id="update_workspace",
    summary="Workspace settings (message retention period)",
)
def update_workspace(body: WorkspaceSettings, workspace: CurrentWorkspace, session: SessionDep) -> WorkspaceSettingsPublic:
    if body.retention_days is not None:
        workspace.retention_days = body.retention_days
        audit(session, workspace.id, "api_key", "workspace.retention", detail=f"{body.retention_days} days")
    session.add(workspace)
    session.commit()
    return WorkspaceSettingsPublic(id=workspace.id, name=workspace.name, retention_days=workspace.retention_days)


@router.get("/v1/audit", response_model=AuditList, operation_id="list_audit", summary="The audit log, newest first")
def list_audit(
    workspace: CurrentWorkspace,
    session: SessionDep,
    action: str | None = None,
    limit: int = Query(100, ge=1, le=1000),
    offset: int = Query(0, ge=0, le=MAX_OFFSET),
) -> AuditList:
    query = select(AuditEntry).where(AuditEntry.workspace_id == workspace.id)
    if action:
        query = query.where(AuditEntry.action == action)
    total = session.exec(select(func.count()).select_from(query.subquery())).one()
    rows = session.exec(query.order_by(col(AuditEntry.id).desc()).offset(offset).limit(limit)).all()
    return AuditList(
        data=[
            AuditPublic(id=r.id or 0, actor=r.actor, action=r.action, target=r.target, detail=r.detail, created_at=r.created_at)
            for r in rows
        ],
        count=total,
    )
