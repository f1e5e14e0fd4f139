"""ConversationWorkflow: one per contact, serialises that contact's events.

Signals only enqueue; the main loop handles one item at a time, so a
contact's events are processed in arrival order. For each inbound event:
dedupe (bounded set carried across continue-as-new, plus the unique message
row in the database), record it, then either hand it to the run that is
waiting for input or match triggers and start an ``AutomationRun`` child.

The reply does not wait for the child: when the matched flow opens with a
message, it is sent from the same workflow task under the run's own
idempotency key (the run finds it sent), then the child starts for the
rest. When nothing in this workflow's state keeps the event from matching
triggers, the ``record_inbound`` local activity matches and sends it right
after recording the event (one local activity for the event and its reply;
its result, a marker in this workflow's history, says what it sent);
otherwise a ``send_message`` local activity does. A flow that is only that
message is complete after the send: its run is recorded with it and no
child starts (``GET /v1/runs/{id}`` has its trail). A Meta contact whose
event started nothing (so no reply looked them up) has their profile looked
up afterwards, by an activity nobody waits on.

A run continues as new every 2,000 events, when Temporal suggests it, and
when the retention sweep finds it started before the workspace's period
(``expire_history``): the new run carries state, never a message, and the
sweep deletes the closed one.
"""

from __future__ import annotations

import asyncio
from collections import deque

from temporalio import workflow
from temporalio.common import WorkflowIDReusePolicy
from temporalio.exceptions import ActivityError, FailureError, WorkflowAlreadyStartedError
from temporalio.workflow import ParentClosePolicy

with workflow.unsafe.imports_passed_through():
    from core import flowrt
    from core.contracts import (
        AUTOMATION_RUN_WORKFLOW,
        CONVERSATION_WORKFLOW,
        AckCallbackInput,
        ActiveRun,
        AutomationSnapshot,
        ContactRef,
        ContactSnapshot,
        ConversationInput,
        ErrorType,
        ExpireHistorySignal,
        FirstSend,
        HumanMessageInput,
        HumanMessageResult,
        InboundEvent,
        ProfileInput,
        RecordInboundInput,
        RecordInboundResult,
        RecordRunInput,
        ReplySignal,
        ResumeSignal,
        RunInput,
        RunStateSignal,
        SendMessageInput,
        SendMessageResult,
        StartAutomationSignal,
        StopRunsSignal,
        TrailEntry,
        UpdateContactInput,
    )
    from core.flowrt import REPLY_KINDS, TRIGGERING_KINDS, run_workflow_id
    from workflows.common import (
        ACTIVITY_FAILURES,
        BULK_PRIORITY,
        DB_RETRY,
        DB_TIMEOUT,
        INTERACTIVE_RETRY,
        PROFILE_LATER_RETRY,
        PROFILE_RETRY,
        PROFILE_TIMEOUT,
        SEND_TIMEOUT,
        SINGLE_ATTEMPT,
        matching_rules,
        root_message,
        root_type,
        search_attributes,
        send_skipped,
    )

MAX_SEEN_EVENT_IDS = 1000
EVENTS_BEFORE_CONTINUE_AS_NEW = 2000
# Runs that start with this patch take the current path everywhere (one
# marker instead of one per change; older runs keep the branches they took):
# the reply is sent by ``record_inbound`` itself, and a new run starts
# before the one it supersedes is cancelled.
CURRENT_PATH = "inbound-records-and-replies"
# A comment, story mention or referral while a run waits for the person's
# reply starts nothing: it is not their answer, and superseding the run lost
# the answer it was waiting for.
KEEP_WAITING_RUN = "waiting-run-kept"
# An event the database refuses for its content is skipped; it failed the
# conversation (and the events queued behind it) after its retries.
SKIP_UNRECORDABLE = "unrecordable-event-skipped"
# A Meta contact whose event started nothing is looked up once the event is
# routed (``flowrt.profile_due_after_routing``): the reply path looks people
# up only for an automation it starts, and they stayed nameless in the CRM.
PROFILE_AFTER_ROUTING = "profile-after-routing"


