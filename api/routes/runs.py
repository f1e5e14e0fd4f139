"""Automation runs: start for a contact, read status and step trail, signal."""

from __future__ import annotations

import asyncio
import secrets
from datetime import datetime
from typing import Annotated, Any

from fastapi import APIRouter, HTTPException, Query, status
from pydantic import AfterValidator, BaseModel, Field, ValidationInfo
from pydantic_core import PydanticCustomError
from sqlmodel import col, select
from temporalio.client import WorkflowExecutionStatus
from temporalio.service import RPCError, RPCStatusCode

from api.deps import (
    COUNT_DESCRIPTION,
    DEFAULT_PAGE_SIZE,
    CurrentWorkspace,
    Limit,
    Offset,
    SessionDep,
    SettingsDep,
    TemporalDep,
    paged,
)
from api.dispatch import signal_conversation
from api.problems import unprocessable
from core.contracts import AutomationSnapshot, ExternalEventSignal, RunStatus, StartAutomationSignal
from core.db import Automation, Channel, Contact, Run
from core.limits import MAX_CARRIED_DEFINITION, MAX_RUN_CONTEXT_SIZE, json_size
from core.observability import RUNS_STARTED

router = APIRouter(tags=["runs"])

QUERY_TIMEOUT_SECONDS = 5.0


def _bounded(value: dict[str, Any], info: ValidationInfo) -> dict[str, Any]:
    """A dict a run carries (its input, a signal): at most MAX_RUN_CONTEXT_SIZE bytes of JSON."""
    size = json_size(value)
    if size > MAX_RUN_CONTEXT_SIZE:
        raise PydanticCustomError(
            "too_large",
            f"{info.field_name} is {size} bytes of JSON; the limit is {MAX_RUN_CONTEXT_SIZE} (MAX_RUN_CONTEXT_SIZE)",
        )
    return value


RunData = Annotated[dict[str, Any], AfterValidator(_bounded)]


class RunStart(BaseModel):
    model_config = {"extra": "forbid"}
    contact_id: str
    context: RunData = Field(
        default_factory=dict,
        description=f"Available to templates as {{{{context.<key>}}}}; at most {MAX_RUN_CONTEXT_SIZE} bytes of JSON.",
    )


class RunStarted(BaseModel):
    id: str
    status: str


class TrailEntryPublic(BaseModel):
    step_id: str
    type: str
    status: str
    at: str
    detail: str = ""


class RunPublic(BaseModel):
    id: str
    automation_id: str
    version: int
    contact_id: str
    channel_id: str
    status: str
    current_step: str = ""
    started_at: datetime
    ended_at: datetime | None
    trail: list[TrailEntryPublic] = []
    trail_source: str = Field("workflow", description="'workflow' (live query) or 'database' (last recorded).")


class RunList(BaseModel):
    data: list[RunPublic]
    count: int = Field(description=COUNT_DESCRIPTION)


class SignalBody(BaseModel):
    model_config = {"extra": "forbid"}
    payload: RunData = Field(default_factory=dict, description=f"At most {MAX_RUN_CONTEXT_SIZE} bytes of JSON.")


def _public(run: Run, *, current_step: str = "", trail=None, status_: str | None = None, source="database") -> RunPublic:
    return RunPublic(
        id=run.id,
        automation_id=run.automation_id,
        version=run.version,
        contact_id=run.contact_id,
        channel_id=run.channel_id,
        status=status_ or run.status,
        current_step=current_step,
        started_at=run.started_at,
        ended_at=run.ended_at,
        trail=[TrailEntryPublic(**t) for t in (trail if trail is not None else run.trail or [])],
        trail_source=source,
    )


def _owned_run(session, workspace_id: str, run_id: str) -> Run:
    run = session.get(Run, run_id)
    if run is None or run.workspace_id != workspace_id:
        raise HTTPException(status.HTTP_404_NOT_FOUND, "run not found")
    return run


