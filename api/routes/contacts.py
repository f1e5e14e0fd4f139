"""Contacts (the CRM) and their message log."""

from __future__ import annotations

import secrets
from datetime import datetime
from typing import Annotated, Any

from fastapi import APIRouter, HTTPException, status
from pydantic import BaseModel, Field, StrictBool, StringConstraints, field_validator
from pydantic_core import PydanticCustomError
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
from api.problems import unprocessable
from core.audit import audit
from core.contracts import (
    HumanMessageInput,
    HumanMessageResult,
    ResumeSignal,
    StopRunsSignal,
    conversation_workflow_id,
)
from core.db import Channel, Contact, ContactTag, Message, Run, tag_key, utcnow
from core.limits import (
    FIELD_KEY_ALPHABET,
    FIELD_KEY_RE,
    MAX_FIELD_KEY,
    MAX_FIELD_VALUE,
    MAX_FIELDS,
    MAX_FIELDS_SIZE,
    MAX_NAME,
    MAX_TAG,
    MAX_TAGS,
    MAX_TEXT,
    fields_refused,
    shown,
    value_length,
)

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
    first_name: str | None = Field(None, max_length=MAX_NAME)
    last_name: str | None = Field(None, max_length=MAX_NAME)
    tags: list[Annotated[str, StringConstraints(max_length=MAX_TAG)]] | None = Field(
        None,
        max_length=MAX_TAGS,
        description=f"Replaces the contact's tags: at most {MAX_TAGS}, each at most {MAX_TAG} characters.",
    )
    fields: dict[str, Any] | None = Field(
        None,
        description=(
            "Merged into the contact's fields; null values delete a field. A key is 1 to "
            f"{MAX_FIELD_KEY} {FIELD_KEY_ALPHABET}; a value at most {MAX_FIELD_VALUE} characters (another "
            f"value's JSON too); at most {MAX_FIELDS} fields and {MAX_FIELDS_SIZE} bytes of JSON in all "
            "(docs/limits.md)."
        ),
    )
    # Strict: a privacy decision is never read into "yes" or 0.
    processing_restricted: StrictBool | None = Field(
        None, description="Restrict processing: inbound messages are logged, no automation runs, nothing is sent."
    )
    consent_withdrawn: StrictBool | None = Field(
        None, description="The person withdrew consent: same effect as a restriction, recorded separately."
    )

    @field_validator("fields")
    @classmethod
    def _fields(cls, value: dict[str, Any] | None) -> dict[str, Any] | None:
        for key, item in (value or {}).items():
            if item is None:
                continue  # deleting: any key stored before the limits can go
            if not FIELD_KEY_RE.fullmatch(key):
                raise PydanticCustomError(
                    "field_key",
                    f"field key {shown(key)} must be 1 to {MAX_FIELD_KEY} characters of {FIELD_KEY_ALPHABET} "
                    "(MAX_FIELD_KEY)",
                )
            if value_length(item) > MAX_FIELD_VALUE:
                raise PydanticCustomError(
                    "field_value",
                    f"field {key!r}: the value is {value_length(item)} characters long; the limit is "
                    f"{MAX_FIELD_VALUE} (MAX_FIELD_VALUE)",
                )
        return value


def _merged_fields(current: dict[str, Any], changes: dict[str, Any]) -> dict[str, Any]:
    """The contact's fields with ``changes`` applied; 422 when they add to a
    contact over its limits (count, total size). A contact stored over them
    before they existed can still be updated if the update does not grow it."""
    fields = dict(current)
    for key, value in changes.items():
        if value is None:
            fields.pop(key, None)
        else:
            fields[key] = value
    refused = fields_refused(current, fields)
    if refused:
        raise unprocessable(["body", "fields"], refused)
    return fields


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
        contact.fields = _merged_fields(dict(contact.fields or {}), body.fields)
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
    text: str = Field(min_length=1, max_length=MAX_TEXT)


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
