"""Hand inbound events to Temporal: signal-with-start the contact's
ConversationWorkflow. The webhook handlers never wait for an automation."""

from __future__ import annotations

import asyncio
from datetime import timedelta

from temporalio.client import Client, WithStartWorkflowOperation
from temporalio.common import Priority, WorkflowIDConflictPolicy

from core.contracts import (
    CONVERSATION_WORKFLOW,
    ConversationInput,
    InboundEvent,
    contact_id_for,
    conversation_workflow_id,
)
from core.db import Channel
from workflows.common import BULK_PRIORITY, CONVERSATION_PRIORITY, search_attributes

MAX_CONCURRENT_SIGNALS = 64
SIGNAL_RPC_TIMEOUT = timedelta(seconds=3)


def _conversation_start(
    task_queue: str, channel: Channel, contact_external_id: str, priority: Priority = CONVERSATION_PRIORITY
) -> dict:
    """Arguments that start a contact's conversation if it is not running
    (with ``priority``: workflows/common.py)."""
    contact_id = contact_id_for(channel.id, contact_external_id)
    return {
        "workflow": CONVERSATION_WORKFLOW,
        "arg": ConversationInput(
            workspace_id=channel.workspace_id,
            channel_id=channel.id,
            platform=channel.platform,
            contact_id=contact_id,
            contact_external_id=contact_external_id,
        ),
        "id": conversation_workflow_id(channel.workspace_id, channel.id, contact_id),
        "task_queue": task_queue,
        "id_conflict_policy": WorkflowIDConflictPolicy.USE_EXISTING,
        "search_attributes": search_attributes(channel.workspace_id, channel.id, contact_id, "", channel.platform),
        "priority": priority,
    }


def priority_of(arg: object) -> Priority:
    """The task priority of the conversation an event (or API call) starts."""
    return BULK_PRIORITY if isinstance(arg, InboundEvent) and arg.kind == "comment" else CONVERSATION_PRIORITY


async def signal_conversation(
    client: Client,
    task_queue: str,
    channel: Channel,
    contact_external_id: str,
    signal: str,
    arg: object,
) -> str:
    """Signal-with-start the contact's conversation; returns its workflow id.
    A conversation a comment starts runs at bulk priority."""
    start = _conversation_start(task_queue, channel, contact_external_id, priority_of(arg))
    await client.start_workflow(
        start.pop("workflow"),
        start.pop("arg"),
        start_signal=signal,
        start_signal_args=[arg],
        # Fail fast when Temporal is down: the webhook keeps the event in the inbox.
        rpc_timeout=SIGNAL_RPC_TIMEOUT,
        **start,
    )
    return start["id"]


def conversation_start(task_queue: str, channel: Channel, contact_external_id: str) -> WithStartWorkflowOperation:
    """Start-if-missing operation for a contact's conversation (update-with-start)."""
    start = _conversation_start(task_queue, channel, contact_external_id)
    return WithStartWorkflowOperation(start.pop("workflow"), start.pop("arg"), **start)


async def dispatch_events(
    client: Client, task_queue: str, routed: list[tuple[Channel, InboundEvent]]
) -> int:
    """Signal-with-start one conversation per event, concurrently (bounded).

    Events of one contact keep their order: they are sent to the same
    workflow one after another.
    """
    by_contact: dict[tuple[str, str], list[tuple[Channel, InboundEvent]]] = {}
    for channel, event in routed:
        by_contact.setdefault((channel.id, event.sender_id), []).append((channel, event))
    semaphore = asyncio.Semaphore(MAX_CONCURRENT_SIGNALS)

    async def one_contact(items: list[tuple[Channel, InboundEvent]]) -> None:
        async with semaphore:
            for channel, event in items:
                await signal_conversation(client, task_queue, channel, event.sender_id, "inbound", event)

    await asyncio.gather(*(one_contact(items) for items in by_contact.values()))
    return len(routed)
