"""The API's own worker (api/ingress.py, on by default): a new contact's
conversation started eagerly in the API, the fall-backs to
signal-with-start, and the slots that keep every other task away from it."""

from __future__ import annotations

import asyncio
import time
from types import SimpleNamespace

import pytest
from sqlmodel import Session
from temporalio.api.enums.v1 import EventType

from api import inbox
from api.dispatch import signal_conversation
from api.ingress import IngressSlots
from core.contracts import InboundEvent, conversation_workflow_id
from core.db import Channel

from helpers import (
    connect_instagram,
    contact_id_of,
    create_automation,
    create_tenant,
    new_sender,
    sandbox_messages,
    send_dm,
    text_of,
    wait_for,
    wait_for_messages,
)


@pytest.fixture
async def api_worker(stack):
    """The session API's own worker (on by default: 2 slots), quiet (earlier
    tests posted fast), for one test."""
    state = stack.api_app.state

    async def running() -> bool:
        return state.ingress.running

    assert await wait_for(running)
    state.webhooks.rate = 0.0
    return state.ingress


HELLO = ({"type": "dm_keyword", "keywords": ["hello"]}, [{"id": "hi", "type": "send_message", "text": "Hi there!"}])


async def _history(stack, tenant, channel, person):
    handle = stack.client.get_workflow_handle(
        conversation_workflow_id(tenant.workspace_id, channel["id"], contact_id_of(stack, channel["id"], person))
    )
    return (await handle.fetch_history()).events


def _signals(events) -> int:
    return sum(e.event_type == EventType.EVENT_TYPE_WORKFLOW_EXECUTION_SIGNALED for e in events)


def _first_task_identity(events) -> str:
    started = next(e for e in events if e.event_type == EventType.EVENT_TYPE_WORKFLOW_TASK_STARTED)
    return started.workflow_task_started_event_attributes.identity


async def _eager_starts(stack) -> float:
    metrics = (await stack.api.get("/metrics")).text
    line = next(x for x in metrics.splitlines() if x.startswith("vectory_conversations_started_eagerly_total"))
    return float(line.split()[-1])


async def _hello_channel_and_first_message(stack):
    """A channel whose automation answers "hello", its row, a new person and
    their first message (not posted: the test hands it over its own way)."""
    tenant = await create_tenant(stack)
    channel, account_id, _ = await connect_instagram(stack, tenant)
    await create_automation(stack, tenant, channel["id"], *HELLO)
    person = new_sender()
    with Session(stack.deps.engine, expire_on_commit=False) as db:
        row = db.get(Channel, channel["id"])
    first = InboundEvent(event_id=f"m_{person}_0", platform="instagram", account_id=account_id,
                         sender_id=person, kind="message", text="hello")
    return tenant, channel, account_id, row, person, first


async def test_a_new_contacts_first_message_is_answered_by_the_apis_worker(stack, api_worker):
    """The first message starts the conversation with the message in its
    input, its first task run by the API's worker (no signal, no trip
    through Temporal's matching); the next message is a signal to it."""
    tenant = await create_tenant(stack)
    channel, account_id, _ = await connect_instagram(stack, tenant)
    await create_automation(stack, tenant, channel["id"], *HELLO)
    person = new_sender()
    before = await _eager_starts(stack)

    await send_dm(stack, account_id, person, "hello")
    calls = await wait_for_messages(stack, person, 1)
    assert text_of(calls[0]) == "Hi there!"
    events = await _history(stack, tenant, channel, person)
    assert _signals(events) == 0
    assert _first_task_identity(events).endswith("/api")  # run by the API's worker
    assert await _eager_starts(stack) == before + 1

    await send_dm(stack, account_id, person, "hello again")
    calls = await wait_for_messages(stack, person, 2)
    assert [text_of(c) for c in calls] == ["Hi there!", "Hi there!"]
    assert _signals(await _history(stack, tenant, channel, person)) == 1
    assert await _eager_starts(stack) == before + 1


