"""Workflow tests on the time-skipping test server, with mocked activities.

The mocks are registered under the real activity names and record their
calls, so each test asserts what a person (or the operator) would notice:
which messages went out, when, and what the run's trail says.

The time-skipping server does not know the custom search attributes that
``ConversationWorkflow`` sets on its ``AutomationRun`` children; unregistered,
the child start is never resolved and the conversation hangs. The ``env``
fixture registers them through the operator service, so conversation tests
run here too (no dev server needed).

Two more quirks of the time-skipping server, both handled below:
- stopping a worker (or terminating a workflow) while a workflow task is
  pending (a conversation just signalled, or told that its child run
  closed) leaves the server's clock
  locked for the rest of the session: later timers then run in real time.
  Conversations are therefore closed only once idle (``close_conversation``).
- awaiting a result skips timers but not an activity's retry backoff, and
  ``env.sleep()`` while an activity attempt is running can time the attempt
  out and wedge the clock (sdk-java#3092); see the disconnect test.

``VECTORY_RECORD_HISTORIES=1`` saves histories to tests/histories/ for
tests/test_replay.py.
"""

from __future__ import annotations

import asyncio
import logging
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from dataclasses import replace
from datetime import datetime, timedelta

import pytest
from temporalio import activity
from temporalio.api.enums.v1 import EventType, IndexedValueType
from temporalio.api.operatorservice.v1 import AddSearchAttributesRequest
from temporalio.client import Client, WorkflowFailureError, WorkflowHandle
from temporalio.exceptions import ApplicationError
from temporalio.service import RPCError, RPCStatusCode
from temporalio.testing import WorkflowEnvironment
from temporalio.worker import Worker

from activities.crm import matched_automations
from activities.messaging import first_reply_plan
from core import flowrt
from core.contracts import (
    AUTOMATION_RUN_WORKFLOW,
    CONNECT_CHANNEL_WORKFLOW,
    CONVERSATION_WORKFLOW,
    DISCONNECT_CHANNEL_WORKFLOW,
    AckCallbackInput,
    Attachment,
    AutomationSnapshot,
    ChannelRef,
    ChannelStatusInput,
    ChannelVerified,
    ConnectChannelInput,
    ConnectResult,
    ContactRef,
    ContactSnapshot,
    ConversationInput,
    DisconnectResult,
    ExpireHistorySignal,
    FirstSend,
    GenerateReplyInput,
    GenerateReplyResult,
    InboundEvent,
    ProfileInput,
    PurgeDataInput,
    RecordInboundInput,
    RecordInboundResult,
    RecordRunInput,
    ReplySignal,
    ResumeSignal,
    RevokeResult,
    RunInput,
    RunResult,
    RunStatus,
    SendMessageInput,
    SendMessageResult,
    StopWorkflowsResult,
    UpdateContactInput,
    contact_id_for,
    conversation_workflow_id,
)
from workers.main import WORKFLOWS, workflow_runner
from workflows.conversation import run_workflow_id

from conftest import TEST_SERVER
from record_histories import maybe_save_history

RUNNER = workflow_runner("strict")
SEARCH_ATTRIBUTES = ("WorkspaceId", "ChannelId", "ContactId", "AutomationId", "Platform")
RESULT_TIMEOUT = 30  # seconds of real time

CHANNEL = "ch_test"
ACCOUNT = "17841400000000001"
SENDER = "igsid-1001"
CONTACT = contact_id_for(CHANNEL, SENDER, key="")

PRICE_FLOW = {
    "trigger": {"type": "dm_keyword", "keywords": ["price", "cost"], "match": "contains"},
    "steps": [
        {"id": "ask", "type": "send_message", "text": "Hi {{contact.first_name | there}}! Reply with your email."},
        {"id": "email", "type": "wait_for_reply", "timeout_seconds": 86400, "validate": "email",
         "save_to_field": "email", "retry_prompt": "That does not look like an email. Try again?",
         "on_timeout": "bye"},
        {"id": "thanks", "type": "send_message", "text": "Thanks! It is on its way to {{contact.fields.email}}.",
         "next": "end"},
        {"id": "bye", "type": "send_message", "text": "No worries, ask any time."},
    ],
}
ASK = "Hi there! Reply with your email."
BYE = "No worries, ask any time."

# Catches every message: if a reply were not routed to the waiting run, this would start a second run.
CATCH_ALL = {
    "trigger": {"type": "any_message", "scope": "default"},
    "steps": [{"id": "fallback", "type": "send_message", "text": "We will get back to you."}],
}
HANDOFF_FLOW = {
    "trigger": {"type": "dm_keyword", "keywords": ["help"]},
    "steps": [{"id": "human", "type": "handoff", "message": "A teammate will reply soon."}],
}
MENU_FLOW = {
    "trigger": {"type": "dm_keyword", "keywords": ["menu"]},
    "steps": [{"id": "menu", "type": "send_message", "text": "Here is the menu"}],
}


def automation(automation_id: str, flow: dict) -> AutomationSnapshot:
    return AutomationSnapshot(id=automation_id, version=1, name=automation_id, definition=flow)


# --- mocked activities ----------------------------------------------------------------------------


