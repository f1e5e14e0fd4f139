"""Hand inbound events to Temporal: signal-with-start the contact's
ConversationWorkflow, or start it eagerly on the API's own worker when the
contact has none (api/ingress.py). The webhook handlers never wait for an
automation."""

from __future__ import annotations

import asyncio
from dataclasses import replace
from datetime import timedelta
from typing import TYPE_CHECKING

from temporalio.client import Client, WithStartWorkflowOperation
from temporalio.common import Priority, WorkflowIDConflictPolicy
from temporalio.exceptions import WorkflowAlreadyStartedError
from temporalio.service import RPCError, RPCStatusCode

from core.contracts import (
    CONVERSATION_WORKFLOW,
    ConversationInput,
    InboundEvent,
    contact_id_for,
    conversation_workflow_id,
)
from core.db import Channel
from core.observability import CONVERSATIONS_STARTED_EAGERLY
from workflows.common import BULK_PRIORITY, CONVERSATION_PRIORITY, search_attributes

if TYPE_CHECKING:
    from api.ingress import Ingress

MAX_CONCURRENT_SIGNALS = 64
SIGNAL_RPC_TIMEOUT = timedelta(seconds=3)

# Answers about the request itself: sent again, it is refused again (a
# payload over Temporal's limit is INVALID_ARGUMENT "Blob data size exceeds
# limit", one over gRPC's message limit RESOURCE_EXHAUSTED "... larger than
# max"). Every other status passes: Temporal down or busy (UNAVAILABLE,
# DEADLINE_EXCEEDED, RESOURCE_EXHAUSTED, INTERNAL...), and the answers every
# request meets until the deployment is fixed (NOT_FOUND namespace,
# PERMISSION_DENIED, UNAUTHENTICATED, FAILED_PRECONDITION namespace not
# active): their events wait in the inbox.
REFUSED_FOR_GOOD = frozenset({RPCStatusCode.INVALID_ARGUMENT, RPCStatusCode.OUT_OF_RANGE})
REASON_MAX_CHARS = 300


def refusal(err: BaseException) -> str | None:
    """Why Temporal will never take this request ("STATUS: message"), or
    None when it may later (REFUSED_FOR_GOOD)."""
    if not isinstance(err, RPCError):
        return None
    too_large = err.status == RPCStatusCode.RESOURCE_EXHAUSTED and "larger than max" in err.message
    if err.status not in REFUSED_FOR_GOOD and not too_large:
        return None
    return f"{err.status.name}: {err.message}"[:REASON_MAX_CHARS]


def _conversation_start(
    task_queue: str, channel: Channel, contact_external_id: str, priority: Priority = CONVERSATION_PRIORITY
) -> dict:
    """Arguments that start a contact's conversation if it is not running
    (with ``priority``: workflows/common.py)."""
    contact_id = contact_id_for(channel.id, contact_external_id, key=channel.contact_key)
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


async def start_eagerly(
    client: Client, task_queue: str, channel: Channel, event: InboundEvent
) -> str:
    """Start the contact's conversation with ``event`` in its input, asking
    Temporal to hand its first task straight back to the API's worker
    (eager start). When the conversation runs already, the event goes to it
    by signal-with-start instead. Returns the workflow id."""
    start = _conversation_start(task_queue, channel, event.sender_id, priority_of(event))
    start["id_conflict_policy"] = WorkflowIDConflictPolicy.FAIL
    try:
        handle = await client.start_workflow(
            start.pop("workflow"),
            replace(start.pop("arg"), first_events=[event]),
            request_eager_start=True,
            rpc_timeout=SIGNAL_RPC_TIMEOUT,
            **start,
        )
    except WorkflowAlreadyStartedError:
        return await signal_conversation(client, task_queue, channel, event.sender_id, "inbound", event)
    if getattr(handle, "__temporal_eagerly_started", False):
        CONVERSATIONS_STARTED_EAGERLY.inc()
    return start["id"]


def conversation_start(task_queue: str, channel: Channel, contact_external_id: str) -> WithStartWorkflowOperation:
    """Start-if-missing operation for a contact's conversation (update-with-start)."""
    start = _conversation_start(task_queue, channel, contact_external_id)
    return WithStartWorkflowOperation(start.pop("workflow"), start.pop("arg"), **start)


async def dispatch_events(
    client: Client,
    task_queue: str,
    routed: list[tuple[Channel, InboundEvent]],
    ingress: Ingress | None = None,
    eager: bool = False,
) -> int:
    """Signal-with-start one conversation per event, concurrently (bounded).

    Events of one contact keep their order: they are sent to the same
    workflow one after another. With ``ingress`` (the API's worker, when it
    runs), the conversations dispatched to are remembered, and with
    ``eager`` a message to a conversation the API does not know of starts
    it eagerly (``start_eagerly``) while the worker has a free slot;
    comments (bulk work) never.
    """
    by_contact: dict[tuple[str, str], list[tuple[Channel, InboundEvent]]] = {}
    for channel, event in routed:
        by_contact.setdefault((channel.id, event.sender_id), []).append((channel, event))
    semaphore = asyncio.Semaphore(MAX_CONCURRENT_SIGNALS)

    async def one_contact(items: list[tuple[Channel, InboundEvent]]) -> None:
        async with semaphore:
            for channel, event in items:
                if ingress is None:
                    await signal_conversation(client, task_queue, channel, event.sender_id, "inbound", event)
                    continue
                workflow_id = conversation_workflow_id(
                    channel.workspace_id, channel.id, contact_id_for(channel.id, event.sender_id, key=channel.contact_key)
                )
                if (
                    eager
                    and priority_of(event) is CONVERSATION_PRIORITY
                    and not ingress.known(workflow_id)
                    and ingress.ready()
                ):
                    await start_eagerly(client, task_queue, channel, event)
                else:
                    await signal_conversation(client, task_queue, channel, event.sender_id, "inbound", event)
                ingress.remember(workflow_id)

    await asyncio.gather(*(one_contact(items) for items in by_contact.values()))
    return len(routed)
