"""Broadcasts: one message to a segment, as a durable fan-out workflow."""

from __future__ import annotations

import asyncio
from dataclasses import asdict
from datetime import datetime
from typing import Annotated

from fastapi import APIRouter, HTTPException, status
from pydantic import BaseModel, Field, StringConstraints
from sqlmodel import col, select
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
from api.problems import unprocessable
from core import flowrt
from core.audit import audit
from core.contracts import BROADCAST_WORKFLOW, BroadcastInput, BroadcastProgress, broadcast_workflow_id
from core.db import Broadcast, Channel, count_sends, new_id, utcnow
from core.flow import MessageContent
from core.limits import (
    MAX_AUTOMATION_NAME,
    MAX_FIELD_KEY,
    MAX_FIELD_VALUE,
    MAX_FIELDS,
    MAX_SEGMENT_TAGS,
    MAX_TAG,
)
from workflows.common import BULK_PRIORITY, search_attributes

router = APIRouter(prefix="/v1/broadcasts", tags=["broadcasts"])


SegmentTag = Annotated[str, StringConstraints(max_length=MAX_TAG)]
SegmentKey = Annotated[str, StringConstraints(min_length=1, max_length=MAX_FIELD_KEY)]
SegmentValue = Annotated[str, StringConstraints(max_length=MAX_FIELD_VALUE)] | int | float | bool


class Segment(BaseModel):
    model_config = {"extra": "forbid"}
    tags_any: list[SegmentTag] = Field(default_factory=list, max_length=MAX_SEGMENT_TAGS)
    tags_all: list[SegmentTag] = Field(default_factory=list, max_length=MAX_SEGMENT_TAGS)
    tags_none: list[SegmentTag] = Field(default_factory=list, max_length=MAX_SEGMENT_TAGS)
    fields: dict[SegmentKey, SegmentValue] = Field(default_factory=dict, max_length=MAX_FIELDS)
    last_seen_within_hours: float | None = Field(None, gt=0, le=24 * 365)


class BroadcastCreate(MessageContent):
    """``text`` (may greet each recipient: ``{{contact.first_name | there}}``),
    and ``quick_replies`` or ``buttons`` as in a flow's ``send_message`` step."""

    channel_id: str
    name: str = Field("", max_length=MAX_AUTOMATION_NAME)
    segment: Segment = Field(default_factory=Segment)


class QuickReplyPublic(BaseModel):
    title: str
    payload: str


class ButtonPublic(BaseModel):
    title: str
    payload: str = ""
    url: str = ""


class BroadcastPublic(BaseModel):
    id: str
    channel_id: str
    name: str
    text: str = Field(description="As written: placeholders are filled for each recipient when sent.")
    quick_replies: list[QuickReplyPublic]
    buttons: list[ButtonPublic]
    status: str
    sent: int
    failed: int
    skipped: dict[str, int] = Field(description="Contacts not messaged, by reason (restricted, outside_window, ...).")
    created_at: datetime
    finished_at: datetime | None


class BroadcastList(BaseModel):
    data: list[BroadcastPublic]
    count: int = Field(description=COUNT_DESCRIPTION)


def public(b: Broadcast, live: BroadcastProgress | None = None) -> BroadcastPublic:
    return BroadcastPublic(
        id=b.id,
        channel_id=b.channel_id,
        name=b.name,
        text=b.text,
        quick_replies=[QuickReplyPublic(**q) for q in b.quick_replies or []],
        buttons=[ButtonPublic(**x) for x in b.buttons or []],
        status=live.status if live else b.status,
        sent=live.sent if live else b.sent,
        failed=live.failed if live else b.failed,
        skipped=dict(live.skipped if live else b.skipped or {}),
        created_at=b.created_at,
        finished_at=b.finished_at,
    )


def workflow_id(b: Broadcast) -> str:
    return broadcast_workflow_id(b.workspace_id, b.id)


def get_owned(session, workspace_id: str, broadcast_id: str) -> Broadcast:
    b = session.get(Broadcast, broadcast_id)
    if b is None or b.workspace_id != workspace_id:
        raise HTTPException(status.HTTP_404_NOT_FOUND, "broadcast not found")
    return b