class Mocks:
    """Activities under their real names; every call is recorded."""

    def __init__(self, automations: list[AutomationSnapshot] | None = None) -> None:
        self.automations = automations or []
        self.contact = ContactSnapshot(id=CONTACT, external_id=SENDER)
        self.inbound: list[RecordInboundInput] = []
        self.rematched: list[RecordInboundInput] = []
        self.updates: list[UpdateContactInput] = []
        self.runs: list[RecordRunInput] = []
        self.sent: list[tuple[datetime, SendMessageInput]] = []
        self.sent_keys: dict[str, str] = {}
        self.send_calls: list[activity.Info] = []
        self.acks: list[AckCallbackInput] = []
        self.profile_lookups: list[str] = []  # "send" (by the send) or "activity" (fetch_profile)
        self.profile_calls: list[activity.Info] = []  # fetch_profile's attempts
        self.profile_first_name = "Ana"
        self.ai_calls: list[GenerateReplyInput] = []
        self.verified: list[ConnectChannelInput] = []
        self.subscribed: list[ConnectChannelInput] = []
        self.statuses: list[ChannelStatusInput] = []
        self.revokes: list[ChannelRef] = []
        self.purged: list[PurgeDataInput] = []
        self.stopped: list[ChannelRef] = []
        # Behaviour switches.
        self.reply_in_record = True  # record_inbound sends the reply when asked (as the real one)
        self.send_error: Exception | None = None
        self.send_failures = 0  # fail this many calls, then succeed
        self.ai_error: Exception | None = None
        self.ai_gate: asyncio.Event | None = None  # set: the model answers only once it is set
        self.ai_finished = 0
        self.verify_error: Exception | None = None
        self.revoke_error: Exception | None = None
        self.refused_text: str | None = None  # record_inbound refuses an event with this text (UnrecordableEvent)
        self.profile_error: Exception | None = None  # fetch_profile raises this
        self.profile_failures = 0  # fetch_profile fails this many calls (PlatformUnavailable), then succeeds

    def look_up_profile(self, by: str) -> ContactSnapshot:
        self.profile_lookups.append(by)
        self.contact = replace(self.contact, first_name=self.profile_first_name, is_new=False)
        return replace(self.contact)

    @property
    def texts(self) -> list[str]:
        return [s.text for _, s in self.sent]

    def started_runs(self) -> list[str]:
        """Run ids in start order (AutomationRun records "running" once, at its start)."""
        return [r.run_id for r in self.runs if r.status == "running"]

    def activities(self) -> list[Callable]:
        @activity.defn(name="record_inbound")
        async def record_inbound(input: RecordInboundInput) -> RecordInboundResult:
            if self.refused_text is not None and input.event.text == self.refused_text:
                raise ApplicationError("the database refused this event", type="UnrecordableEvent", non_retryable=True)
            self.inbound.append(input)
            first_message = len(self.inbound) == 1
            record = RecordInboundResult(
                duplicate=False,
                contact=replace(self.contact),
                # Like the real activity: only the automation the event starts.
                automations=matched_automations(input, self.automations, self.contact, first_message=first_message),
                has_previous_inbound=not first_message,
            )
            # Like the real activity: the reply matched and sent right after
            # the recording when the conversation leaves it to this activity.
            opening = first_reply_plan(input, record) if input.first_reply and self.reply_in_record else None
            if opening is not None:
                run_id, step_id, send = opening
                try:
                    record.first_send = FirstSend(run_id, step_id, result=await send_message(send))
                except ApplicationError as err:
                    record.first_send = FirstSend(run_id, step_id, error_type=err.type or "ApplicationError")
            return record

        @activity.defn(name="load_contact")
        async def load_contact(input: ContactRef) -> ContactSnapshot | None:
            return replace(self.contact)

        @activity.defn(name="load_match_context")
        async def load_match_context(input: RecordInboundInput) -> RecordInboundResult:
            self.rematched.append(input)
            return RecordInboundResult(
                duplicate=False, contact=replace(self.contact),
                automations=matched_automations(input, self.automations, self.contact, first_message=False),
                has_previous_inbound=True,
            )

        @activity.defn(name="update_contact")
        async def update_contact(input: UpdateContactInput) -> ContactSnapshot:
            self.updates.append(input)
            c = self.contact
            tags = [t for t in c.tags if t not in input.remove_tags]
            tags += [t for t in input.add_tags if t not in tags]
            self.contact = replace(
                c,
                tags=tags,
                fields={**c.fields, **input.set_fields},
                human_takeover=c.human_takeover if input.human_takeover is None else input.human_takeover,
            )
            return replace(self.contact)

        @activity.defn(name="record_run")
        async def record_run(input: RecordRunInput) -> None:
            self.runs.append(input)

        @activity.defn(name="send_message")
        async def send_message(input: SendMessageInput) -> SendMessageResult:
            # Like the real activity: one send per idempotency key, and the
            # run it completes recorded once it is sent or found sent.
            if input.idempotency_key in self.sent_keys:
                if input.completes_run is not None:
                    self.runs.append(input.completes_run)
                return SendMessageResult(platform_message_id=self.sent_keys[input.idempotency_key], deduplicated=True)
            looked_up = None
            if input.profile_first_template:  # like the real activity: look up, then render
                looked_up = self.look_up_profile("send")
                text = flowrt.render(input.profile_first_template, looked_up, {})
                run = input.completes_run
                if run is not None:
                    run = replace(run, trail=[*run.trail[:-1], replace(run.trail[-1], detail=text)])
                input = replace(input, text=text, completes_run=run)
            self.sent.append((activity.info().current_attempt_scheduled_time, input))
            self.send_calls.append(activity.info())
            if self.send_error is not None:
                raise self.send_error
            if self.send_failures > 0:
                self.send_failures -= 1
                raise ApplicationError("platform unavailable", type="PlatformUnavailable")
            self.sent_keys[input.idempotency_key] = f"mid.{len(self.sent)}"
            if input.completes_run is not None:
                self.runs.append(input.completes_run)
            result = SendMessageResult(platform_message_id=self.sent_keys[input.idempotency_key])
            if input.profile_first_template:
                result.profile_looked_up, result.contact, result.text = True, looked_up, input.text
            elif input.then_fetch_profile:
                result.profile_looked_up, result.contact = True, self.look_up_profile("send")
            return result

        @activity.defn(name="fetch_profile")
        async def fetch_profile(input: ProfileInput) -> ContactSnapshot | None:
            self.profile_calls.append(activity.info())
            if self.profile_error is not None:
                raise self.profile_error
            if self.profile_failures > 0:
                self.profile_failures -= 1
                raise ApplicationError("platform unavailable", type="PlatformUnavailable")
            return self.look_up_profile("activity")

        @activity.defn(name="acknowledge_callback")
        async def acknowledge_callback(input: AckCallbackInput) -> None:
            self.acks.append(input)

        @activity.defn(name="generate_reply")
        async def generate_reply(input: GenerateReplyInput) -> GenerateReplyResult:
            self.ai_calls.append(input)
            if self.ai_gate is not None:
                await self.ai_gate.wait()
                self.ai_finished += 1
            if self.ai_error is not None:
                raise self.ai_error
            return GenerateReplyResult(text="Hello from the model")

        @activity.defn(name="verify_channel")
        async def verify_channel(input: ConnectChannelInput) -> ChannelVerified:
            self.verified.append(input)
            if self.verify_error is not None:
                raise self.verify_error
            return ChannelVerified(external_id=ACCOUNT, name="Acme Shop")

        @activity.defn(name="subscribe_webhooks")
        async def subscribe_webhooks(input: ConnectChannelInput) -> None:
            self.subscribed.append(input)

        @activity.defn(name="set_channel_status")
        async def set_channel_status(input: ChannelStatusInput) -> None:
            self.statuses.append(input)

        @activity.defn(name="revoke_token")
        async def revoke_token(input: ChannelRef) -> RevokeResult:
            self.revokes.append(input)
            if self.revoke_error is not None:
                raise self.revoke_error
            return RevokeResult(revoked=True)

        @activity.defn(name="purge_data")
        async def purge_data(input: PurgeDataInput) -> None:
            self.purged.append(input)

        @activity.defn(name="stop_channel_workflows")
        async def stop_channel_workflows(input: ChannelRef) -> StopWorkflowsResult:
            self.stopped.append(input)
            return StopWorkflowsResult(stopped=2)

        return [
            record_inbound, load_contact, load_match_context, update_contact, record_run, send_message, fetch_profile,
            acknowledge_callback,
            generate_reply, verify_channel, subscribe_webhooks, set_channel_status, revoke_token, purge_data,
            stop_channel_workflows,
        ]


# --- fixtures and helpers -------------------------------------------------------------------------


@pytest.fixture(scope="session")
async def env(time_skipping: WorkflowEnvironment) -> WorkflowEnvironment:
    """The time-skipping server with the search attributes the conversation sets on its runs."""
    try:
        await time_skipping.client.operator_service.add_search_attributes(
            AddSearchAttributesRequest(
                namespace=time_skipping.client.namespace,
                search_attributes={n: IndexedValueType.INDEXED_VALUE_TYPE_KEYWORD for n in SEARCH_ATTRIBUTES},
            )
        )
    except RPCError as err:
        if err.status != RPCStatusCode.ALREADY_EXISTS:
            raise
    return time_skipping


@asynccontextmanager
async def running_worker(
    client: Client, mocks: Mocks, *, task_queue: str | None = None, **kwargs
) -> AsyncIterator[str]:
    """A worker on a (fresh) task queue, configured like workers/main.py; yields the task queue."""
    task_queue = task_queue or f"wf-test-{uuid.uuid4()}"
    async with Worker(
        client,
        task_queue=task_queue,
        workflows=WORKFLOWS,
        activities=mocks.activities(),
        workflow_runner=RUNNER,
        **kwargs,
    ):
        yield task_queue


def new_workspace() -> str:
    return f"ws_{uuid.uuid4().hex[:12]}"


def dm(event_id: str, text: str) -> InboundEvent:
    return InboundEvent(
        event_id=event_id, platform="instagram", account_id=ACCOUNT, sender_id=SENDER, kind="message", text=text
    )


def run_input(workspace_id: str, flow: dict, *, automation_id: str = "auto_1") -> RunInput:
    return RunInput(
        run_id=f"{workspace_id}/run/{automation_id}/{uuid.uuid4().hex[:8]}",
        workspace_id=workspace_id,
        channel_id=CHANNEL,
        platform="instagram",
        contact=ContactSnapshot(id=CONTACT, external_id=SENDER),
        automation=automation(automation_id, flow),
        conversation_workflow_id="",  # started directly: no parent conversation to signal
    )


