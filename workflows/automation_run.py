"""AutomationRun: interprets one pinned automation flow for one contact.

Deterministic: every side effect is an activity, every wait a timer or a
signal. The flow definition arrives in the input, so a run keeps the version
it started with whatever later edits happen.
"""

from __future__ import annotations

import asyncio
from collections import deque
from datetime import timedelta

from temporalio import workflow
from temporalio.exceptions import ActivityError, CancelledError, FailureError

with workflow.unsafe.imports_passed_through():
    from core import flowrt
    from core.contracts import (
        AUTOMATION_RUN_WORKFLOW,
        ContactSnapshot,
        ExternalEventSignal,
        GenerateReplyInput,
        GenerateReplyResult,
        InboundEvent,
        PublicReplyInput,
        RecordRunInput,
        ReplySignal,
        RunInput,
        RunResult,
        RunStateSignal,
        RunStatus,
        SendMessageInput,
        SendMessageResult,
        TrailEntry,
        UpdateContactInput,
    )
    from workflows.common import (
        ACTIVITY_FAILURES,
        AI_RETRY,
        AI_TIMEOUT,
        DB_RETRY,
        DB_TIMEOUT,
        SEND_RETRY,
        SEND_TIMEOUT,
        matching_rules,
        root_message,
        send_skipped,
    )

MAX_STEPS_PER_RUN = 500
MAX_TRAIL = 200


PRIVATE_REPLY_WINDOW = timedelta(days=7)


def _reraise_cancellation(err: BaseException) -> None:
    """An activity the run's cancellation cancelled: the run is cancelled (not
    failed, and no fallback is sent)."""
    if isinstance(err.__cause__, CancelledError) or isinstance(err, CancelledError):
        raise asyncio.CancelledError() from None


class RunFailed(Exception):
    pass


class RunEnded(Exception):
    """The run stops early for a reason the platform imposes (not a failure)."""