async def test_a_running_conversation_the_api_did_not_know_gets_the_message_by_signal(stack, api_worker):
    """A conversation started elsewhere (another API replica, before a
    restart): the eager start is refused and the message is signalled to
    it, handled once."""
    tenant, channel, account_id, row, person, elsewhere = await _hello_channel_and_first_message(stack)
    await signal_conversation(stack.client, stack.settings.task_queue, row, person, "inbound", elsewhere)
    await wait_for_messages(stack, person, 1)
    before = await _eager_starts(stack)

    await send_dm(stack, account_id, person, "hello from the webhook")
    await wait_for_messages(stack, person, 2)
    await asyncio.sleep(0.5)  # nothing more arrives
    assert [text_of(c) for c in await sandbox_messages(stack, person)] == ["Hi there!", "Hi there!"]
    assert _signals(await _history(stack, tenant, channel, person)) == 2
    assert await _eager_starts(stack) == before


async def test_a_conversation_the_inbox_relayed_is_known_to_the_apis_worker(stack, api_worker):
    """An event kept in the durable inbox reaches its new conversation by the
    relay's signal-with-start; the API's worker then knows the conversation
    runs, so the contact's next webhook is a signal, not a refused start."""
    tenant, channel, account_id, row, person, held = await _hello_channel_and_first_message(stack)
    inbox.store(stack.deps.engine, [(row, held)])
    stack.api_app.state.inbox.wakeup.set()
    await wait_for_messages(stack, person, 1)
    workflow_id = conversation_workflow_id(tenant.workspace_id, channel["id"], contact_id_of(stack, channel["id"], person))

    async def known() -> bool:
        return api_worker.known(workflow_id)

    assert await wait_for(known)
    before = await _eager_starts(stack)

    await send_dm(stack, account_id, person, "hello from the webhook")
    assert len(await wait_for_messages(stack, person, 2)) == 2
    assert _signals(await _history(stack, tenant, channel, person)) == 2
    assert await _eager_starts(stack) == before


@pytest.mark.parametrize("load", ["another webhook in flight", "webhooks arriving fast"])
async def test_under_load_the_workers_take_the_new_conversation(stack, api_worker, load):
    """The API's CPU goes to answering webhooks: a burst (another webhook
    waits on Temporal) or a high rate leaves new conversations to the
    worker processes."""
    tenant = await create_tenant(stack)
    channel, account_id, _ = await connect_instagram(stack, tenant)
    await create_automation(stack, tenant, channel["id"], *HELLO)
    person = new_sender()
    state = stack.api_app.state
    busy = load == "another webhook in flight"
    if busy:
        state.webhooks.dispatching += 1
    else:
        state.webhooks.rate, state.webhook_rate_at = 500.0, time.monotonic()
    try:
        await send_dm(stack, account_id, person, "hello")
        await wait_for_messages(stack, person, 1)
    finally:
        if busy:
            state.webhooks.dispatching -= 1
    events = await _history(stack, tenant, channel, person)
    assert _signals(events) == 1
    assert not _first_task_identity(events).endswith("/api")


CTX = SimpleNamespace(is_sticky=False)
STICKY = SimpleNamespace(is_sticky=True)


async def test_the_apis_worker_never_polls_the_shared_queue_and_bounds_its_own_work():
    slots = IngressSlots(2)
    # A poll of the shared task queue never gets a slot.
    with pytest.raises(TimeoutError):
        await asyncio.wait_for(slots.reserve_slot(CTX), 0.2)
    # Eager starts: two at once, the third refused (it goes to the workers).
    eager = [slots.try_reserve_slot(CTX), slots.try_reserve_slot(CTX)]
    assert all(eager) and slots.try_reserve_slot(CTX) is None and not slots.available()
    slots.release_slot(SimpleNamespace(permit=eager[0]))
    assert slots.available()
    # Its own (sticky) queue: two at once, the third waits for a release.
    sticky = [await slots.reserve_slot(STICKY), await slots.reserve_slot(STICKY)]
    third = asyncio.ensure_future(slots.reserve_slot(STICKY))
    await asyncio.sleep(0.1)
    assert not third.done()
    slots.release_slot(SimpleNamespace(permit=sticky[0]))
    assert await asyncio.wait_for(third, 1)
    assert slots.available()  # sticky work does not take the eager slots