async def outcome(handle: WorkflowHandle):
    """The workflow's result, bounded: if the server's clock stopped skipping, fail instead of hanging."""
    return await asyncio.wait_for(handle.result(), RESULT_TIMEOUT)


async def execute_run(client: Client, task_queue: str, input: RunInput) -> RunResult:
    handle = await client.start_workflow(
        AUTOMATION_RUN_WORKFLOW, input, id=input.run_id, task_queue=task_queue, result_type=RunResult
    )
    return await outcome(handle)


async def until(predicate: Callable[[], bool | Awaitable[bool]], timeout: float = 15.0) -> None:
    deadline = time.monotonic() + timeout
    while True:
        result = predicate()
        if asyncio.iscoroutine(result):
            result = await result
        if result:
            return
        if time.monotonic() > deadline:
            raise AssertionError(f"condition not met within {timeout}s")
        await asyncio.sleep(0.05)


async def start_conversation(client: Client, task_queue: str, workspace_id: str, first: InboundEvent) -> WorkflowHandle:
    """Signal-with-start, as the webhook dispatcher does."""
    return await client.start_workflow(
        CONVERSATION_WORKFLOW,
        ConversationInput(
            workspace_id=workspace_id,
            channel_id=CHANNEL,
            platform="instagram",
            contact_id=CONTACT,
            contact_external_id=SENDER,
        ),
        id=conversation_workflow_id(workspace_id, CHANNEL, CONTACT),
        task_queue=task_queue,
        start_signal="inbound",
        start_signal_args=[first],
    )


async def conversation_state(handle: WorkflowHandle) -> dict:
    return await handle.query("state", result_type=dict)


async def settled(handle: WorkflowHandle, handled: int) -> dict:
    """Wait until the conversation has processed ``handled`` queue items and has nothing queued."""
    state: dict = {}

    async def check() -> bool:
        nonlocal state
        state = await conversation_state(handle)
        return state["events_handled"] >= handled and state["queued"] == 0

    await until(check)
    return state


CHILD_CLOSED = {
    EventType.EVENT_TYPE_CHILD_WORKFLOW_EXECUTION_COMPLETED,
    EventType.EVENT_TYPE_CHILD_WORKFLOW_EXECUTION_FAILED,
    EventType.EVENT_TYPE_CHILD_WORKFLOW_EXECUTION_CANCELED,
    EventType.EVENT_TYPE_CHILD_WORKFLOW_EXECUTION_TIMED_OUT,
    EventType.EVENT_TYPE_CHILD_WORKFLOW_EXECUTION_TERMINATED,
}


async def idle(handle: WorkflowHandle) -> bool:
    """Nothing left to happen: no workflow task scheduled or running, and
    every child run's close recorded (a child closing schedules a task in
    its parent)."""
    events = (await handle.fetch_history()).events
    types = [e.event_type for e in events]
    last_scheduled = max(
        (e.event_id for e in events if e.event_type == EventType.EVENT_TYPE_WORKFLOW_TASK_SCHEDULED), default=0
    )
    last_completed = max(
        (e.event_id for e in events if e.event_type == EventType.EVENT_TYPE_WORKFLOW_TASK_COMPLETED), default=0
    )
    children_open = types.count(EventType.EVENT_TYPE_CHILD_WORKFLOW_EXECUTION_STARTED) - sum(
        t in CHILD_CLOSED for t in types
    )
    return last_completed > last_scheduled and children_open == 0


async def close_conversation(client: Client, handle: WorkflowHandle, history_name: str = "") -> None:
    """Terminate a conversation once it is idle (saving its history first, if named).

    Terminating it (or stopping the worker) while a workflow task is pending
    can leave the time-skipping server's clock locked for the rest of the
    session, so later timers would run in real time.
    """
    await until(lambda: idle(handle))
    if history_name:
        await maybe_save_history(client, handle.id, history_name)
    await handle.terminate("test over")


def trail_pairs(result: RunResult) -> list[tuple[str, str]]:
    return [(t.step_id, t.status) for t in result.trail]


# --- AutomationRun: timers ------------------------------------------------------------------------


async def test_wait_for_reply_times_out_after_a_day_and_takes_the_timeout_branch(env):
    mocks = Mocks()
    ws = new_workspace()
    async with running_worker(env.client, mocks) as tq:
        input = run_input(ws, PRICE_FLOW)
        result = await execute_run(env.client, tq, input)  # blocked on the 24h timer: time skips
        await maybe_save_history(env.client, input.run_id, "run_wait_for_reply_timed_out")

    assert result.status == "completed"
    assert mocks.texts == [ASK, BYE]
    assert ("email", "timed_out") in trail_pairs(result)
    assert ("thanks", "done") not in trail_pairs(result)
    (asked_at, _), (bye_at, _) = mocks.sent
    assert bye_at - asked_at >= timedelta(hours=24)
    assert [r.status for r in mocks.runs] == ["running", "completed"]
    assert mocks.updates == []  # nothing saved to the contact


async def test_delay_of_three_days_sends_the_second_message_three_days_later(env):
    flow = {"steps": [
        {"id": "a", "type": "send_message", "text": "a"},
        {"id": "wait", "type": "delay", "days": 3},
        {"id": "b", "type": "send_message", "text": "b"},
    ]}
    mocks = Mocks()
    async with running_worker(env.client, mocks) as tq:
        input = run_input(new_workspace(), flow)
        started = time.monotonic()
        result = await execute_run(env.client, tq, input)
        await maybe_save_history(env.client, input.run_id, "run_delay_three_days")

    assert time.monotonic() - started < 20  # skipped, not waited
    assert result.status == "completed"
    assert mocks.texts == ["a", "b"]
    (a_at, _), (b_at, _) = mocks.sent
    assert b_at - a_at >= timedelta(days=3)
    assert b_at - a_at < timedelta(days=3, hours=1)
    assert trail_pairs(result) == [("a", "done"), ("wait", "waiting"), ("wait", "done"), ("b", "done")]


# --- AutomationRun: failures ----------------------------------------------------------------------


async def test_ai_step_failing_sends_the_fallback_text(env):
    flow = {"steps": [{"id": "ai", "type": "ai_reply", "instructions": "Answer politely.",
                       "fallback_text": "Thanks! A teammate will answer soon."}]}
    mocks = Mocks()
    mocks.ai_error = ApplicationError("model overloaded", type="AiUnavailable", non_retryable=True)
    async with running_worker(env.client, mocks) as tq:
        input = run_input(new_workspace(), flow)
        result = await execute_run(env.client, tq, input)
        await maybe_save_history(env.client, input.run_id, "run_ai_fallback")

    assert result.status == "completed"
    assert len(mocks.ai_calls) == 1  # non-retryable: one attempt
    assert mocks.texts == ["Thanks! A teammate will answer soon."]
    entry = result.trail[-1]
    assert (entry.step_id, entry.status) == ("ai", "done")
    assert "fallback" in entry.detail and "model overloaded" in entry.detail


async def test_a_run_cancelled_while_the_model_thinks_is_cancelled_and_sends_nothing():
    """Cancelling a run (restriction, a newer trigger) during its AI step
    ends it as cancelled: no fallback text goes out, and the run records
    itself as cancelled, not failed. Its own time-skipping server: an
    activity left running by a cancelled workflow upsets the shared one's
    clock for later tests."""
    flow = {"steps": [{"id": "ai", "type": "ai_reply", "instructions": "Answer politely.",
                       "fallback_text": "Thanks! A teammate will answer soon."}]}
    mocks = Mocks()
    mocks.ai_gate = asyncio.Event()
    env = await WorkflowEnvironment.start_time_skipping(test_server_existing_path=str(TEST_SERVER))
    async with env, running_worker(env.client, mocks) as tq:
        input = run_input(new_workspace(), flow)
        handle = await env.client.start_workflow(
            AUTOMATION_RUN_WORKFLOW, input, id=input.run_id, task_queue=tq, result_type=RunResult
        )
        try:
            await until(lambda: len(mocks.ai_calls) == 1)
            await handle.cancel()
            with pytest.raises(WorkflowFailureError):
                await outcome(handle)
        finally:
            mocks.ai_gate.set()  # let the activity finish before the worker stops
            await until(lambda: mocks.ai_finished == 1)

    assert mocks.texts == []
    assert [r.status for r in mocks.runs] == ["running", "cancelled"]


