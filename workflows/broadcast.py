"""Broadcast: a durable, rate-limited fan-out of one message to a segment.

Pages through the segment (contacts that are restricted, handed to a human
or outside the 24-hour window are counted as skipped with their reason),
sends with bounded concurrency (the send activity paces itself against the
per-account and per-bot budgets, so several broadcasts and workers share
them), records progress after every page, and continues as new with its
cursor and counts so 100k recipients never approach history limits.
Cancelling it stops after the sends in flight.
"""

from __future__ import annotations

import asyncio
from dataclasses import replace

from temporalio import workflow
from temporalio.exceptions import ActivityError

with workflow.unsafe.imports_passed_through():
    from core.contracts import (
        BROADCAST_WORKFLOW,
        BroadcastInput,
        BroadcastPage,
        BroadcastPageInput,
        BroadcastProgress,
        Recipient,
        SendMessageInput,
        SendMessageResult,
    )
    from workflows.common import DB_RETRY, DB_TIMEOUT, SEND_RETRY, SEND_TIMEOUT, root_type

PAGE_SIZE = 200
IN_FLIGHT = 32
PAGES_PER_RUN = 5  # ~1000 recipients (~3000 events) per run, then continue-as-new


@workflow.defn(name=BROADCAST_WORKFLOW)
class BroadcastWorkflow:
    @workflow.init
    def __init__(self, input: BroadcastInput) -> None:
        self._state = replace(input, skipped=dict(input.skipped))
        self._status = "running"

    @workflow.query(name="progress")
    def progress(self) -> BroadcastProgress:
        s = self._state
        return BroadcastProgress(s.broadcast_id, self._status, s.sent, s.failed, dict(s.skipped))

    @workflow.run
    async def run(self, input: BroadcastInput) -> BroadcastProgress:
        try:
            for _ in range(PAGES_PER_RUN):
                page: BroadcastPage = await workflow.execute_activity(
                    "load_broadcast_page",
                    BroadcastPageInput(
                        broadcast_id=input.broadcast_id,
                        workspace_id=input.workspace_id,
                        channel_id=input.channel_id,
                        segment=input.segment,
                        after_contact_id=self._state.after_contact_id,
                        limit=PAGE_SIZE,
                        now_iso=workflow.now().isoformat(),
                    ),
                    result_type=BroadcastPage,
                    start_to_close_timeout=DB_TIMEOUT * 4,
                    retry_policy=DB_RETRY,
                )
                for reason, count in page.skipped.items():
                    self._state.skipped[reason] = self._state.skipped.get(reason, 0) + count
                await self._send_all(page.recipients)
                self._state.after_contact_id = page.next_after
                if not page.next_after:
                    self._status = "completed"
                    break
                await self._record()
        except asyncio.CancelledError:
            self._status = "cancelled"
            await self._record()
            raise
        if self._status == "completed":
            await self._record()
            return self.progress()
        await self._record()
        workflow.continue_as_new(self._state)

    async def _send_all(self, recipients: list[Recipient]) -> None:
        semaphore = asyncio.Semaphore(IN_FLIGHT)

        async def one(recipient: Recipient) -> None:
            async with semaphore:
                try:
                    await workflow.execute_activity(
                        "send_message",
                        SendMessageInput(
                            channel_id=self._state.channel_id,
                            contact_id=recipient.contact_id,
                            recipient_id=recipient.external_id,
                            idempotency_key=f"{workflow.info().workflow_id}/{recipient.contact_id}",
                            text=self._state.text,
                        ),
                        result_type=SendMessageResult,
                        start_to_close_timeout=SEND_TIMEOUT,
                        retry_policy=SEND_RETRY,
                    )
                    self._state.sent += 1
                except ActivityError as err:
                    if root_type(err) == "OutsideMessagingWindow":
                        self._state.skipped["outside_window"] = self._state.skipped.get("outside_window", 0) + 1
                    else:
                        self._state.failed += 1

        await asyncio.gather(*(one(r) for r in recipients))

    async def _record(self) -> None:
        await workflow.execute_activity(
            "record_broadcast_progress",
            self.progress(),
            start_to_close_timeout=DB_TIMEOUT,
            retry_policy=DB_RETRY,
        )