class _Returned:
    """Queue item: an event handed back by a run that stopped waiting."""

    def __init__(self, event: InboundEvent) -> None:
        self.event = event


def _consume_result(future: asyncio.Future) -> None:
    if not future.cancelled():
        future.exception()


@workflow.defn(name=CONVERSATION_WORKFLOW)
class ConversationWorkflow:
    @workflow.init
    def __init__(self, input: ConversationInput) -> None:
        self._input = input
        self._queue: deque[InboundEvent | StartAutomationSignal | ResumeSignal | StopRunsSignal] = deque(
            input.first_events
        )
        self._seen: deque[str] = deque(input.seen_event_ids[-MAX_SEEN_EVENT_IDS:])
        self._seen_set = set(self._seen)
        self._active: ActiveRun | None = input.active_run
        self._takeover = input.human_takeover
        self._handled = 0
        # Activities started and not awaited (button acknowledgements,
        # profile lookups): continue-as-new waits for them.
        self._background: set[asyncio.Future] = set()
        self._profile_tried = False  # this run looked the contact's profile up (or started to)
        self._current = False  # CURRENT_PATH, decided when the run starts
        self._matching = 1  # flowrt's matching rules, decided when the run starts
        self._expired = False  # the retention sweep asked for a new run

    # -- signals and queries -------------------------------------------------

    @workflow.signal(name="inbound")
    def inbound(self, event: InboundEvent) -> None:
        self._queue.append(event)

    @workflow.signal(name="start_automation")
    def start_automation(self, signal: StartAutomationSignal) -> None:
        self._queue.append(signal)

    @workflow.signal(name="resume")
    def resume(self, signal: ResumeSignal) -> None:
        self._queue.append(signal)

    @workflow.signal(name="stop_runs")
    def stop_runs(self, signal: StopRunsSignal) -> None:
        self._queue.append(signal)

    @workflow.signal(name="expire_history")
    def expire_history(self, signal: ExpireHistorySignal) -> None:
        """The retention sweep: this run holds messages older than the
        workspace's period, so it continues as new (carrying no message) and
        the sweep deletes it once closed."""
        if workflow.info().workflow_start_time.timestamp() < signal.cutoff_epoch_seconds:
            self._expired = True

    @workflow.signal(name="run_state")
    def run_state(self, signal: RunStateSignal) -> None:
        if signal.state == "handoff":
            self._takeover = True
        if signal.state == "returned_input" and signal.event is not None:
            if self._active is not None and self._active.workflow_id == signal.run_workflow_id:
                self._active.accepting_input = False
            self._queue.append(_Returned(signal.event))
            return
        if self._active is None or self._active.workflow_id != signal.run_workflow_id:
            return
        if signal.state == "accepting_input":
            self._active.accepting_input = True
        elif signal.state == "not_accepting":
            self._active.accepting_input = False
        elif signal.state in ("finished", "handoff"):
            self._active = None

    @workflow.update(name="send_human_message")
    async def send_human_message(self, message: HumanMessageInput) -> HumanMessageResult:
        """A teammate's reply: sent with Meta's HUMAN_AGENT tag (7-day window)."""
        try:
            result: SendMessageResult = await workflow.execute_activity(
                "send_message",
                SendMessageInput(
                    channel_id=self._input.channel_id,
                    contact_id=self._input.contact_id,
                    recipient_id=self._input.contact_external_id,
                    idempotency_key=f"{workflow.info().workflow_id}/human/{message.request_id}",
                    text=message.text,
                    human_agent=True,
                ),
                result_type=SendMessageResult,
                start_to_close_timeout=SEND_TIMEOUT,
                retry_policy=INTERACTIVE_RETRY,
            )
        except ActivityError as err:
            skipped = send_skipped(err)
            return HumanMessageResult(status="skipped" if skipped else "failed", detail=root_message(err))
        return HumanMessageResult(status="sent", platform_message_id=result.platform_message_id)

    @workflow.query(name="state")
    def state(self) -> dict:
        return {
            "active_run": self._active.workflow_id if self._active else None,
            "accepting_input": bool(self._active and self._active.accepting_input),
            "human_takeover": self._takeover,
            "queued": len(self._queue),
            "events_handled": self._input.events_handled + self._handled,
        }

    # -- main ------------------------------------------------------------------

    @workflow.run
    async def run(self, input: ConversationInput) -> None:
        self._current = workflow.patched(CURRENT_PATH)
        self._matching = matching_rules()
        while True:
            await workflow.wait_condition(
                lambda: bool(self._queue) or self._should_continue_as_new()
            )
            while self._queue:
                item = self._queue.popleft()
                if isinstance(item, InboundEvent):
                    await self._on_event(item)
                elif isinstance(item, _Returned):
                    await self._on_returned(item.event)
                elif isinstance(item, StartAutomationSignal):
                    await self._on_api_start(item)
                elif isinstance(item, StopRunsSignal):
                    await self._supersede_active()
                else:
                    await self._on_resume(item)
                self._handled += 1
            if self._should_continue_as_new():
                await workflow.wait_condition(
                    lambda: workflow.all_handlers_finished() and not self._background
                )
                if not self._queue:
                    workflow.continue_as_new(
                        ConversationInput(
                            workspace_id=input.workspace_id,
                            channel_id=input.channel_id,
                            platform=input.platform,
                            contact_id=input.contact_id,
                            contact_external_id=input.contact_external_id,
                            seen_event_ids=list(self._seen),
                            active_run=self._active,
                            human_takeover=self._takeover,
                            events_handled=input.events_handled + self._handled,
                        )
                    )

    def _should_continue_as_new(self) -> bool:
        return (
            self._expired
            or workflow.info().is_continue_as_new_suggested()
            or self._handled >= EVENTS_BEFORE_CONTINUE_AS_NEW
        )

    # -- handlers --------------------------------------------------------------

    def _remember(self, event_id: str) -> bool:
        """False when the event was seen already (a platform redelivery)."""
        if event_id in self._seen_set:
            return False
        self._seen.append(event_id)
        self._seen_set.add(event_id)
        while len(self._seen) > MAX_SEEN_EVENT_IDS:
            self._seen_set.discard(self._seen.popleft())
        return True

    async def _on_event(self, event: InboundEvent) -> None:
        if not self._remember(event.event_id):
            return
        # The reply can leave with the recording when nothing in this
        # workflow's state keeps it from matching triggers (a human owns the
        # conversation, a run waits for this answer).
        waiting = self._active is not None and self._active.accepting_input
        keep_waiting = (
            waiting
            and event.kind in TRIGGERING_KINDS
            and event.kind not in REPLY_KINDS
            and workflow.patched(KEEP_WAITING_RUN)
        )
        first_reply = (
            self._current
            and event.kind in TRIGGERING_KINDS
            and event.kind != "comment"
            and not self._takeover
            and not keep_waiting
            and not (event.kind in REPLY_KINDS and waiting)
        )
        try:
            record = await self._contact_context("record_inbound", event, first_reply=first_reply)
        except ACTIVITY_FAILURES as err:
            # The database refused the event's content (no retry fixes that):
            # skipped, so the person's later messages are still answered.
            if root_type(err) != ErrorType.UNRECORDABLE_EVENT or not workflow.patched(SKIP_UNRECORDABLE):
                raise
            workflow.logger.warning("event %s could not be recorded: skipped", event.event_id)
            return
        if record.duplicate or not record.channel_active or record.contact is None:
            return
        if event.callback_query_id:
            self._acknowledge(event.callback_query_id)
        if keep_waiting:
            workflow.logger.info("a %s while a run waits for a reply: the run keeps waiting", event.kind)
            return
        await self._route(event, record, may_forward=True)
        self._look_up_after_routing(event, record.contact)

    async def _on_returned(self, event: InboundEvent) -> None:
        """A reply the run could no longer take: already recorded, so only
        match it against triggers."""
        record = await self._contact_context("load_match_context", event)
        if record.channel_active and record.contact is not None:
            await self._route(event, record, may_forward=False)

    async def _contact_context(
        self, activity_name: str, event: InboundEvent, *, first_reply: bool = False
    ) -> RecordInboundResult:
        return await workflow.execute_local_activity(
            activity_name,
            RecordInboundInput(
                workspace_id=self._input.workspace_id,
                channel_id=self._input.channel_id,
                contact_id=self._input.contact_id,
                event=event,
                recorder=f"{workflow.info().run_id}/{self._handled}",
                first_reply=first_reply,
                platform=self._input.platform,
                matching=self._matching,
            ),
            result_type=RecordInboundResult,
            start_to_close_timeout=DB_TIMEOUT + SEND_TIMEOUT if first_reply else DB_TIMEOUT,
            retry_policy=DB_RETRY,
        )

    async def _route(self, event: InboundEvent, record: RecordInboundResult, *, may_forward: bool) -> None:
        contact = record.contact
        assert contact is not None
        held = flowrt.held_from_triggers(event.kind, contact)
        if held in ("not_triggering", "restricted"):
            return
        if self._takeover or held == "human":
            self._takeover = True
            return  # a human owns the conversation until resumed

        if may_forward and event.kind in REPLY_KINDS and self._active is not None and self._active.accepting_input:
            if await self._forward(event):
                return

        automation = flowrt.select_automation(
            record.automations, event, is_first_message=not record.has_previous_inbound, matching=self._matching
        )
        if automation is None:
            return
        accepting = False
        if event.kind != "comment" and (self._current or workflow.patched("send-first-step")):
            run_id = run_workflow_id(self._input.workspace_id, automation.id, contact.id, event.event_id)
            if self._current:
                opening = self._send_opening(run_id, automation, contact, record.first_send)
            else:
                opening = self._send_first_step(run_id, automation, contact)
            contact, accepting, whole_flow_sent = await opening
            if whole_flow_sent:
                return
            reuse = WorkflowIDReusePolicy.ALLOW_DUPLICATE
        else:
            if self._needs_profile(contact):
                contact = await self._fetch_profile(contact)
            if event.kind == "comment":
                # Once per commenter, per post, per automation: the run id is the key.
                run_id = run_workflow_id(
                    self._input.workspace_id, automation.id, contact.id, f"media:{event.media_id}"
                )
                reuse = WorkflowIDReusePolicy.REJECT_DUPLICATE
            else:
                run_id = run_workflow_id(self._input.workspace_id, automation.id, contact.id, event.event_id)
                reuse = WorkflowIDReusePolicy.ALLOW_DUPLICATE
        await self._start_run(
            run_id, automation, contact, trigger=event, context={}, id_reuse_policy=reuse,
            accepting_from_start=accepting,
        )

    def _needs_profile(self, contact: ContactSnapshot) -> bool:
        return flowrt.needs_profile(contact, self._input.platform)

    async def _send_opening(
        self, run_id: str, automation: AutomationSnapshot, contact: ContactSnapshot, sent_early: FirstSend | None
    ) -> tuple[ContactSnapshot, bool, bool]:
        """The reply leaves before the run starts (CURRENT_PATH).

        When the flow opens with a message, it is sent under the idempotency
        key the run's own first send uses (``<run id>/<step id>/1``), so the
        run finds it sent and only records it: by ``record_inbound`` already
        (``sent_early``, for this run and step), else by a ``send_message``
        local activity. One try: anything else (a closed window, a rate-limit
        wait, a platform error) is left to the run, which sends durably with
        its retries. A new Meta contact's profile is looked up by
        ``record_inbound`` while it records the event (the contact comes back
        looked up), else by the send (``flowrt.opening_send``). A flow that
        is this one message ends with
        it: its run is recorded with the send and no run workflow starts.

        Returns the contact for the run, whether the run must accept the
        person's answer from its start (a wait_for_reply follows the message)
        and whether the whole flow was sent (nothing left to start).
        """
        step, accepting, whole_flow = flowrt.leading_send(automation.definition.get("steps", []))
        profile_pending = self._needs_profile(contact)
        sent = False
        if step is not None:
            result: SendMessageResult | None = None
            if sent_early is not None and sent_early.run_id == run_id and sent_early.step_id == step["id"]:
                result = sent_early.result
                if result is None:
                    workflow.logger.info("first message left to the run: %s", sent_early.error_type)
            else:
                send = flowrt.opening_send(
                    workspace_id=self._input.workspace_id, channel_id=self._input.channel_id,
                    platform=self._input.platform, run_id=run_id, automation=automation, contact=contact,
                    step=step, whole_flow=whole_flow, now_iso=workflow.now().isoformat(),
                )
                try:
                    result = await workflow.execute_local_activity(
                        "send_message",
                        send,
                        result_type=SendMessageResult,
                        start_to_close_timeout=SEND_TIMEOUT,
                        retry_policy=SINGLE_ATTEMPT,
                    )
                except ACTIVITY_FAILURES as err:
                    workflow.logger.info("first message left to the run: %s", root_type(err) or type(err).__name__)
            if result is not None:
                sent = True
                if result.profile_looked_up:
                    self._profile_tried = True
                    profile_pending = False
                    contact = result.contact or contact
        if profile_pending:
            contact = await self._fetch_profile(contact, local=True)
        if sent and whole_flow:
            # The run supersedes the previous one, as a started run would.
            await self._supersede_active()
            return contact, False, True
        return contact, accepting, False

    async def _send_first_step(
        self, run_id: str, automation: AutomationSnapshot, contact: ContactSnapshot
    ) -> tuple[ContactSnapshot, bool, bool]:
        """Runs started before CURRENT_PATH (``_send_opening`` otherwise):
        kept as it was, so their histories replay. The reply leaves from
        this workflow task, not after a child start.

        When the flow opens with a message, it is sent here by a local
        activity under the idempotency key the run's own first send uses
        (``<run id>/<step id>/1``), so the run finds it sent and only records
        it. One attempt: anything else (a closed window, a rate-limit wait, a
        platform error) is left to the run, which sends durably with its
        retries. The profile of a new contact is looked up by the send
        activity itself: first, with the message rendered for it, when the
        message uses the contact's fields (``profile_first_template``), else
        once the message is out (``then_fetch_profile``). Older histories
        have a ``fetch_profile`` local activity before or after the send.

        A flow that is this one message ends with it: no run workflow starts;
        the run is recorded with the send (``completes_run``; older histories
        record it with a ``record_run`` local activity after it).

        Returns the contact for the run, whether the run must accept the
        person's answer from its start (a wait_for_reply follows the message)
        and whether the whole flow was sent (nothing left to start).
        """
        step, accepting, whole_flow = flowrt.leading_send(automation.definition.get("steps", []))
        profile_pending = self._needs_profile(contact)
        sent = False
        # Newer code records a one-message flow's run with the send itself
        # (one local activity instead of two).
        completes_run = step is not None and whole_flow and workflow.patched("send-completes-run")
        if step is not None:
            # Newer code has the send activity look the profile up (one local
            # activity instead of two): first, and render the message with
            # it, when the message uses the contact; else once it is out.
            profile_template = ""
            if profile_pending and flowrt.uses_contact(step["text"]):
                if workflow.patched("send-looks-up-profile-first"):
                    profile_template = step["text"]
                else:
                    contact = await self._fetch_profile(contact, local=True)
                    profile_pending = False
            text = flowrt.render(step["text"], contact, {})
            profile_by_send = profile_pending and not profile_template and workflow.patched("send-fetches-profile")
            try:
                result: SendMessageResult = await workflow.execute_local_activity(
                    "send_message",
                    SendMessageInput(
                        channel_id=self._input.channel_id,
                        contact_id=contact.id,
                        recipient_id=contact.external_id,
                        idempotency_key=f"{run_id}/{step['id']}/1",
                        text=text,
                        quick_replies=flowrt.quick_replies(step),
                        buttons=flowrt.buttons(step),
                        run_id=run_id,
                        completes_run=(
                            self._inline_run_record(run_id, automation, contact, step, text) if completes_run else None
                        ),
                        then_fetch_profile=profile_by_send,
                        profile_first_template=profile_template,
                    ),
                    result_type=SendMessageResult,
                    start_to_close_timeout=SEND_TIMEOUT,
                    retry_policy=SINGLE_ATTEMPT,
                )
                sent = True
                text = result.text or text
                if result.profile_looked_up:
                    self._profile_tried = True
                    profile_pending = False
                    contact = result.contact or contact
            except ACTIVITY_FAILURES as err:
                workflow.logger.info("first message left to the run: %s", root_type(err) or type(err).__name__)
        if profile_pending:
            contact = await self._fetch_profile(contact, local=True)
        if sent and whole_flow:
            assert step is not None
            # The run supersedes the previous one, as a started run would.
            await self._supersede_active()
            if not completes_run:
                await workflow.execute_local_activity(
                    "record_run",
                    self._inline_run_record(run_id, automation, contact, step, text),
                    start_to_close_timeout=DB_TIMEOUT,
                    retry_policy=DB_RETRY,
                )
            return contact, False, True
        return contact, accepting, False

    def _inline_run_record(
        self, run_id: str, automation: AutomationSnapshot, contact: ContactSnapshot, step: dict, text: str
    ) -> RecordRunInput:
        """A one-message flow, sent: its run as the run workflow records it
        (status and trail; ``GET /v1/runs/{id}`` reads it)."""
        return RecordRunInput(
            run_id=run_id,
            workspace_id=self._input.workspace_id,
            channel_id=self._input.channel_id,
            contact_id=contact.id,
            automation_id=automation.id,
            version=automation.version,
            status="completed",
            trail=[
                TrailEntry(
                    step_id=step["id"], type="send_message", status="done",
                    at=workflow.now().isoformat(), detail=text[:200],
                )
            ],
        )

    async def _on_api_start(self, signal: StartAutomationSignal) -> None:
        if not self._remember(f"api:{signal.run_id}"):
            return
        contact: ContactSnapshot | None = await workflow.execute_local_activity(
            "load_contact",
            ContactRef(contact_id=self._input.contact_id),
            result_type=ContactSnapshot,
            start_to_close_timeout=DB_TIMEOUT,
            retry_policy=DB_RETRY,
        )
        if contact is None or contact.processing_restricted or contact.consent_withdrawn:
            return
        await self._start_run(signal.run_id, signal.automation, contact, trigger=None, context=signal.context)

    async def _on_resume(self, signal: ResumeSignal) -> None:
        self._takeover = False
        await workflow.execute_local_activity(
            "update_contact",
            UpdateContactInput(contact_id=self._input.contact_id, human_takeover=False),
            result_type=ContactSnapshot,
            start_to_close_timeout=DB_TIMEOUT,
            retry_policy=DB_RETRY,
        )

    async def _fetch_profile(self, contact: ContactSnapshot, *, local: bool = False) -> ContactSnapshot:
        """Best effort: a profile the platform will not give is no reason to
        delay or drop the reply (templates have fallbacks). ``local``: inside
        the current workflow task (no task round trip)."""
        self._profile_tried = True
        execute = workflow.execute_local_activity if local else workflow.execute_activity
        try:
            fetched: ContactSnapshot | None = await execute(
                "fetch_profile",
                ProfileInput(
                    channel_id=self._input.channel_id,
                    contact_id=contact.id,
                    external_id=self._input.contact_external_id,
                ),
                result_type=ContactSnapshot,
                start_to_close_timeout=PROFILE_TIMEOUT,
                retry_policy=PROFILE_RETRY,
            )
        except ACTIVITY_FAILURES as err:
            workflow.logger.info("profile lookup failed: %s", root_type(err) or type(err).__name__)
            return contact
        return fetched or contact

    def _look_up_after_routing(self, event: InboundEvent, contact: ContactSnapshot) -> None:
        """The profile lookup the reply path did not make (PROFILE_AFTER_ROUTING),
        once per run: a regular activity with retries of its own, started
        after the event's routing and reply and not awaited, so no reply (this
        event's or a later one's) waits for it. It saves the names itself; one
        that keeps failing leaves the contact nameless (logged)."""
        if self._profile_tried or not flowrt.profile_due_after_routing(event.kind, contact, self._input.platform):
            return
        if not workflow.patched(PROFILE_AFTER_ROUTING):
            return
        self._profile_tried = True
        task = workflow.start_activity(
            "fetch_profile",
            ProfileInput(
                channel_id=self._input.channel_id, contact_id=contact.id, external_id=self._input.contact_external_id
            ),
            start_to_close_timeout=PROFILE_TIMEOUT,
            retry_policy=PROFILE_LATER_RETRY,
            # Nobody waits on it: people's replies go first when tasks back up.
            priority=BULK_PRIORITY,
        )
        self._background.add(task)
        task.add_done_callback(self._profile_done)

    def _profile_done(self, task: asyncio.Future) -> None:
        self._background.discard(task)
        if not task.cancelled() and task.exception() is not None:
            error = task.exception()
            workflow.logger.info(
                "profile lookup failed: %s; the contact stays nameless", root_type(error) or type(error).__name__
            )

    async def _forward(self, event: InboundEvent) -> bool:
        assert self._active is not None
        try:
            await workflow.get_external_workflow_handle(self._active.workflow_id).signal(
                "reply", ReplySignal(event=event)
            )
            return True
        except FailureError:
            self._active = None  # the run is gone: match triggers instead
            return False

    async def _start_run(
        self,
        run_id: str,
        automation: AutomationSnapshot,
        contact: ContactSnapshot,
        *,
        trigger: InboundEvent | None,
        context: dict,
        id_reuse_policy: WorkflowIDReusePolicy = WorkflowIDReusePolicy.ALLOW_DUPLICATE,
        accepting_from_start: bool = False,
    ) -> None:
        # A new trigger supersedes a run that is not waiting for this person;
        # newer code cancels it only once the new run has really started (a
        # comment that already had its run must not cancel anything).
        start_first = self._current or workflow.patched("start-before-supersede")
        if not start_first:
            await self._supersede_active()
        try:
            handle = await workflow.start_child_workflow(
                AUTOMATION_RUN_WORKFLOW,
                RunInput(
                    run_id=run_id,
                    workspace_id=self._input.workspace_id,
                    channel_id=self._input.channel_id,
                    platform=self._input.platform,
                    contact=contact,
                    automation=automation,
                    conversation_workflow_id=workflow.info().workflow_id,
                    trigger=trigger,
                    context=context,
                    accepting_from_start=accepting_from_start,
                ),
                id=run_id,
                id_reuse_policy=id_reuse_policy,
                parent_close_policy=ParentClosePolicy.ABANDON,
                search_attributes=search_attributes(
                    self._input.workspace_id,
                    self._input.channel_id,
                    contact.id,
                    automation.id,
                    self._input.platform,
                ),
            )
        except WorkflowAlreadyStartedError:
            return  # this event (or API request) already started its run
        # The run reports its end by signal (it outlives continue-as-new);
        # its result is consumed here only so a terminated run is not logged
        # as an unretrieved exception.
        handle.add_done_callback(_consume_result)
        if start_first:
            await self._supersede_active()
        self._active = ActiveRun(
            workflow_id=run_id, automation_id=automation.id, accepting_input=accepting_from_start
        )

    async def _supersede_active(self) -> None:
        if self._active is None:
            return
        previous = self._active.workflow_id
        self._active = None
        try:
            await workflow.get_external_workflow_handle(previous).cancel()
        except FailureError:
            pass  # it already finished

    def _acknowledge(self, callback_query_id: str) -> None:
        """Fire-and-forget: answer a Telegram button press (spinner off)."""
        task = workflow.start_activity(
            "acknowledge_callback",
            AckCallbackInput(channel_id=self._input.channel_id, callback_query_id=callback_query_id),
            start_to_close_timeout=SEND_TIMEOUT,
            retry_policy=INTERACTIVE_RETRY,
        )
        self._background.add(task)
        task.add_done_callback(self._ack_done)

    def _ack_done(self, task: asyncio.Future) -> None:
        self._background.discard(task)
        if not task.cancelled() and task.exception() is not None:
            workflow.logger.info("callback acknowledgement failed: %s", type(task.exception()).__name__)