async def test_sends_outside_the_messaging_window_are_skipped_with_a_reason(env):
    flow = {"steps": [
        {"id": "hello", "type": "send_message", "text": "hello"},
        {"id": "tag", "type": "add_tag", "tag": "nudged"},
        {"id": "later", "type": "send_message", "text": "later"},
    ]}
    mocks = Mocks()
    mocks.send_error = ApplicationError(
        "outside the 24-hour messaging window: the person last wrote 30 h ago",
        type="OutsideMessagingWindow", non_retryable=True,
    )
    async with running_worker(env.client, mocks) as tq:
        input = run_input(new_workspace(), flow)
        result = await execute_run(env.client, tq, input)
        await maybe_save_history(env.client, input.run_id, "run_outside_window_skipped")

        # Not attempted again, not a failure: every send is skipped with the reason, other steps run.
        assert result.status == "completed"
        assert len(mocks.sent) == 2
        trail = [(t.step_id, t.status) for t in result.trail]
        assert trail == [("hello", "skipped"), ("tag", "done"), ("later", "skipped")]
        assert "last wrote 30 h ago" in result.trail[0].detail
        assert mocks.contact.tags == ["nudged"]


async def test_a_send_the_platform_rejects_fails_the_run_and_the_worker_carries_on(env):
    flow = {"steps": [
        {"id": "hello", "type": "send_message", "text": "hello"},
        {"id": "later", "type": "send_message", "text": "never sent"},
    ]}
    mocks = Mocks()
    mocks.send_error = ApplicationError("(#100) Invalid parameter", type="PlatformRejected", non_retryable=True)
    async with running_worker(env.client, mocks) as tq:
        result = await execute_run(env.client, tq, run_input(new_workspace(), flow))
        assert result.status == "failed"
        assert len(mocks.sent) == 1  # non-retryable: no second attempt, no second step
        last = result.trail[-1]
        assert (last.type, last.status) == ("run", "failed") and "Invalid parameter" in last.detail
        assert mocks.runs[-1].status == "failed"

        mocks.send_error = None
        again = await execute_run(env.client, tq, run_input(new_workspace(), flow))
        assert again.status == "completed"
        assert mocks.texts[-2:] == ["hello", "never sent"]


# --- ConversationWorkflow -------------------------------------------------------------------------


async def price_conversation(client: Client, *, record: bool = False) -> tuple[Mocks, RunResult]:
    """"price" starts the flow; the email reply goes to the waiting run, not to a new one."""
    mocks = Mocks([automation("auto_price", PRICE_FLOW), automation("auto_catch_all", CATCH_ALL)])
    ws = new_workspace()
    async with running_worker(client, mocks) as tq:
        conv = await start_conversation(client, tq, ws, dm("mid.1", "What's the price?"))
        run_id = run_workflow_id(ws, "auto_price", CONTACT, "mid.1")

        async def accepting() -> bool:
            return (await conversation_state(conv))["accepting_input"]

        await until(accepting)
        await until(lambda: mocks.texts == [ASK])
        await conv.signal("inbound", dm("mid.2", "a@b.co"))
        # Wait (without skipping time) until the run took the reply, then let it finish.
        await until(lambda: any(u.set_fields for u in mocks.updates))
        result = await outcome(client.get_workflow_handle(run_id, result_type=RunResult))
        state = await settled(conv, 2)
        if record:
            await maybe_save_history(client, run_id, "run_price_reply")
        await close_conversation(client, conv, "conversation_current_price_reply" if record else "")
    assert state["active_run"] is None  # the run told its conversation it finished
    return mocks, result


async def test_reply_through_the_conversation_reaches_the_waiting_run(env):
    mocks, result = await price_conversation(env.client, record=True)

    assert result.status == "completed"
    assert [u.set_fields for u in mocks.updates] == [{"email": "a@b.co"}]
    assert mocks.texts == [ASK, "Thanks! It is on its way to a@b.co."]
    assert len(mocks.inbound) == 2  # both messages recorded
    # The answer to the waiting run is never matched by its recording.
    assert [i.first_reply for i in mocks.inbound] == [True, False]
    runs = mocks.started_runs()
    assert len(runs) == 1 and len(set(runs)) == 1  # the reply did not start the catch-all
    assert [(s, st) for s, st in trail_pairs(result) if st != "waiting"] == [
        ("ask", "done"), ("email", "done"), ("thanks", "done"),
    ]
    # Every send carries the run's idempotency key.
    assert [s.idempotency_key.split("/")[-2:] for _, s in mocks.sent] == [["ask", "1"], ["thanks", "1"]]


async def test_the_first_message_leaves_from_the_conversations_own_task(env):
    """The reply does not wait for a child workflow to start: the conversation
    sends the flow's first message by a local activity, and the run finds it
    sent under its own idempotency key (one message, recorded in its trail)."""
    mocks, result = await price_conversation(env.client)

    first = mocks.send_calls[0]
    assert first.is_local and first.workflow_type == CONVERSATION_WORKFLOW
    assert [s.idempotency_key.split("/")[-2:] for _, s in mocks.sent] == [["ask", "1"], ["thanks", "1"]]
    assert ("ask", "done") in trail_pairs(result)


async def test_an_answer_right_after_the_prompt_reaches_the_run_before_it_has_run(env):
    """Both the trigger and the answer are queued before any workflow task
    runs: the conversation sends the prompt, starts the run and forwards the
    answer at once; the run, accepting from its start, takes it (the
    catch-all automation must not fire)."""
    mocks = Mocks([automation("auto_price", PRICE_FLOW), automation("auto_catch_all", CATCH_ALL)])
    ws = new_workspace()
    task_queue = f"wf-test-{uuid.uuid4()}"
    conv = await start_conversation(env.client, task_queue, ws, dm("mid.1", "price?"))
    await conv.signal("inbound", dm("mid.2", "a@b.co"))
    async with running_worker(env.client, mocks, task_queue=task_queue):
        run_id = run_workflow_id(ws, "auto_price", CONTACT, "mid.1")
        await until(lambda: len(mocks.started_runs()) >= 1)
        result = await outcome(env.client.get_workflow_handle(run_id, result_type=RunResult))
        await settled(conv, 2)
        await close_conversation(env.client, conv, "conversation_fast_answer")

    assert result.status == "completed"
    assert mocks.texts == [ASK, "Thanks! It is on its way to a@b.co."]
    assert mocks.started_runs() == [run_id]


async def test_a_first_send_that_fails_is_sent_by_the_run(env):
    """The conversation tries the first message once; when that fails, the
    run sends it with its durable retries: exactly one message arrives."""
    mocks = Mocks([automation("auto_menu", MENU_FLOW)])
    mocks.send_failures = 1
    ws = new_workspace()
    async with running_worker(env.client, mocks) as tq:
        conv = await start_conversation(env.client, tq, ws, dm("mid.f1", "menu please"))
        run_id = run_workflow_id(ws, "auto_menu", CONTACT, "mid.f1")
        await until(lambda: len(mocks.started_runs()) >= 1)
        result = await outcome(env.client.get_workflow_handle(run_id, result_type=RunResult))
        await close_conversation(env.client, conv)

    assert result.status == "completed"
    assert [call.is_local for call in mocks.send_calls] == [True, False]
    step_id = MENU_FLOW["steps"][0]["id"]
    assert list(mocks.sent_keys) == [f"{run_id}/{step_id}/1"]  # one message delivered
    assert trail_pairs(result) == [(step_id, "done")]


