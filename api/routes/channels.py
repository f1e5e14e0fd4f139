"""Channels: connect (ConnectChannel workflow) and disconnect (DisconnectChannel)."""

from __future__ import annotations

import asyncio
from datetime import datetime, timedelta
from typing import Literal

from fastapi import APIRouter, HTTPException, Request, Response, status
from pydantic import BaseModel, Field, SecretStr, ValidationInfo, field_validator
from sqlmodel import col, select
from temporalio.common import WorkflowIDReusePolicy
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
    VaultDep,
    paged,
)
from core.audit import audit
from core.contracts import (
    CONNECT_CHANNEL_WORKFLOW,
    DISCONNECT_CHANNEL_WORKFLOW,
    ChannelRef,
    ConnectChannelInput,
    ConnectResult,
    DisconnectResult,
)
from core.crypto import token_context
from core.db import Channel, new_id
from core.ids import SHAPES, conforms
from workflows.common import search_attributes

router = APIRouter(prefix="/v1/channels", tags=["channels"])

WAIT_FOR_LIFECYCLE = timedelta(seconds=20)


class ChannelCreate(BaseModel):
    model_config = {"extra": "forbid"}
    platform: Literal["instagram", "messenger", "telegram"]
    access_token: SecretStr = Field(
        min_length=1,
        max_length=4096,
        description=(
            "Instagram/Page access token (letters, digits, `_`, `-`) or Telegram bot token "
            "(`<bot id>:<30 to 64 letters, digits, _ or ->`). Encrypted at rest, never returned."
        ),
    )
    name: str = Field("", max_length=200)
    platform_user_id: str = Field(
        "",
        max_length=64,
        description="Meta user (digits) whose grant is revoked on disconnect (default: the token's user).",
    )

    # Tokens and ids go into the platforms' URLs (core/ids.py): one of
    # another shape is refused here, naming the field.
    @field_validator("access_token")
    @classmethod
    def _token_shape(cls, token: SecretStr, info: ValidationInfo) -> SecretStr:
        kind = "telegram token" if info.data.get("platform") == "telegram" else "Meta token"
        if not conforms(token.get_secret_value(), kind):
            raise ValueError(f"not a {kind}: {SHAPES[kind]}")
        return token

    @field_validator("platform_user_id")
    @classmethod
    def _user_id_shape(cls, user_id: str) -> str:
        if user_id and not conforms(user_id, "Meta id"):
            raise ValueError(f"not a Meta user id: {SHAPES['Meta id']}")
        return user_id


class ChannelPublic(BaseModel):
    id: str
    platform: str
    name: str
    external_id: str
    status: str
    status_detail: str
    created_at: datetime


class ChannelList(BaseModel):
    data: list[ChannelPublic]
    count: int = Field(description=COUNT_DESCRIPTION)


class DisconnectPublic(BaseModel):
    id: str
    status: str
    revoked: bool | None = None
    stopped_workflows: int | None = None
    detail: str = ""


def public(channel: Channel) -> ChannelPublic:
    return ChannelPublic(
        id=channel.id,
        platform=channel.platform,
        name=channel.name,
        external_id=channel.external_id,
        status=channel.status,
        status_detail=channel.status_detail,
        created_at=channel.created_at,
    )


def get_owned(session, workspace_id: str, channel_id: str) -> Channel:
    channel = session.get(Channel, channel_id)
    if channel is None or channel.workspace_id != workspace_id:
        raise HTTPException(status.HTTP_404_NOT_FOUND, "channel not found")
    return channel


async def start_disconnect(temporal, task_queue: str, channel: Channel):
    """Start DisconnectChannel (one per channel; a failed one may be retried)."""
    return await temporal.start_workflow(
        DISCONNECT_CHANNEL_WORKFLOW,
        ChannelRef(channel_id=channel.id),
        id=f"{channel.workspace_id}/channel/{channel.id}/disconnect",
        task_queue=task_queue,
        id_reuse_policy=WorkflowIDReusePolicy.ALLOW_DUPLICATE_FAILED_ONLY,
        search_attributes=search_attributes(channel.workspace_id, channel.id, platform=channel.platform),
        result_type=DisconnectResult,
    )


