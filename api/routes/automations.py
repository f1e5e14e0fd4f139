"""Automations: a trigger plus a flow of steps, versioned."""

from __future__ import annotations

from datetime import datetime
from typing import Any

from fastapi import APIRouter, HTTPException, Response, status
from fastapi.exceptions import RequestValidationError
from pydantic import BaseModel, Field, ValidationError
from sqlmodel import col, delete, func, select, update

from api.deps import (
    COUNT_DESCRIPTION,
    DEFAULT_PAGE_SIZE,
    CurrentWorkspace,
    Limit,
    Offset,
    SessionDep,
    paged,
)
from api.problems import unprocessable
from core.db import Automation, AutomationVersion, Channel, new_id, utcnow
from core.flow import AutomationCreate, AutomationUpdate, definition_dict, merge_definition
from core.limits import MAX_AUTOMATIONS_PER_CHANNEL, MAX_AUTOMATIONS_PER_WORKSPACE

router = APIRouter(prefix="/v1/automations", tags=["automations"])


class AutomationPublic(BaseModel):
    id: str
    name: str
    channel_id: str
    status: str
    version: int
    trigger: dict[str, Any]
    steps: list[dict[str, Any]]
    created_at: datetime
    updated_at: datetime


class AutomationList(BaseModel):
    data: list[AutomationPublic]
    count: int = Field(description=COUNT_DESCRIPTION)


def public(a: Automation) -> AutomationPublic:
    return AutomationPublic(
        id=a.id,
        name=a.name,
        channel_id=a.channel_id,
        status=a.status,
        version=a.version,
        trigger=a.definition["trigger"],
        steps=a.definition["steps"],
        created_at=a.created_at,
        updated_at=a.updated_at,
    )


def get_owned(session, workspace_id: str, automation_id: str) -> Automation:
    automation = session.get(Automation, automation_id)
    if automation is None or automation.workspace_id != workspace_id:
        raise HTTPException(status.HTTP_404_NOT_FOUND, "automation not found")
    return automation


def _check_room(session, workspace_id: str, channel_id: str) -> None:
    """422 when the workspace or the channel has as many automations as its
    limit allows (every active one of a channel is matched against each of
    its events)."""
    count = func.count(col(Automation.id))
    in_workspace = session.exec(select(count).where(Automation.workspace_id == workspace_id)).one()
    if in_workspace >= MAX_AUTOMATIONS_PER_WORKSPACE:
        raise unprocessable(
            ["body"],
            f"the workspace has {in_workspace} automations; the limit is {MAX_AUTOMATIONS_PER_WORKSPACE} "
            "(MAX_AUTOMATIONS_PER_WORKSPACE): delete one first",
        )
    in_channel = session.exec(select(count).where(Automation.channel_id == channel_id)).one()
    if in_channel >= MAX_AUTOMATIONS_PER_CHANNEL:
        raise unprocessable(
            ["body", "channel_id"],
            f"the channel has {in_channel} automations; the limit is {MAX_AUTOMATIONS_PER_CHANNEL} "
            "(MAX_AUTOMATIONS_PER_CHANNEL): delete one first",
        )


@router.post(
    "",
    status_code=status.HTTP_201_CREATED,
    response_model=AutomationPublic,
    operation_id="create_automation",
    summary="Create an automation",
    description=(
        "The flow is validated as a whole: unknown step types, dangling targets and missing texts get 422, "
        "and so does a size over its limit (docs/limits.md: automations per workspace and per channel, the "
        "definition's size, steps, texts). 409 when the channel is disconnected."
    ),
)
def create_automation(body: AutomationCreate, workspace: CurrentWorkspace, session: SessionDep) -> AutomationPublic:
    channel = session.get(Channel, body.channel_id)
    if channel is None or channel.workspace_id != workspace.id:
        raise unprocessable(["body", "channel_id"], f"no channel {body.channel_id!r} in this workspace")
    if channel.status == "disconnected":
        raise HTTPException(status.HTTP_409_CONFLICT, "the channel is disconnected: connect it again first")
    _check_room(session, workspace.id, channel.id)
    definition = definition_dict(body)
    automation = Automation(
        id=new_id("au"),
        workspace_id=workspace.id,
        channel_id=channel.id,
        name=body.name,
        status=body.status,
        definition=definition,
    )
    session.add(automation)
    session.flush()
    session.add(AutomationVersion(automation_id=automation.id, version=1, definition=definition))
    session.commit()
    return public(automation)


@router.get("", response_model=AutomationList, operation_id="list_automations", summary="List automations, oldest first")
def list_automations(
    workspace: CurrentWorkspace,
    session: SessionDep,
    channel_id: str | None = None,
    limit: Limit = DEFAULT_PAGE_SIZE,
    offset: Offset = 0,
) -> AutomationList:
    query = select(Automation).where(Automation.workspace_id == workspace.id)
    if channel_id:
        query = query.where(Automation.channel_id == channel_id)
    rows, total = paged(session, query, [col(Automation.created_at), col(Automation.id)], limit, offset)
    return AutomationList(data=[public(a) for a in rows], count=total)


@router.get("/{automation_id}", response_model=AutomationPublic, operation_id="get_automation", summary="Get an automation")
def get_automation(automation_id: str, workspace: CurrentWorkspace, session: SessionDep) -> AutomationPublic:
    return public(get_owned(session, workspace.id, automation_id))


@router.patch(
    "/{automation_id}",
    response_model=AutomationPublic,
    operation_id="update_automation",
    summary="Update an automation",
    description=(
        "A change to the trigger or steps creates a new version; running runs keep the version they started "
        "with. The new definition is checked against today's limits; a rename or a status change alone is "
        "not (an automation saved before a limit can still be paused)."
    ),
)
def update_automation(
    automation_id: str, body: AutomationUpdate, workspace: CurrentWorkspace, session: SessionDep
) -> AutomationPublic:
    # Concurrent updates of one automation take their turns: touching its
    # row first holds it (a row lock on PostgreSQL, the write lock on SQLite)
    # until this one commits, so each reads the version the last one wrote.
    session.exec(update(Automation).where(col(Automation.id) == automation_id).values(updated_at=Automation.updated_at))
    automation = get_owned(session, workspace.id, automation_id)
    try:
        definition = merge_definition(automation.definition, body)
    except ValidationError as exc:
        # Answered as a refused body is (api/main.py): the input of an error about the whole flow is not echoed.
        raise RequestValidationError(exc.errors(include_url=False, include_context=False)) from None
    except ValueError as exc:
        raise unprocessable(["body"], str(exc)) from None
    if body.name is not None:
        automation.name = body.name
    if body.status is not None:
        automation.status = body.status
    if definition != automation.definition:
        automation.version += 1
        automation.definition = definition
        session.add(AutomationVersion(automation_id=automation.id, version=automation.version, definition=definition))
    automation.updated_at = utcnow()
    session.add(automation)
    session.commit()
    return public(automation)


@router.delete(
    "/{automation_id}",
    status_code=status.HTTP_204_NO_CONTENT,
    operation_id="delete_automation",
    summary="Delete an automation (running runs finish on their pinned version)",
)
def delete_automation(automation_id: str, workspace: CurrentWorkspace, session: SessionDep) -> Response:
    automation = get_owned(session, workspace.id, automation_id)
    # Its versions first (they reference it; the unit of work does not know the order).
    session.exec(delete(AutomationVersion).where(AutomationVersion.automation_id == automation.id))
    session.delete(automation)
    session.commit()
    return Response(status_code=status.HTTP_204_NO_CONTENT)