async def test_a_conversation_started_with_its_first_message_needs_no_signal(env):
    """The API's eager start (api/ingress.py) puts the first message in the
    conversation's input: it is handled like a signalled one (the flow's
    prompt, the run, the answer forwarded to it), and the same message
    redelivered by signal is recognised as a duplicate."""
    mocks = Mocks([automation("auto_price", PRICE_FLOW), automation("auto_catch_all", CATCH_ALL)])
    ws = new_workspace()
    first = dm("mid.e1", "What's the price?")
    async with running_worker(env.client, mocks) as tq:
        conv = await env.client.start_workflow(
            CONVERSATION_WORKFLOW,
            ConversationInput(
                workspace_id=ws,
                channel_id=CHANNEL,
                platform="instagram",
                contact_id=CONTACT,
                contact_external_id=SENDER,
                first_events=[first],
            ),
            id=conversation_workflow_id(ws, CHANNEL, CONTACT),
            task_queue=tq,
        )
        run_id = run_workflow_id(ws, "auto_price", CONTACT, "mid.e1")
        await until(lambda: mocks.texts == [ASK])
        await conv.signal("inbound", first)  # a platform redelivery
        await conv.signal("inbound", dm("mid.e2", "a@b.co"))
        result = await outcome(env.client.get_workflow_handle(run_id, result_type=RunResult))
        await settled(conv, 3)
        history = await conv.fetch_history()
        await close_conversation(env.client, conv, "conversation_first_events")

    assert result.status == "completed"
    assert mocks.texts == [ASK, "Thanks! It is on its way to a@b.co."]
    assert mocks.started_runs() == [run_id]
    assert len(mocks.inbound) == 2  # the redelivery never reached the database
    inbound = [
        e for e in history.events
        if e.event_type == EventType.EVENT_TYPE_WORKFLOW_EXECUTION_SIGNALED
        and e.workflow_execution_signaled_event_attributes.signal_name == "inbound"
    ]
    assert len(inbound) == 2  # the redelivery and the answer: the first message came with the start


async def test_an_expired_conversation_continues_as_new_and_its_waiting_run_still_gets_the_answer(dev_server):
    """The retention sweep's signal: the run that holds the person's messages
    closes (continued as new, nothing of theirs in the new run's input) while
    a run waits for their answer; the answer still reaches that run, and a
    redelivery of their first message is still a duplicate. (On the dev
    server: on the time-skipping server, the tests after this one waited for
    their timers in real time.)"""
    env = dev_server
    mocks = Mocks([automation("auto_price", PRICE_FLOW), automation("auto_catch_all", CATCH_ALL)])
    ws = new_workspace()
    async with running_worker(env.client, mocks) as tq:
        first = dm("mid.x1", "What's the price?")
        conv = await start_conversation(env.client, tq, ws, first)
        run_id = run_workflow_id(ws, "auto_price", CONTACT, "mid.x1")
        await until(lambda: mocks.texts == [ASK])
        await until(lambda: _accepting(conv))
        old_run = (await conv.describe()).run_id
        started = (await conv.describe()).start_time.timestamp()
        # The run started after this cutoff (a late or repeated signal): ignored.
        await conv.signal("expire_history", ExpireHistorySignal(cutoff_epoch_seconds=started - 1))
        await until(lambda: signal_taken(conv))
        assert (await conv.describe()).run_id == old_run
        await conv.signal("expire_history", ExpireHistorySignal(cutoff_epoch_seconds=started + 1))

        async def continued() -> bool:
            return (await conv.describe()).run_id != old_run

        await until(continued)
        new_input = await started_input(env.client, conv.id, None)
        await conv.signal("inbound", first)  # a platform redelivery
        await conv.signal("inbound", dm("mid.x2", "a@b.co"))
        result = await outcome(env.client.get_workflow_handle(run_id, result_type=RunResult))
        await maybe_save_history(env.client, conv.id, "conversation_expired_history", run_id=old_run)
        await close_conversation(env.client, conv)

    assert new_input.first_events == [] and new_input.seen_event_ids == ["mid.x1"]
    assert new_input.active_run is not None and new_input.active_run.workflow_id == run_id
    assert result.status == "completed"
    assert mocks.texts == [ASK, "Thanks! It is on its way to a@b.co."]
    assert len(mocks.inbound) == 2  # the redelivery never reached the database


async def signal_taken(handle: WorkflowHandle) -> bool:
    """A workflow task completed after the last signal (it ran the handler)."""
    events = (await handle.fetch_history()).events
    last_signal = max(
        (e.event_id for e in events if e.event_type == EventType.EVENT_TYPE_WORKFLOW_EXECUTION_SIGNALED), default=0
    )
    return any(
        e.event_id > last_signal for e in events if e.event_type == EventType.EVENT_TYPE_WORKFLOW_TASK_COMPLETED
    )


async def _accepting(handle: WorkflowHandle) -> bool:
    return (await conversation_state(handle))["accepting_input"]


async def started_input(client: Client, workflow_id: str, run_id: str | None) -> ConversationInput:
    """The decoded input of a conversation run (its first history event)."""
    history = await client.get_workflow_handle(workflow_id, run_id=run_id).fetch_history()
    payloads = history.events[0].workflow_execution_started_event_attributes.input.payloads
    [decoded] = await client.data_converter.decode(payloads, [ConversationInput])
    return decoded


async def test_redelivered_event_starts_exactly_one_run(env):
    mocks = Mocks([automation("auto_menu", MENU_FLOW)])
    ws = new_workspace()
    async with running_worker(env.client, mocks) as tq:
        event = dm("mid.dup", "menu please")
        conv = await start_conversation(env.client, tq, ws, event)
        await conv.signal("inbound", event)
        await conv.signal("inbound", event)
        await settled(conv, 3)
        run_id = run_workflow_id(ws, "auto_menu", CONTACT, "mid.dup")
        await close_conversation(env.client, conv)

    assert mocks.texts == ["Here is the menu"]
    assert [(r.run_id, r.status) for r in mocks.runs] == [(run_id, "completed")]
    assert len(mocks.inbound) == 1  # deduplicated in the workflow, before any database write


@pytest.mark.parametrize("sent_by", ["record_inbound", "send_message"])
async def test_a_one_message_flow_completes_inside_the_conversation(env, sent_by):
    """Keyword -> one reply: sent from the conversation's task and recorded
    as a completed run with its trail; no run workflow is started. The
    recording local activity sends it; when it did not (a retried attempt),
    a send_message local activity does: one message either way."""
    mocks = Mocks([automation("auto_menu", MENU_FLOW)])
    mocks.reply_in_record = sent_by == "record_inbound"
    ws = new_workspace()
    async with running_worker(env.client, mocks) as tq:
        conv = await start_conversation(env.client, tq, ws, dm("mid.one", "menu please"))
        await settled(conv, 1)
        history = await conv.fetch_history()
        await close_conversation(
            env.client, conv, "conversation_current_one_message" if sent_by == "record_inbound" else ""
        )
        run_id = run_workflow_id(ws, "auto_menu", CONTACT, "mid.one")
        with pytest.raises(RPCError):
            await env.client.get_workflow_handle(run_id).describe()

    assert mocks.texts == ["Here is the menu"]
    assert [(call.is_local, call.activity_type) for call in mocks.send_calls] == [(True, sent_by)]
    # The history an operator reads: one marker per local activity (and two
    # for the code paths: records-and-replies, matching rules), nothing else
    # between the signal and the reply.
    markers = [e.marker_recorded_event_attributes.marker_name for e in history.events
               if e.event_type == EventType.EVENT_TYPE_MARKER_RECORDED]
    assert markers == ["core_patch"] * 2 + ["core_local_activity"] * (1 + (sent_by == "send_message"))
    (record,) = mocks.runs
    assert (record.run_id, record.status, record.automation_id) == (run_id, "completed", "auto_menu")
    assert [(t.step_id, t.type, t.status, t.detail) for t in record.trail] == [
        (MENU_FLOW["steps"][0]["id"], "send_message", "done", "Here is the menu"),
    ]