@workflow.defn(name=AUTOMATION_RUN_WORKFLOW)
class AutomationRunWorkflow:
    @workflow.init
    def __init__(self, input: RunInput) -> None:
        self._input = input
        self._contact: ContactSnapshot = input.contact
        self._steps: list[dict] = list(input.automation.definition.get("steps", []))
        self._index = flowrt.step_index(self._steps)
        self._status = "running"
        self._matching = 1  # flowrt's matching rules, decided when the run starts
        self._current = ""
        self._trail: list[TrailEntry] = []
        self._accepting = input.accepting_from_start
        self._replies: deque[InboundEvent] = deque()
        self._events: dict[str, deque[dict]] = {}
        self._last_reply = input.trigger.text if input.trigger else ""
        self._visits: dict[str, int] = {}
        self._private_reply_pending = False
        self._window_closed = False

    # -- signals and queries -------------------------------------------------

    @workflow.signal(name="reply")
    async def reply(self, signal: ReplySignal) -> None:
        if self._accepting:
            self._replies.append(signal.event)
        else:
            # Arrived after the wait ended: hand it back rather than drop it.
            await self._tell_conversation("returned_input", event=signal.event)

    @workflow.signal(name="external_event")
    def external_event(self, signal: ExternalEventSignal) -> None:
        self._events.setdefault(signal.name, deque()).append(signal.payload)

    @workflow.query(name="status")
    def status(self) -> RunStatus:
        return RunStatus(
            run_id=self._input.run_id,
            automation_id=self._input.automation.id,
            version=self._input.automation.version,
            status=self._status,
            current_step=self._current,
            trail=list(self._trail),
        )

    # -- main ------------------------------------------------------------------

    @workflow.run
    async def run(self, input: RunInput) -> RunResult:
        # No awaits in ``finally`` blocks: on eviction from the worker cache
        # the SDK closes coroutines, and workflow calls there would fail.
        cancelled = False
        self._matching = matching_rules()
        try:
            # Inside the try: a run cancelled before its first step (its
            # contact restricted while it started) still records that.
            await self._record("running")
            await self._start_comment_run()
            await self._interpret()
            self._status = "completed"
        except RunEnded as end:
            self._status = "completed"
            self._note(self._current or "-", "run", "ended", str(end))
        except asyncio.CancelledError:
            cancelled = True
            self._status = "cancelled"
            self._note(self._current or "-", "run", "cancelled", "cancelled")
        except RunFailed as err:
            self._status = "failed"
            self._note(self._current or "-", "run", "failed", str(err))
        self._accepting = False
        await self._record(self._status)
        await workflow.wait_condition(workflow.all_handlers_finished)
        await self._tell_conversation("finished")
        if cancelled:
            raise asyncio.CancelledError()
        return RunResult(status=self._status, trail=list(self._trail))

    async def _start_comment_run(self) -> None:
        trigger = self._input.trigger
        if trigger is None or trigger.kind != "comment":
            return
        if trigger.timestamp_ms:
            age = workflow.now().timestamp() * 1000 - trigger.timestamp_ms
            if age > PRIVATE_REPLY_WINDOW.total_seconds() * 1000:
                raise RunEnded("the comment is older than 7 days: private replies are no longer allowed")
        self._private_reply_pending = True
        await self._public_reply()

    async def _interpret(self) -> None:
        pos: int | None = 0 if self._steps else None
        executed = 0
        while pos is not None:
            executed += 1
            if executed > MAX_STEPS_PER_RUN:
                raise RunFailed(f"stopped after {MAX_STEPS_PER_RUN} steps: the flow loops without waiting")
            step = self._steps[pos]
            self._current = step["id"]
            self._visits[step["id"]] = self._visits.get(step["id"], 0) + 1
            handler = getattr(self, f"_step_{step['type']}", None)
            if handler is None:
                raise RunFailed(f"step {step['id']!r} has unknown type {step['type']!r}")
            target = await handler(pos, step)
            if target == "__handoff__":
                return
            pos = flowrt.resolve_target(self._steps, pos, target)
        self._current = ""

    # -- steps: each returns the target to follow (None: the next step) -------

    async def _step_send_message(self, pos: int, step: dict) -> str | None:
        await self._announce_if_followed_by_wait(pos, step)
        text = flowrt.render(step["text"], self._contact, self._input.context)
        if await self._send(step, text, quick_replies=flowrt.quick_replies(step), buttons=flowrt.buttons(step)):
            self._note(step["id"], "send_message", "done", text[:200])
        return step.get("next")

    async def _step_wait_for_reply(self, pos: int, step: dict) -> str | None:
        await self._set_accepting(True)
        self._status = "waiting"
        self._note(step["id"], "wait_for_reply", "waiting", f"timeout {int(flowrt.option(step, 'timeout_seconds'))}s")
        target = await self._await_valid_reply(step)
        self._status = "running"
        await self._set_accepting(False)
        return target

    async def _await_valid_reply(self, step: dict) -> str | None:
        timeout = timedelta(seconds=int(flowrt.option(step, "timeout_seconds")))
        max_retries = int(flowrt.option(step, "max_retries"))
        retries = 0
        while True:
            try:
                await workflow.wait_condition(lambda: bool(self._replies), timeout=timeout)
            except TimeoutError:
                self._note(step["id"], "wait_for_reply", "timed_out", "no reply before the timeout")
                return flowrt.option(step, "on_timeout")
            event = self._replies.popleft()
            answer = event.text or event.payload
            if not answer and event.attachments and workflow.patched("attachment-replies"):
                # A photo, voice note or file answers too ("send us a photo of
                # your receipt"): its URL is the answer, saved to the field.
                answer = " ".join(a.url for a in event.attachments if a.url) or event.attachments[0].type
            self._window_closed = False  # the person wrote: the messaging window is open
            ok, value = flowrt.validate_reply(step, answer, self._matching)
            if ok:
                self._last_reply = answer
                if step.get("save_to_field"):
                    await self._update_contact(
                        UpdateContactInput(contact_id=self._contact.id, set_fields={step["save_to_field"]: value})
                    )
                self._note(step["id"], "wait_for_reply", "done", "valid reply")
                return step.get("next")
            retries += 1
            if retries > max_retries:
                self._note(step["id"], "wait_for_reply", "invalid", f"invalid reply after {max_retries} retries")
                return flowrt.option(step, "on_invalid")
            self._note(step["id"], "wait_for_reply", "invalid", f"invalid reply ({retries}/{max_retries})")
            if step.get("retry_prompt"):
                text = flowrt.render(step["retry_prompt"], self._contact, self._input.context)
                await self._send(step, text, suffix=f"retry{retries}")

    async def _step_wait_for_event(self, pos: int, step: dict) -> str | None:
        name = step["event"]
        timeout = timedelta(seconds=int(flowrt.option(step, "timeout_seconds")))
        self._status = "waiting"
        self._note(step["id"], "wait_for_event", "waiting", f"event {name!r}")
        try:
            await workflow.wait_condition(lambda: bool(self._events.get(name)), timeout=timeout)
        except TimeoutError:
            self._status = "running"
            self._note(step["id"], "wait_for_event", "timed_out", f"no {name!r} event before the timeout")
            return flowrt.option(step, "on_timeout")
        self._status = "running"
        payload = self._events[name].popleft()
        if step.get("save_to_field"):
            await self._update_contact(UpdateContactInput(
                contact_id=self._contact.id, set_fields={step["save_to_field"]: payload}
            ))
        self._note(step["id"], "wait_for_event", "done", f"event {name!r} received")
        return step.get("next")

    async def _step_condition(self, pos: int, step: dict) -> str | None:
        result = flowrt.evaluate_condition(step, self._contact, self._last_reply, self._matching)
        self._note(step["id"], "condition", "done", "then" if result else "else")
        return step["then"] if result else step["else"]

    async def _step_add_tag(self, pos: int, step: dict) -> str | None:
        await self._update_contact(UpdateContactInput(contact_id=self._contact.id, add_tags=[step["tag"]]))
        self._note(step["id"], "add_tag", "done", step["tag"])
        return step.get("next")

    async def _step_remove_tag(self, pos: int, step: dict) -> str | None:
        await self._update_contact(UpdateContactInput(contact_id=self._contact.id, remove_tags=[step["tag"]]))
        self._note(step["id"], "remove_tag", "done", step["tag"])
        return step.get("next")

    async def _step_set_field(self, pos: int, step: dict) -> str | None:
        value = step.get("value")
        if isinstance(value, str):
            value = flowrt.render(value, self._contact, self._input.context)
        await self._update_contact(UpdateContactInput(contact_id=self._contact.id, set_fields={step["field"]: value}))
        self._note(step["id"], "set_field", "done", step["field"])
        return step.get("next")

    async def _step_delay(self, pos: int, step: dict) -> str | None:
        seconds = flowrt.delay_seconds(step)
        self._note(step["id"], "delay", "waiting", f"{seconds}s")
        await workflow.sleep(timedelta(seconds=seconds))
        self._note(step["id"], "delay", "done", f"{seconds}s")
        return step.get("next")

    async def _step_ai_reply(self, pos: int, step: dict) -> str | None:
        await self._announce_if_followed_by_wait(pos, step)
        detail = "AI reply"
        try:
            result: GenerateReplyResult = await workflow.execute_activity(
                "generate_reply",
                GenerateReplyInput(
                    workspace_id=self._input.workspace_id,
                    contact_id=self._contact.id,
                    instructions=step["instructions"],
                    run_id=self._input.run_id,
                    max_history=int(flowrt.option(step, "history_messages")) or 1,
                ),
                result_type=GenerateReplyResult,
                start_to_close_timeout=AI_TIMEOUT,
                retry_policy=AI_RETRY,
            )
            text = result.text
        except ActivityError as err:
            _reraise_cancellation(err)
            text = step.get("fallback_text") or flowrt.STEP_DEFAULTS["fallback_text"]
            detail = f"AI failed ({root_message(err)}); fallback sent"
        if await self._send(step, text):
            self._note(step["id"], "ai_reply", "done", detail)
        return step.get("next")

    async def _step_handoff(self, pos: int, step: dict) -> str | None:
        if step.get("message"):
            await self._send(step, flowrt.render(step["message"], self._contact, self._input.context))
        await self._update_contact(UpdateContactInput(contact_id=self._contact.id, human_takeover=True))
        await self._tell_conversation("handoff")
        self._note(step["id"], "handoff", "done", step.get("note") or "handed to a human")
        return "__handoff__"

    # -- helpers ---------------------------------------------------------------

    async def _send(self, step: dict, text: str, *, quick_replies=(), buttons=(), suffix: str = "") -> bool:
        """Send one message; False when it was skipped (outside the window)."""
        comment_id = ""
        if self._private_reply_pending:
            # A comment-triggered run answers first with a private reply.
            comment_id = self._input.trigger.comment_id if self._input.trigger else ""
            self._private_reply_pending = False
            self._window_closed = True
        elif self._window_closed:
            # A private reply opens no messaging window: wait for the person.
            await self._await_window(step)
        visit = self._visits.get(step["id"], 1)
        key = f"{self._input.run_id}/{step['id']}/{visit}{('/' + suffix) if suffix else ''}"
        try:
            await workflow.execute_activity(
                "send_message",
                SendMessageInput(
                    channel_id=self._input.channel_id,
                    contact_id=self._contact.id,
                    recipient_id=self._contact.external_id,
                    idempotency_key=key,
                    text=text,
                    quick_replies=list(quick_replies),
                    buttons=list(buttons),
                    run_id=self._input.run_id,
                    comment_id=comment_id,
                ),
                result_type=SendMessageResult,
                start_to_close_timeout=SEND_TIMEOUT,
                retry_policy=SEND_RETRY,
            )
        except ActivityError as err:
            _reraise_cancellation(err)
            # Runs started before this policy failed here; keep them replayable.
            if send_skipped(err) and workflow.patched("skip-outside-window"):
                self._note(step["id"], step["type"], "skipped", root_message(err))
                return False
            self._note(step["id"], step["type"], "failed", root_message(err))
            raise RunFailed(f"step {step['id']!r}: send failed: {root_message(err)}") from None
        return True

    async def _await_window(self, step: dict) -> None:
        self._note(step["id"], step["type"], "waiting", "a private reply opens no window: waiting for the person")
        await self._set_accepting(True)
        self._status = "waiting"
        try:
            await workflow.wait_condition(lambda: bool(self._replies), timeout=PRIVATE_REPLY_WINDOW)
        except TimeoutError:
            self._status = "running"
            await self._set_accepting(False)
            raise RunEnded("the person did not answer the private reply within 7 days") from None
        self._last_reply = self._replies.popleft().text
        self._window_closed = False
        self._status = "running"
        await self._set_accepting(False)

    async def _public_reply(self) -> None:
        """Public reply under a top-level comment, from the trigger's variants."""
        trigger = self._input.trigger
        definition = self._input.automation.definition.get("trigger", {})
        if trigger is None or not trigger.is_top_level_comment or not definition.get("public_replies"):
            return
        text = flowrt.render(
            flowrt.public_reply_text(definition, trigger.comment_id), self._contact, self._input.context
        )
        try:
            await workflow.execute_activity(
                "reply_to_comment",
                PublicReplyInput(
                    channel_id=self._input.channel_id,
                    comment_id=trigger.comment_id,
                    text=text,
                    idempotency_key=f"{self._input.run_id}/public-reply",
                ),
                result_type=SendMessageResult,
                start_to_close_timeout=SEND_TIMEOUT,
                retry_policy=SEND_RETRY,
            )
            self._note("-", "public_reply", "done", text[:200])
        except ActivityError as err:
            _reraise_cancellation(err)
            self._note("-", "public_reply", "failed", root_message(err))

    async def _update_contact(self, update: UpdateContactInput) -> None:
        try:
            self._contact = await workflow.execute_local_activity(
                "update_contact",
                update,
                result_type=ContactSnapshot,
                start_to_close_timeout=DB_TIMEOUT,
                retry_policy=DB_RETRY,
            )
        except ACTIVITY_FAILURES as err:
            _reraise_cancellation(err)
            raise RunFailed(f"contact update failed: {root_message(err)}") from None

    async def _announce_if_followed_by_wait(self, pos: int, step: dict) -> None:
        """Start accepting replies *before* sending a prompt that a
        wait_for_reply step follows, so a fast answer is never missed."""
        nxt = flowrt.resolve_target(self._steps, pos, step.get("next"))
        if nxt is not None and self._steps[nxt]["type"] == "wait_for_reply":
            await self._set_accepting(True)

    async def _set_accepting(self, accepting: bool) -> None:
        if accepting == self._accepting:
            return
        self._accepting = accepting
        if accepting:
            self._replies.clear()
        await self._tell_conversation("accepting_input" if accepting else "not_accepting")

    async def _tell_conversation(self, state: str, event: InboundEvent | None = None) -> None:
        parent = self._input.conversation_workflow_id
        if not parent:
            return
        try:
            await workflow.get_external_workflow_handle(parent).signal(
                "run_state", RunStateSignal(run_workflow_id=self._input.run_id, state=state, event=event)
            )
        except FailureError:
            pass  # the conversation is gone (erased or disconnected): nothing to tell

    async def _record(self, status: str) -> None:
        await workflow.execute_local_activity(
            "record_run",
            RecordRunInput(
                run_id=self._input.run_id,
                workspace_id=self._input.workspace_id,
                channel_id=self._input.channel_id,
                contact_id=self._contact.id,
                automation_id=self._input.automation.id,
                version=self._input.automation.version,
                status=status,
                trail=list(self._trail),
            ),
            start_to_close_timeout=DB_TIMEOUT,
            retry_policy=DB_RETRY,
        )

    def _note(self, step_id: str, type_: str, status: str, detail: str = "") -> None:
        self._trail.append(
            TrailEntry(step_id=step_id, type=type_, status=status, at=workflow.now().isoformat(), detail=detail)
        )
        if len(self._trail) > MAX_TRAIL:
            del self._trail[: len(self._trail) - MAX_TRAIL]