@router.post(
    "",
    status_code=status.HTTP_201_CREATED,
    response_model=ChannelPublic,
    operation_id="connect_channel",
    summary="Connect an Instagram account, Facebook Page or Telegram bot",
    description=(
        "Runs the ConnectChannel workflow: verifies the token with the platform and subscribes webhooks. "
        "201 when active; 202 when the platform is slow and the workflow is still retrying; 400 when the "
        "platform rejects the token (nothing is kept); 503 when Temporal is unreachable (nothing is kept either)."
    ),
    responses={202: {"model": ChannelPublic}, 400: {"description": "token rejected"}},
)
async def connect_channel(
    body: ChannelCreate,
    workspace: CurrentWorkspace,
    session: SessionDep,
    temporal: TemporalDep,
    vault: VaultDep,
    settings: SettingsDep,
    response: Response,
) -> ChannelPublic:
    channel_id = new_id("ch")
    channel = Channel(
        id=channel_id,
        workspace_id=workspace.id,
        platform=body.platform,
        name=body.name,
        platform_user_id=body.platform_user_id,
        token_ciphertext=vault.encrypt(body.access_token.get_secret_value(), token_context(channel_id)),
    )
    session.add(channel)
    audit(session, workspace.id, "api_key", "channel.connect", channel_id, body.platform)
    session.commit()
    try:
        handle = await temporal.start_workflow(
            CONNECT_CHANNEL_WORKFLOW,
            ConnectChannelInput(workspace_id=workspace.id, channel_id=channel_id, platform=body.platform),
            id=f"{workspace.id}/channel/{channel_id}/connect",
            task_queue=settings.task_queue,
            search_attributes=search_attributes(workspace.id, channel_id, platform=body.platform),
            result_type=ConnectResult,
        )
    except RPCError as err:
        if err.status == RPCStatusCode.UNAVAILABLE:
            # Temporal did not take it: nothing was connected, so nothing
            # is kept (the token goes with the row); the answer is a 503.
            session.delete(channel)
            session.commit()
        raise
    try:
        result = await asyncio.wait_for(handle.result(), WAIT_FOR_LIFECYCLE.total_seconds())
    except TimeoutError:
        response.status_code = status.HTTP_202_ACCEPTED
        session.refresh(channel)
        return public(channel)
    session.refresh(channel)
    if result.status != "active":
        session.delete(channel)
        session.commit()
        raise HTTPException(status.HTTP_400_BAD_REQUEST, f"the platform did not accept this channel: {result.detail}")
    return public(channel)


@router.get("", response_model=ChannelList, operation_id="list_channels", summary="List channels, oldest first")
def list_channels(
    workspace: CurrentWorkspace, session: SessionDep, limit: Limit = DEFAULT_PAGE_SIZE, offset: Offset = 0
) -> ChannelList:
    query = select(Channel).where(Channel.workspace_id == workspace.id)
    rows, total = paged(session, query, [col(Channel.created_at), col(Channel.id)], limit, offset)
    return ChannelList(data=[public(c) for c in rows], count=total)


@router.get("/{channel_id}", response_model=ChannelPublic, operation_id="get_channel", summary="Get a channel")
def get_channel(channel_id: str, workspace: CurrentWorkspace, session: SessionDep) -> ChannelPublic:
    return public(get_owned(session, workspace.id, channel_id))


@router.delete(
    "/{channel_id}",
    response_model=DisconnectPublic,
    operation_id="disconnect_channel",
    summary="Disconnect: revoke platform access, delete the token, stop the channel's workflows",
    description="Runs the DisconnectChannel workflow. 200 when done, 202 while it is still running.",
    responses={202: {"model": DisconnectPublic}},
)
async def disconnect_channel(
    channel_id: str,
    workspace: CurrentWorkspace,
    session: SessionDep,
    temporal: TemporalDep,
    settings: SettingsDep,
    request: Request,
    response: Response,
) -> DisconnectPublic:
    channel = get_owned(session, workspace.id, channel_id)
    if channel.status == "disconnected":
        return DisconnectPublic(id=channel.id, status=channel.status, detail=channel.status_detail)
    audit(session, workspace.id, "api_key", "channel.disconnect", channel.id)
    session.commit()
    handle = await start_disconnect(temporal, settings.task_queue, channel)
    try:
        result = await asyncio.wait_for(
            handle.result(), WAIT_FOR_LIFECYCLE.total_seconds()
        )
    except TimeoutError:
        response.status_code = status.HTTP_202_ACCEPTED
        return DisconnectPublic(id=channel.id, status="disconnecting")
    finally:
        # This process routes no more webhooks to it (others within seconds,
        # api/webhook_path.py ChannelCache).
        request.app.state.webhooks.channels.clear()
    return DisconnectPublic(
        id=channel.id,
        status="disconnected",
        revoked=result.revoked,
        stopped_workflows=result.stopped_workflows,
        detail=result.detail,
    )