async def test_a_new_contacts_profile_is_looked_up_by_the_first_send(env):
    """A new Instagram contact, a first message that does not use their
    name: it leaves at once, the same local activity then looks up their
    profile (no activity of its own), and the run's next message has the name."""
    flow = {
        "trigger": {"type": "dm_keyword", "keywords": ["hello"]},
        "steps": [
            {"id": "hi", "type": "send_message", "text": "Welcome!"},
            {"id": "name", "type": "send_message", "text": "Nice to meet you, {{contact.first_name | friend}}."},
        ],
    }
    mocks = Mocks([automation("auto_hello", flow)])
    mocks.contact = ContactSnapshot(id=CONTACT, external_id=SENDER, is_new=True)
    ws = new_workspace()
    async with running_worker(env.client, mocks) as tq:
        conv = await start_conversation(env.client, tq, ws, dm("mid.p1", "hello"))
        run_id = run_workflow_id(ws, "auto_hello", CONTACT, "mid.p1")
        await until(lambda: len(mocks.started_runs()) >= 1)
        result = await outcome(env.client.get_workflow_handle(run_id, result_type=RunResult))
        await close_conversation(env.client, conv, "conversation_send_fetches_profile")

    assert result.status == "completed"
    assert mocks.texts == ["Welcome!", "Nice to meet you, Ana."]
    assert [call.is_local for call in mocks.send_calls] == [True, False]
    assert [s.then_fetch_profile for _, s in mocks.sent] == [True, False]
    assert mocks.profile_lookups == ["send"]


async def test_a_new_contact_is_greeted_by_name_from_one_local_activity(env):
    """A new Instagram contact and a reply that uses their name: the send
    activity looks the profile up, renders the reply for it and sends it
    (no activity of its own); the one-message run's trail shows that text."""
    flow = {
        "trigger": {"type": "dm_keyword", "keywords": ["menu"]},
        "steps": [{"id": "menu", "type": "send_message", "text": "Hi {{contact.first_name | there}}! Here is the menu"}],
    }
    mocks = Mocks([automation("auto_menu", flow)])
    mocks.contact = ContactSnapshot(id=CONTACT, external_id=SENDER, is_new=True)
    ws = new_workspace()
    async with running_worker(env.client, mocks) as tq:
        conv = await start_conversation(env.client, tq, ws, dm("mid.g1", "menu please"))
        await settled(conv, 1)
        await close_conversation(env.client, conv, "conversation_send_looks_up_profile_first")

    assert mocks.texts == ["Hi Ana! Here is the menu"]
    assert [call.is_local for call in mocks.send_calls] == [True]
    assert mocks.profile_lookups == ["send"]
    (record,) = mocks.runs
    assert (record.status, [t.detail for t in record.trail]) == ("completed", ["Hi Ana! Here is the menu"])


GREETING_FLOW = {
    "trigger": {"type": "dm_keyword", "keywords": ["menu"]},
    "steps": [{"id": "menu", "type": "send_message", "text": "Hi {{contact.first_name | there}}! Here is the menu"}],
}


def history_order(history) -> list[str]:
    """The history as an operator reads it: local activities and patches
    (markers), activities scheduled (their type), signals."""
    order = []
    for e in history.events:
        if e.event_type == EventType.EVENT_TYPE_MARKER_RECORDED:
            order.append(e.marker_recorded_event_attributes.marker_name)
        elif e.event_type == EventType.EVENT_TYPE_ACTIVITY_TASK_SCHEDULED:
            order.append(f"scheduled:{e.activity_task_scheduled_event_attributes.activity_type.name}")
        elif e.event_type == EventType.EVENT_TYPE_WORKFLOW_EXECUTION_SIGNALED:
            order.append("signal")
    return order


async def test_a_new_contact_whose_message_starts_nothing_is_looked_up_after_it(env):
    """A new Instagram contact's first DM starts nothing: once it is routed,
    the conversation has the profile activity look them up (a regular
    activity, its own retries, nothing waiting on it), so the CRM has their
    name and a later reply greets them by it without looking them up again."""
    mocks = Mocks([automation("auto_menu", GREETING_FLOW)])
    mocks.contact = ContactSnapshot(id=CONTACT, external_id=SENDER, is_new=True)
    mocks.profile_failures = 1  # the platform fails once: the activity's retry finds the name
    ws = new_workspace()
    async with running_worker(env.client, mocks) as tq:
        conv = await start_conversation(env.client, tq, ws, dm("mid.h1", "hello"))
        await until(lambda: mocks.profile_lookups == ["activity"])
        await conv.signal("inbound", dm("mid.h2", "the menu please"))
        await settled(conv, 2)
        await until(lambda: mocks.texts == ["Hi Ana! Here is the menu"])
        history = await conv.fetch_history()
        await close_conversation(env.client, conv, "conversation_profile_after_routing")

    assert mocks.texts == ["Hi Ana! Here is the menu"]
    assert mocks.profile_lookups == ["activity"]  # the reply did not look them up again
    assert [(c.is_local, c.attempt) for c in mocks.profile_calls] == [(False, 1), (False, 2)]
    # After the event's recording and routing, never before it.
    order = history_order(history)
    first_record = order.index("core_local_activity")
    assert order.index("scheduled:fetch_profile") > first_record
    (scheduled,) = [
        e.activity_task_scheduled_event_attributes for e in history.events
        if e.event_type == EventType.EVENT_TYPE_ACTIVITY_TASK_SCHEDULED
    ]
    assert scheduled.retry_policy.maximum_attempts == 4
    assert set(scheduled.retry_policy.non_retryable_error_types) >= {"PlatformRejected", "TokenInvalid"}


async def test_a_triggering_dm_is_answered_with_no_profile_lookup_before_the_reply(env):
    """A new contact whose first DM starts a flow: the reply path looks them
    up with its send (as before); no profile activity comes ahead of the
    reply in the history, nor after it."""
    mocks = Mocks([automation("auto_menu", GREETING_FLOW)])
    mocks.contact = ContactSnapshot(id=CONTACT, external_id=SENDER, is_new=True)
    ws = new_workspace()
    async with running_worker(env.client, mocks) as tq:
        conv = await start_conversation(env.client, tq, ws, dm("mid.t1", "menu please"))
        await settled(conv, 1)
        history = await conv.fetch_history()
        await close_conversation(env.client, conv)

    assert mocks.texts == ["Hi Ana! Here is the menu"]
    assert mocks.profile_lookups == ["send"] and mocks.profile_calls == []
    assert "scheduled:fetch_profile" not in history_order(history)


async def test_a_failed_lookup_leaves_the_contact_nameless_and_the_conversation_going(env, caplog):
    """The platform will not show the person (they blocked the account): the
    lookup is not retried, the conversation goes on (the next message is
    answered) and this run does not try again."""
    mocks = Mocks([automation("auto_menu", MENU_FLOW)])
    mocks.contact = ContactSnapshot(id=CONTACT, external_id=SENDER, is_new=True)
    mocks.profile_error = ApplicationError("(#100) no such user", type="PlatformRejected", non_retryable=True)
    ws = new_workspace()
    with caplog.at_level(logging.INFO):
        async with running_worker(env.client, mocks) as tq:
            conv = await start_conversation(env.client, tq, ws, dm("mid.b1", "hello"))
            await until(lambda: len(mocks.profile_calls) == 1)
            await conv.signal("inbound", dm("mid.b2", "hello again"))
            await conv.signal("inbound", dm("mid.b3", "menu please"))
            await until(lambda: mocks.texts == ["Here is the menu"])
            state = await settled(conv, 3)
            await close_conversation(env.client, conv)

    assert state["events_handled"] == 3
    assert len(mocks.profile_calls) == 1  # once: not retried, not started again by the next message
    assert "profile lookup failed: PlatformRejected; the contact stays nameless" in caplog.text