@router.post(
    "/v1/automations/{automation_id}/runs",
    status_code=status.HTTP_202_ACCEPTED,
    response_model=RunStarted,
    operation_id="start_run",
    summary="Start an automation for a contact",
    description=(
        "The run is started by the contact's conversation workflow, so it is serialised with the contact's messages. "
        "409 when the contact is restricted, withdrew consent or is handed over to a human, or the channel is not active."
    ),
)
async def start_run(
    automation_id: str,
    body: RunStart,
    workspace: CurrentWorkspace,
    session: SessionDep,
    temporal: TemporalDep,
    settings: SettingsDep,
) -> RunStarted:
    automation = session.get(Automation, automation_id)
    if automation is None or automation.workspace_id != workspace.id:
        raise HTTPException(status.HTTP_404_NOT_FOUND, "automation not found")
    contact = session.get(Contact, body.contact_id)
    if contact is None or contact.workspace_id != workspace.id:
        raise HTTPException(status.HTTP_404_NOT_FOUND, "contact not found")
    if contact.channel_id != automation.channel_id:
        raise unprocessable(("body", "contact_id"), "the contact is on another channel than the automation")
    if contact.processing_restricted or contact.consent_withdrawn:
        raise HTTPException(status.HTTP_409_CONFLICT, "processing is restricted for this contact")
    if contact.human_takeover:
        raise HTTPException(status.HTTP_409_CONFLICT, "a human has taken this conversation over; resume it first")
    channel = session.get(Channel, automation.channel_id)
    if channel is None or channel.status != "active":
        raise HTTPException(status.HTTP_409_CONFLICT, "the automation's channel is not active")
    if json_size(automation.definition) > MAX_CARRIED_DEFINITION:
        raise HTTPException(
            status.HTTP_409_CONFLICT,
            f"the automation's definition is larger than a run can carry (MAX_CARRIED_DEFINITION "
            f"{MAX_CARRIED_DEFINITION} bytes): edit it below MAX_DEFINITION_SIZE first",
        )
    run_id = f"{workspace.id}/run/{automation.id}/{contact.id}/api-{secrets.token_hex(6)}"
    await signal_conversation(
        temporal,
        settings.task_queue,
        channel,
        contact.external_id,
        "start_automation",
        StartAutomationSignal(
            run_id=run_id,
            automation=AutomationSnapshot(
                id=automation.id, version=automation.version, name=automation.name, definition=automation.definition
            ),
            context=body.context,
        ),
    )
    RUNS_STARTED.labels(trigger="api").inc()
    return RunStarted(id=run_id, status="starting")


@router.get("/v1/runs", response_model=RunList, operation_id="list_runs", summary="List runs, newest first")
def list_runs(
    workspace: CurrentWorkspace,
    session: SessionDep,
    contact_id: str | None = None,
    automation_id: str | None = None,
    status_: str | None = Query(None, alias="status"),
    limit: Limit = DEFAULT_PAGE_SIZE,
    offset: Offset = 0,
) -> RunList:
    query = select(Run).where(Run.workspace_id == workspace.id)
    if contact_id:
        query = query.where(Run.contact_id == contact_id)
    if automation_id:
        query = query.where(Run.automation_id == automation_id)
    if status_:
        query = query.where(Run.status == status_)
    rows, total = paged(session, query, [col(Run.started_at).desc(), col(Run.id).desc()], limit, offset)
    return RunList(data=[_public(r) for r in rows], count=total)


@router.post(
    "/v1/runs/{run_id:path}/signals/{name}",
    status_code=status.HTTP_202_ACCEPTED,
    operation_id="signal_run",
    summary="Deliver an external event to a run (resumes a wait_for_event step)",
)
async def signal_run(
    run_id: str, name: str, body: SignalBody, workspace: CurrentWorkspace, session: SessionDep, temporal: TemporalDep
) -> dict:
    run = _owned_run(session, workspace.id, run_id)
    if not name or len(name) > 64:
        raise unprocessable(("path", "name"), "event name must be 1..64 characters")
    handle = temporal.get_workflow_handle(run.id)
    try:
        await handle.signal("external_event", ExternalEventSignal(name=name, payload=body.payload))
    except RPCError as err:
        if err.status == RPCStatusCode.NOT_FOUND:
            raise HTTPException(status.HTTP_409_CONFLICT, "the run is not running") from None
        raise
    return {"id": run.id, "signal": name, "status": "delivered"}


@router.get("/v1/runs/{run_id:path}", response_model=RunPublic, operation_id="get_run", summary="A run's status and step trail")
async def get_run(run_id: str, workspace: CurrentWorkspace, session: SessionDep, temporal: TemporalDep) -> RunPublic:
    run = _owned_run(session, workspace.id, run_id)
    handle = temporal.get_workflow_handle(run.id)
    try:
        live: RunStatus = await asyncio.wait_for(
            handle.query("status", result_type=RunStatus), QUERY_TIMEOUT_SECONDS
        )
        description = await handle.describe()
    except Exception:  # worker or server unreachable: fall back to the recorded trail
        return _public(run)
    status_ = live.status
    if description.status == WorkflowExecutionStatus.TERMINATED:
        status_ = "terminated"
    elif description.status == WorkflowExecutionStatus.CANCELED:
        status_ = "cancelled"
    return _public(
        run,
        current_step=live.current_step,
        trail=[t.__dict__ for t in live.trail],
        status_=status_,
        source="workflow",
    )