@router.post(
    "",
    status_code=status.HTTP_202_ACCEPTED,
    response_model=BroadcastPublic,
    operation_id="create_broadcast",
    summary="Send a message to a segment of a channel's contacts",
    description=(
        "Runs as a durable Broadcast workflow that respects the 24-hour window and the rate limits; "
        "contacts that are restricted, handed to a human or outside the window are skipped and counted. "
        "`{{contact.*}}` placeholders in the text are filled for each recipient when their message is sent "
        "(a broken or unknown placeholder is a 422); `quick_replies` or `buttons` (a button's payload "
        "arrives as a postback, which can start an automation) as in a flow's send_message step."
    ),
)
async def create_broadcast(
    body: BroadcastCreate, workspace: CurrentWorkspace, session: SessionDep, temporal: TemporalDep, settings: SettingsDep
) -> BroadcastPublic:
    channel = session.get(Channel, body.channel_id)
    if channel is None or channel.workspace_id != workspace.id:
        raise unprocessable(("body", "channel_id"), f"no channel {body.channel_id!r} in this workspace")
    if channel.status != "active":
        raise HTTPException(status.HTTP_409_CONFLICT, "the channel is not active")
    content = body.model_dump(include={"quick_replies", "buttons"})
    quick_replies, buttons = flowrt.quick_replies(content), flowrt.buttons(content)
    b = Broadcast(
        id=new_id("bc"),
        workspace_id=workspace.id,
        channel_id=channel.id,
        name=body.name,
        text=body.text,
        quick_replies=[asdict(q) for q in quick_replies],
        buttons=[asdict(x) for x in buttons],
        segment=body.segment.model_dump(exclude_defaults=True),
    )
    session.add(b)
    audit(session, workspace.id, "api_key", "broadcast.create", b.id)
    session.commit()
    try:
        await temporal.start_workflow(
            BROADCAST_WORKFLOW,
            BroadcastInput(
                broadcast_id=b.id,
                workspace_id=workspace.id,
                channel_id=channel.id,
                text=b.text,
                segment=b.segment,
                quick_replies=quick_replies,
                buttons=buttons,
            ),
            id=workflow_id(b),
            task_queue=settings.task_queue,
            search_attributes=search_attributes(workspace.id, channel.id, platform=channel.platform),
            priority=BULK_PRIORITY,  # yields to conversations when tasks back up
        )
    except RPCError as err:
        if err.status == RPCStatusCode.UNAVAILABLE:
            # Temporal did not take it: shown failed (a workflow that did
            # start after all records its own status over this one).
            b.status, b.finished_at = "failed", utcnow()
            session.add(b)
            session.commit()
        raise
    return public(b)


@router.get("", response_model=BroadcastList, operation_id="list_broadcasts", summary="List broadcasts, newest first")
def list_broadcasts(
    workspace: CurrentWorkspace, session: SessionDep, limit: Limit = DEFAULT_PAGE_SIZE, offset: Offset = 0
) -> BroadcastList:
    query = select(Broadcast).where(Broadcast.workspace_id == workspace.id)
    rows, total = paged(session, query, [col(Broadcast.created_at).desc(), col(Broadcast.id).desc()], limit, offset)
    return BroadcastList(data=[public(b) for b in rows], count=total)


@router.get("/{broadcast_id}", response_model=BroadcastPublic, operation_id="get_broadcast", summary="Progress")
async def get_broadcast(
    broadcast_id: str, workspace: CurrentWorkspace, session: SessionDep, temporal: TemporalDep
) -> BroadcastPublic:
    b = get_owned(session, workspace.id, broadcast_id)
    if b.status in ("completed", "cancelled", "failed"):
        return public(b)
    try:
        live = await asyncio.wait_for(
            temporal.get_workflow_handle(workflow_id(b)).query("progress", result_type=BroadcastProgress), 5
        )
    except Exception:  # worker busy or unreachable: the last recorded progress
        return public(b)
    # The page being sent is counted by the workflow when it completes; the
    # sends recorded so far are the live figure.
    live.sent = max(live.sent, count_sends(session, workflow_id(b)))
    return public(b, live)


@router.post(
    "/{broadcast_id}/cancel",
    status_code=status.HTTP_202_ACCEPTED,
    response_model=BroadcastPublic,
    operation_id="cancel_broadcast",
    summary="Cancel a broadcast (messages already sent stay sent)",
)
async def cancel_broadcast(
    broadcast_id: str, workspace: CurrentWorkspace, session: SessionDep, temporal: TemporalDep
) -> BroadcastPublic:
    b = get_owned(session, workspace.id, broadcast_id)
    if b.status in ("completed", "cancelled", "failed"):
        return public(b)
    try:
        await temporal.get_workflow_handle(workflow_id(b)).cancel()
    except RPCError as err:
        if err.status != RPCStatusCode.NOT_FOUND:
            raise
    audit(session, workspace.id, "api_key", "broadcast.cancel", b.id)
    session.commit()
    return public(b)