async def test_handoff_silences_automations_until_resumed(env):
    mocks = Mocks([automation("auto_help", HANDOFF_FLOW)])
    ws = new_workspace()
    async with running_worker(env.client, mocks) as tq:
        conv = await start_conversation(env.client, tq, ws, dm("mid.1", "help"))
        await settled(conv, 1)  # the run is started
        first = run_workflow_id(ws, "auto_help", CONTACT, "mid.1")
        assert (await outcome(env.client.get_workflow_handle(first, result_type=RunResult))).status == "completed"
        assert mocks.texts == ["A teammate will reply soon."]
        assert mocks.contact.human_takeover

        async def taken_over() -> bool:
            return (await conversation_state(conv))["human_takeover"]

        await until(taken_over)

        # A human owns the conversation: the keyword starts nothing.
        await conv.signal("inbound", dm("mid.2", "help"))
        await settled(conv, 2)
        assert mocks.started_runs() == [first]
        assert len(mocks.sent) == 1

        # Resumed through the API: automations answer again.
        await conv.signal("resume", ResumeSignal())
        await conv.signal("inbound", dm("mid.3", "help"))
        await settled(conv, 4)
        third = run_workflow_id(ws, "auto_help", CONTACT, "mid.3")
        assert (await outcome(env.client.get_workflow_handle(third, result_type=RunResult))).status == "completed"
        await close_conversation(env.client, conv, "conversation_handoff_resume")

    assert mocks.started_runs() == [first, third]
    assert mocks.texts == ["A teammate will reply soon."] * 2
    assert [u.human_takeover for u in mocks.updates] == [True, False, True]


QUIZ_FLOW = {
    "trigger": {"type": "dm_keyword", "keywords": ["quiz"]},
    "steps": [
        {"id": "ask", "type": "send_message", "text": "Your answer?"},
        {"id": "wait", "type": "wait_for_reply", "timeout_seconds": 60, "on_timeout": "pause"},
        {"id": "pause", "type": "delay", "hours": 1},
        {"id": "late", "type": "send_message", "text": "Still there?"},
    ],
}
MENU_FLOW = {
    "trigger": {"type": "dm_keyword", "keywords": ["menu"]},
    "steps": [{"id": "m", "type": "send_message", "text": "Here is the menu"}],
}


async def test_a_reply_reaching_a_run_after_its_wait_ended_is_matched_not_lost(env):
    mocks = Mocks([automation("auto_quiz", QUIZ_FLOW), automation("auto_menu", MENU_FLOW)])
    ws = new_workspace()
    async with running_worker(env.client, mocks) as tq:
        conv = await start_conversation(env.client, tq, ws, dm("mid.1", "quiz"))
        quiz = run_workflow_id(ws, "auto_quiz", CONTACT, "mid.1")
        await until(lambda: mocks.texts == ["Your answer?"])
        await env.sleep(timedelta(seconds=90))  # the wait timed out; the run sits in its delay

        async def timed_out() -> bool:
            status = await env.client.get_workflow_handle(quiz).query("status", result_type=RunStatus)
            return status.current_step == "pause"

        await until(timed_out)
        # The conversation forwarded a message just as the wait ended: the run
        # hands it back and the conversation matches it against triggers.
        await env.client.get_workflow_handle(quiz).signal("reply", ReplySignal(event=dm("mid.2", "menu")))
        await until(lambda: "Here is the menu" in mocks.texts)
        assert [r.event.event_id for r in mocks.rematched] == ["mid.2"]
        await close_conversation(env.client, conv, "conversation_returned_input")
    assert mocks.texts == ["Your answer?", "Here is the menu"]


# --- channel lifecycle ----------------------------------------------------------------------------


async def test_connect_with_a_valid_token_activates_the_channel(env):
    mocks = Mocks()
    ws = new_workspace()
    async with running_worker(env.client, mocks) as tq:
        wf_id = f"{ws}/connect/{CHANNEL}"
        result = await env.client.execute_workflow(
            CONNECT_CHANNEL_WORKFLOW, ConnectChannelInput(workspace_id=ws, channel_id=CHANNEL, platform="instagram"),
            id=wf_id, task_queue=tq, result_type=ConnectResult,
        )
        await maybe_save_history(env.client, wf_id, "connect_active")

    assert result == ConnectResult(status="active", external_id=ACCOUNT)
    assert len(mocks.subscribed) == 1
    assert [(s.status, s.detail) for s in mocks.statuses] == [("active", "")]
    assert mocks.purged == []


async def test_connect_with_a_rejected_token_fails_and_deletes_the_token(env):
    mocks = Mocks()
    mocks.verify_error = ApplicationError("Invalid OAuth access token", type="TokenInvalid", non_retryable=True)
    ws = new_workspace()
    async with running_worker(env.client, mocks) as tq:
        wf_id = f"{ws}/connect/{CHANNEL}"
        result = await env.client.execute_workflow(
            CONNECT_CHANNEL_WORKFLOW, ConnectChannelInput(workspace_id=ws, channel_id=CHANNEL, platform="instagram"),
            id=wf_id, task_queue=tq, result_type=ConnectResult,
        )
        await maybe_save_history(env.client, wf_id, "connect_token_invalid")

    assert result.status == "failed"
    assert "Invalid OAuth access token" in result.detail
    assert len(mocks.verified) == 1  # not retried
    assert mocks.subscribed == []
    assert mocks.purged == [PurgeDataInput(scope="channel_tokens", channel_id=CHANNEL)]
    assert [(s.status, s.detail) for s in mocks.statuses] == [("failed", result.detail)]


async def test_disconnect_purges_the_token_even_when_revoke_keeps_failing(env):
    mocks = Mocks()
    # Retryable. The time-skipping server does not skip an activity's retry
    # backoff (it would take 1+2+4+8+16 s of real time), and pushing its clock
    # with env.sleep() while an attempt runs can time the attempt out and
    # leave the clock locked. The platform's retry advice keeps the test fast;
    # PLATFORM_RETRY still caps the attempts.
    mocks.revoke_error = ApplicationError(
        "Graph API 503", type="PlatformUnavailable", next_retry_delay=timedelta(milliseconds=10)
    )
    ws = new_workspace()
    async with running_worker(env.client, mocks) as tq:
        wf_id = f"{ws}/disconnect/{CHANNEL}"
        started = time.monotonic()
        handle = await env.client.start_workflow(
            DISCONNECT_CHANNEL_WORKFLOW, ChannelRef(channel_id=CHANNEL),
            id=wf_id, task_queue=tq, result_type=DisconnectResult,
        )
        result = await outcome(handle)
        await maybe_save_history(env.client, wf_id, "disconnect_revoke_failed")

    assert time.monotonic() - started < 10
    assert len(mocks.revokes) == 6  # PLATFORM_RETRY.maximum_attempts
    assert result.revoked is False
    assert "Graph API 503" in result.detail
    assert result.stopped_workflows == 2
    assert mocks.purged == [PurgeDataInput(scope="channel_tokens", channel_id=CHANNEL)]
    assert [s.status for s in mocks.statuses] == ["disconnecting", "disconnected"]
    assert "Graph API 503" in mocks.statuses[-1].detail
    assert mocks.stopped == [ChannelRef(channel_id=CHANNEL)]


async def test_disconnect_with_a_working_revoke(env):
    mocks = Mocks()
    ws = new_workspace()
    async with running_worker(env.client, mocks) as tq:
        wf_id = f"{ws}/disconnect/{CHANNEL}"
        result = await env.client.execute_workflow(
            DISCONNECT_CHANNEL_WORKFLOW, ChannelRef(channel_id=CHANNEL),
            id=wf_id, task_queue=tq, result_type=DisconnectResult,
        )
        await maybe_save_history(env.client, wf_id, "disconnect_revoked")

    assert result == DisconnectResult(revoked=True, stopped_workflows=2)
    assert len(mocks.revokes) == 1
    assert mocks.purged == [PurgeDataInput(scope="channel_tokens", channel_id=CHANNEL)]
    assert [s.status for s in mocks.statuses] == ["disconnecting"]


# --- replay safety (last: it can provoke workflow task timeouts) -------------------------------


