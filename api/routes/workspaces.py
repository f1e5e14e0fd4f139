"""Workspaces (tenants)."""

from __future__ import annotations

import secrets
from datetime import datetime
from typing import Annotated, Literal

from fastapi import APIRouter, status
from pydantic import BaseModel, Field, StringConstraints

from api.deps import AdminDep, CurrentWorkspace, SessionDep
from core.audit import audit
from core.crypto import hash_api_key
from core.db import Workspace, new_id, utcnow

router = APIRouter(tags=["workspaces"])


class WorkspaceCreate(BaseModel):
    model_config = {"extra": "forbid"}
    name: Annotated[str, StringConstraints(strip_whitespace=True, min_length=1, max_length=200)]
    business_use_attestation: Literal[True] = Field(
        description="Must be true: the workspace automates a business account and is operated by adults (18+)."
    )
    retention_days: int = Field(90, ge=1, le=3650, description="Message log retention in days.")


class WorkspaceCreated(BaseModel):
    id: str
    name: str
    api_key: str = Field(description="Shown once. Only its hash is stored.")


class WorkspacePublic(BaseModel):
    id: str
    name: str
    retention_days: int
    status: str
    created_at: datetime


@router.post(
    "/v1/workspaces",
    status_code=status.HTTP_201_CREATED,
    response_model=WorkspaceCreated,
    operation_id="create_workspace",
    summary="Create a workspace (admin token); returns its API key once",
)
def create_workspace(body: WorkspaceCreate, _: AdminDep, session: SessionDep) -> WorkspaceCreated:
    api_key = f"vk_{secrets.token_urlsafe(32)}"
    workspace = Workspace(
        id=new_id("ws"),
        name=body.name,
        api_key_hash=hash_api_key(api_key),
        retention_days=body.retention_days,
        business_attested_at=utcnow(),
    )
    session.add(workspace)
    audit(session, workspace.id, "admin", "workspace.create", workspace.id, "business use (18+) attested")
    session.commit()
    return WorkspaceCreated(id=workspace.id, name=workspace.name, api_key=api_key)


@router.get("/v1/workspace", response_model=WorkspacePublic, operation_id="get_workspace", summary="The caller's workspace")
def get_workspace(workspace: CurrentWorkspace) -> WorkspacePublic:
    return WorkspacePublic(
        id=workspace.id,
        name=workspace.name,
        retention_days=workspace.retention_days,
        status=workspace.status,
        created_at=workspace.created_at,
    )
