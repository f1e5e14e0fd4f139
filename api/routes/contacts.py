"""Contacts (the CRM) and their message log."""

from __future__ import annotations

import secrets
from datetime import datetime
from typing import Any

from fastapi import APIRouter, HTTPException, status
from pydantic import BaseModel, Field
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
from api.dispatch import conversation_start, signal_conversation
from core.audit import audit
from core.contracts import (
    HumanMessageInput,
    HumanMessageResult,
    ResumeSignal,
    StopRunsSignal,
    conversation_workflow_id,
)
from core.db import Channel, Contact, ContactTag, Message, Run, tag_key, utcnow

router = APIRouter(prefix="/v1/contacts", tags=["contacts"])


class ContactPublic(BaseModel):
    id: str
    channel_id: str
    external_id: str
    first_name: str
    last_name: str
    username: str
    tags: list[str]
    fields: dict[str, Any]
    human_takeover: bool
    processing_restricted: bool
    consent_withdrawn: bool
    last_inbound_at: datetime | None
    created_at: datetime


class ContactList(BaseModel):
    data: list[ContactPublic]
    count: int = Field(description=COUNT_DESCRIPTION)


class ContactUpdate(BaseModel):
    model_config = {"extra": "forbid"}
    first_name: str | None = Field(None, max_length=200)
    last_name: str | None = Field(None, max_length=200)
    tags: list[str] | None = Field(None, max_length=200, description="Replaces the contact's tags.")
    fields: dict[str, Any] | None = Field(None, description="Merged into the contact's fields; null values delete a field.")
    processing_restricted: bool | None = Field(
        None, description="Restrict processing: inbound messages are logged, no automation runs, nothing is sent."
    )
    consent_withdrawn: bool | None = Field(
        None, description="The person withdrew consent: same effect as a restriction, recorded separately."
    )


class MessagePublic(BaseModel):
    id: int
    direction: str
    kind: str
    text: str
    payload: str
    run_id: str
    # Inbound: the platform sent more than its documented maximum; the text was cut to it.
    truncated: bool = False
    created_at: datetime


class MessageList(BaseModel):
    data: list[MessagePublic]
    count: int = Field(description=COUNT_DESCRIPTION)


def public(c: Contact) -> ContactPublic:
    return ContactPublic(
        id=c.id,
        channel_id=c.channel_id,
        external_id=c.external_id,
        first_name=c.first_name,
        last_name=c.last_name,
        username=c.username,
        tags=list(c.tags or []),
        fields=dict(c.fields or {}),
        human_takeover=c.human_takeover,
        processing_restricted=c.processing_restricted,
        consent_withdrawn=c.consent_withdrawn,
        last_inbound_at=c.last_inbound_at,
        created_at=c.created_at,
    )


def get_owned(session, workspace_id: str, contact_id: str) -> Contact:
    contact = session.get(Contact, contact_id)
    if contact is None or contact.workspace_id != workspace_id:
        raise HTTPException(status.HTTP_404_NOT_FOUND, "contact not found")
    return contact


@router.get(
    "",
    response_model=ContactList,
    operation_id="list_contacts",
    summary="List contacts, oldest first",
    description="`tag` matches one of the contact's tags, case-insensitively.",
)
def list_contacts(
    workspace: CurrentWorkspace,
    session: SessionDep,
    channel_id: str | None = None,
    tag: str | None = None,
    limit: Limit = DEFAULT_PAGE_SIZE,
    offset: Offset = 0,
) -> ContactList:
    query = select(Contact).where(Contact.workspace_id == workspace.id)
    if channel_id:
        query = query.where(Contact.channel_id == channel_id)
    if tag:
        tagged = select(ContactTag.contact_id).where(
            ContactTag.workspace_id == workspace.id, ContactTag.tag == tag_key(tag)
        )
        query = query.where(col(Contact.id).in_(tagged))
    rows, total = paged(session, query, [col(Contact.created_at), col(Contact.id)], limit, offset)
    return ContactList(data=[public(c) for c in rows], count=total)


@router.get("/{contact_id}", response_model=ContactPublic, operation_id="get_contact", summary="Get a contact")
def get_contact(contact_id: str, workspace: CurrentWorkspace, session: SessionDep) -> ContactPublic:
    return public(get_owned(session, workspace.id, contact_id))


@router.patch(
    "/{contact_id}",
    response_model=ContactPublic,
    operation_id="update_contact",
    summary="Update a contact",
    description="Setting processing_restricted or consent_withdrawn also stops the contact's running runs.",
)
async def update_contact(
    contact_id: str, body: ContactUpdate, workspace: CurrentWorkspace, session: SessionDep, temporal: TemporalDep
) -> ContactPublic:
    contact = get_owned(session, workspace.id, contact_id)
    if body.first_name is not None:
        contact.first_name = body.first_name
    if body.last_name is not None:
        contact.last_name = body.last_name
    if body.tags is not None:
        contact.tags = list(dict.fromkeys(t.strip() for t in body.tags if t.strip()))
    if body.fields is not None:
        fields = dict(contact.fields or {})
        for key, value in body.fields.items():
            if value is None:
                fields.pop(key, None)
            else:
                fields[key] = value
        contact.fields = fields
    if body.processing_restricted is not None:
        contact.processing_restricted = body.processing_restricted
        audit(session, workspace.id, "api_key", f"contact.restrict.{str(body.processing_restricted).lower()}", contact.id)
    if body.consent_withdrawn is not None:
        contact.consent_withdrawn = body.consent_withdrawn
        audit(session, workspace.id, "api_key", f"contact.consent_withdrawn.{str(body.consent_withdrawn).lower()}", contact.id)
    contact.updated_at = utcnow()
    session.add(contact)
    session.commit()
    if contact.processing_restricted or contact.consent_withdrawn:
        await stop_runs(temporal, session, contact)
    return public(contact)