FULL_FLOW = {
    "steps": [
        {"id": "ask", "type": "send_message", "text": "What's your email?"},
        {"id": "email", "type": "wait_for_reply", "timeout_seconds": 86400, "validate": "email",
         "save_to_field": "email", "retry_prompt": "Try again?", "max_retries": 2, "on_timeout": "bye"},
        {"id": "tag", "type": "add_tag", "tag": "lead"},
        {"id": "check", "type": "condition", "conditions": [{"subject": "field", "name": "email", "op": "exists"}],
         "then": "pause", "else": "bye"},
        {"id": "pause", "type": "delay", "hours": 1},
        {"id": "ai", "type": "ai_reply", "instructions": "Say thanks.", "fallback_text": "Thanks!"},
        {"id": "thanks", "type": "send_message", "text": "Sent to {{contact.fields.email}}.", "next": "end"},
        {"id": "bye", "type": "send_message", "text": "Bye"},
    ]
}


async def full_flow(client: Client, *, record: bool = False, **worker_kwargs) -> tuple[Mocks, RunResult]:
    """ask -> invalid reply -> retry prompt -> valid reply -> tag -> condition -> 1h delay -> AI -> send."""
    mocks = Mocks()
    async with running_worker(client, mocks, **worker_kwargs) as tq:
        input = run_input(new_workspace(), FULL_FLOW)
        handle = await client.start_workflow(
            AUTOMATION_RUN_WORKFLOW, input, id=input.run_id, task_queue=tq, result_type=RunResult,
            # Zero cache: a short task timeout, see test_flow_completes_identically_when_every_task_replays.
            task_timeout=timedelta(seconds=1) if worker_kwargs.get("max_cached_workflows") == 0 else None,
        )
        await until(lambda: mocks.texts == ["What's your email?"])
        await handle.signal("reply", ReplySignal(event=dm("mid.r1", "not an email")))
        await until(lambda: mocks.texts[-1:] == ["Try again?"])
        await handle.signal("reply", ReplySignal(event=dm("mid.r2", "a@b.co")))
        result = await outcome(handle)  # the 1h delay is skipped
        if record:
            await maybe_save_history(client, input.run_id, "run_full_flow")
    return mocks, result


async def test_flow_completes_identically_when_every_task_replays(env):
    """max_cached_workflows=0 evicts after every task, so every task replays the history.

    temporalio 1.35 (sdk-core) can evict a zero-cache run mid-task while a
    local activity is finishing: the task times out and is retried, and the
    local activity (record_run, update_contact) runs again. Local activities
    are at-least-once anyway, so those calls are compared de-duplicated; the
    1s task timeout keeps the stall short.
    """
    cached_mocks, cached = await full_flow(env.client, record=True)
    replayed_mocks, replayed = await full_flow(env.client, max_cached_workflows=0)

    assert cached.status == "completed"
    assert cached_mocks.texts == ["What's your email?", "Try again?", "Hello from the model", "Sent to a@b.co."]
    assert [(s, st) for s, st in trail_pairs(cached) if st != "waiting"] == [
        ("ask", "done"), ("email", "invalid"), ("email", "done"), ("tag", "done"), ("check", "done"),
        ("pause", "done"), ("ai", "done"), ("thanks", "done"),
    ]
    assert replayed.status == cached.status
    assert trail_pairs(replayed) == trail_pairs(cached)
    assert replayed_mocks.texts == cached_mocks.texts  # sends are regular activities: exactly once
    assert _keys(replayed_mocks) == _keys(cached_mocks)
    assert _dedupe(replayed_mocks.updates) == _dedupe(cached_mocks.updates)
    assert (replayed_mocks.contact.fields, replayed_mocks.contact.tags) == ({"email": "a@b.co"}, ["lead"])
    assert _dedupe([r.status for r in replayed_mocks.runs]) == ["running", "completed"]
    assert len(replayed_mocks.ai_calls) == 1


def _keys(mocks: Mocks) -> list[str]:
    """Idempotency keys without the (random) run id prefix."""
    return [s.idempotency_key[len(s.run_id) + 1:] for _, s in mocks.sent]


def _dedupe(items: list) -> list:
    """Drop consecutive repeats (a re-executed local activity)."""
    out: list = []
    for item in items:
        if not out or out[-1] != item:
            out.append(item)
    return out


STORY_MENTION_FLOW = {
    "trigger": {"type": "story_mention"},
    "steps": [{"id": "thanks", "type": "send_message", "text": "Thanks for the mention!"}],
}
RECEIPT_FLOW = {
    "trigger": {"type": "dm_keyword", "keywords": ["receipt"]},
    "steps": [
        {"id": "ask", "type": "send_message", "text": "Send a photo of it"},
        {"id": "photo", "type": "wait_for_reply", "max_retries": 0, "save_to_field": "receipt", "on_invalid": "bad"},
        {"id": "ok", "type": "send_message", "text": "Got it", "next": "end"},
        {"id": "bad", "type": "send_message", "text": "Invalid reply"},
    ],
}


async def test_a_story_mention_while_a_run_waits_leaves_the_run_waiting(env):
    mocks = Mocks([automation("auto_price", PRICE_FLOW), automation("auto_story", STORY_MENTION_FLOW)])
    ws = new_workspace()
    async with running_worker(env.client, mocks) as tq:
        conv = await start_conversation(env.client, tq, ws, dm("mid.1", "price?"))

        async def accepting() -> bool:
            return (await conversation_state(conv))["accepting_input"]

        await until(accepting)
        mention = InboundEvent(event_id="mid.2", platform="instagram", account_id=ACCOUNT, sender_id=SENDER,
                               kind="story_mention", story_url="https://cdn.example/story")
        await conv.signal("inbound", mention)
        await settled(conv, 2)
        await conv.signal("inbound", dm("mid.3", "a@b.co"))
        await until(lambda: len(mocks.texts) == 2)
        await settled(conv, 3)
        await close_conversation(env.client, conv, "conversation_waiting_run_kept")
    assert mocks.texts == [ASK, "Thanks! It is on its way to a@b.co."]
    assert len(mocks.started_runs()) == 1


async def test_a_photo_answers_a_reply_that_asks_for_no_format(env):
    mocks = Mocks([automation("auto_receipt", RECEIPT_FLOW)])
    ws = new_workspace()
    async with running_worker(env.client, mocks) as tq:
        conv = await start_conversation(env.client, tq, ws, dm("mid.1", "receipt"))
        run_id = run_workflow_id(ws, "auto_receipt", CONTACT, "mid.1")

        async def accepting() -> bool:
            return (await conversation_state(conv))["accepting_input"]

        await until(accepting)
        photo = InboundEvent(event_id="mid.2", platform="instagram", account_id=ACCOUNT, sender_id=SENDER,
                             kind="message", attachments=[Attachment(type="image", url="https://cdn.example/r.jpg")])
        await conv.signal("inbound", photo)
        result = await outcome(env.client.get_workflow_handle(run_id, result_type=RunResult))
        await maybe_save_history(env.client, run_id, "run_attachment_reply")
        await close_conversation(env.client, conv)
    assert result.status == "completed"
    assert mocks.texts == ["Send a photo of it", "Got it"]
    assert [u.set_fields for u in mocks.updates] == [{"receipt": "https://cdn.example/r.jpg"}]


async def test_an_event_the_database_refuses_is_skipped_and_the_next_one_answered(env):
    mocks = Mocks([automation("auto_menu", MENU_FLOW)])
    mocks.refused_text = "refused"
    ws = new_workspace()
    async with running_worker(env.client, mocks) as tq:
        conv = await start_conversation(env.client, tq, ws, dm("mid.1", "refused"))
        await conv.signal("inbound", dm("mid.2", "menu please"))
        await until(lambda: mocks.texts == ["Here is the menu"])
        state = await settled(conv, 2)
        await close_conversation(env.client, conv, "conversation_unrecordable_skipped")
    assert state["events_handled"] == 2
    assert [i.event.event_id for i in mocks.inbound] == ["mid.2"]