async def stop_runs(temporal, session, contact: Contact) -> int:
    """Cancel the contact's running runs (they record themselves as cancelled),
    and tell the conversation, which cancels a run it is starting right now
    (not recorded yet) once that start completes."""
    runs = session.exec(
        select(Run).where(Run.contact_id == contact.id, col(Run.status).in_(["running", "waiting"]))
    ).all()
    handles = [temporal.get_workflow_handle(run.id).cancel() for run in runs]
    conversation = conversation_workflow_id(contact.workspace_id, contact.channel_id, contact.id)
    handles.append(temporal.get_workflow_handle(conversation).signal("stop_runs", StopRunsSignal()))
    for call in handles:
        try:
            await call
        except RPCError as err:
            if err.status != RPCStatusCode.NOT_FOUND:
                raise
    return len(runs)


@router.get(
    "/{contact_id}/messages",
    response_model=MessageList,
    operation_id="list_contact_messages",
    summary="The contact's message log, newest first",
)
def list_messages(
    contact_id: str,
    workspace: CurrentWorkspace,
    session: SessionDep,
    limit: Limit = DEFAULT_PAGE_SIZE,
    offset: Offset = 0,
) -> MessageList:
    contact = get_owned(session, workspace.id, contact_id)
    rows, total = paged(
        session,
        select(Message).where(Message.contact_id == contact.id),
        [col(Message.created_at).desc(), col(Message.id).desc()],
        limit,
        offset,
    )
    return MessageList(
        data=[
            MessagePublic(
                id=m.id or 0,
                direction=m.direction,
                kind=m.kind,
                text=m.text,
                payload=m.payload,
                run_id=m.run_id,
                truncated=m.truncated,
                created_at=m.created_at,
            )
            for m in rows
        ],
        count=total,
    )


class HumanMessageCreate(BaseModel):
    model_config = {"extra": "forbid"}
    text: str = Field(min_length=1, max_length=1000)


class HumanMessageSent(BaseModel):
    status: str
    platform_message_id: str = ""
    detail: str = ""


@router.post(
    "/{contact_id}/messages",
    status_code=status.HTTP_201_CREATED,
    response_model=HumanMessageSent,
    operation_id="send_human_message",
    summary="Send a teammate's reply to the contact",
    description=(
        "Sent through the contact's conversation workflow with Meta's HUMAN_AGENT tag, which allows "
        "human-written replies up to 7 days after the person's last message. 409 when outside that "
        "window (nothing is sent); Telegram has no window."
    ),
    responses={409: {"description": "outside the messaging window"}},
)
async def send_human_message(
    contact_id: str,
    body: HumanMessageCreate,
    workspace: CurrentWorkspace,
    session: SessionDep,
    temporal: TemporalDep,
    settings: SettingsDep,
) -> HumanMessageSent:
    contact = get_owned(session, workspace.id, contact_id)
    channel = session.get(Channel, contact.channel_id)
    if channel is None or channel.status != "active":
        raise HTTPException(status.HTTP_409_CONFLICT, "the contact's channel is not active")
    result: HumanMessageResult = await temporal.execute_update_with_start_workflow(
        "send_human_message",
        HumanMessageInput(request_id=secrets.token_hex(8), text=body.text),
        start_workflow_operation=conversation_start(settings.task_queue, channel, contact.external_id),
        result_type=HumanMessageResult,
    )
    if result.status == "skipped":
        raise HTTPException(status.HTTP_409_CONFLICT, result.detail)
    if result.status != "sent":
        raise HTTPException(status.HTTP_502_BAD_GATEWAY, f"the platform did not accept the message: {result.detail}")
    audit(session, workspace.id, "api_key", "message.human", contact.id)
    session.commit()
    return HumanMessageSent(status=result.status, platform_message_id=result.platform_message_id)


@router.post(
    "/{contact_id}/resume",
    status_code=status.HTTP_202_ACCEPTED,
    response_model=ContactPublic,
    operation_id="resume_contact",
    summary="End a human takeover: automations run again for this contact",
)
async def resume_contact(
    contact_id: str, workspace: CurrentWorkspace, session: SessionDep, temporal: TemporalDep, settings: SettingsDep
) -> ContactPublic:
    contact = get_owned(session, workspace.id, contact_id)
    channel = session.get(Channel, contact.channel_id)
    contact.human_takeover = False
    contact.updated_at = utcnow()
    session.add(contact)
    session.commit()
    if channel is not None and channel.status == "active":
        await signal_conversation(temporal, settings.task_queue, channel, contact.external_id, "resume", ResumeSignal())
    return public(contact)
