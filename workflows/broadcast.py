"""Broadcast: a durable, rate-limited fan-out of one message to a segment.

Pages through the segment (contacts that are restricted, handed to a human
or outside the 24-hour window are counted as skipped with their reason),
sends each page with one ``send_broadcast_batch`` activity (recipient after
recipient, each send paced against the per-account and per-bot budgets in
the database, so several broadcasts and workers share them; progress
heartbeated, a retry resumes), loads the next page while the current one
is sent, records progress after every page, and continues as new with its
cursor and counts so 100k recipients never approach history limits.
Cancelling it stops the page being sent after its current message.
Broadcasts started before batches (patch "broadcast-batches") keep sending
one activity per recipient.
"""

from __future__ import annotations

import asyncio
from dataclasses import replace
from datetime import timedelta

from temporalio import workflow
from temporalio.exceptions import ActivityError, CancelledError

with workflow.unsafe.imports_passed_through():
    from core.contracts import (
        BROADCAST_WORKFLOW,
        BroadcastBatchInput,
        BroadcastBatchResult,
        BroadcastInput,
        BroadcastPage,
        BroadcastPageInput,
        BroadcastProgress,
        Recipient,
        SendMessageInput,
        SendMessageResult,
    )
    from workflows.common import DB_RETRY, DB_TIMEOUT, SEND_RETRY, SEND_TIMEOUT, root_message, send_skipped

PAGE_SIZE = 200
IN_FLIGHT = 32
PAGES_PER_RUN = 5  # ~1000 recipients (~3000 events) per run, then continue-as-new
BATCH_TIMEOUT = timedelta(minutes=30)  # a page at 30 msg/s takes ~7 s; waits beyond 2 s are retries
BATCH_HEARTBEAT = timedelta(seconds=30)


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
        batches = workflow.patched("broadcast-batches")
        try:
            upcoming: asyncio.Future | None = None
            for number in range(PAGES_PER_RUN):
                if upcoming is not None:
                    page: BroadcastPage = await upcoming
                    upcoming = None
                else:
                    page = await self._load_page(self._state.after_contact_id)
                for reason, count in page.skipped.items():
                    self._state.skipped[reason] = self._state.skipped.get(reason, 0) + count
                if batches:
                    if page.next_after and number + 1 < PAGES_PER_RUN:
                        upcoming = self._start_load_page(page.next_after)
                    if not await self._send_batch(page.recipients):
                        break
                else:
                    await self._send_all(page.recipients)
                self._state.after_contact_id = page.next_after
                if not page.next_after:
                    self._status = "completed"
                    break
                await self._record()
            if self._status == "failed":
                await self._record()
                return self.progress()
        except asyncio.CancelledError:
            self._status = "cancelled"
            await self._record()
            raise
        if self._status == "completed":
            await self._record()
            return self.progress()
        await self._record()
        workflow.continue_as_new(self._state)

    def _page_input(self, after_contact_id: str) -> BroadcastPageInput:
        return BroadcastPageInput(
            broadcast_id=self._state.broadcast_id,
            workspace_id=self._state.workspace_id,
            channel_id=self._state.channel_id,
            segment=self._state.segment,
            after_contact_id=after_contact_id,
            limit=PAGE_SIZE,
            now_iso=workflow.now().isoformat(),
        )

    async def _load_page(self, after_contact_id: str) -> BroadcastPage:
        return await workflow.execute_activity(
            "load_broadcast_page",
            self._page_input(after_contact_id),
            result_type=BroadcastPage,
            start_to_close_timeout=DB_TIMEOUT * 4,
            retry_policy=DB_RETRY,
        )

    def _start_load_page(self, after_contact_id: str) -> asyncio.Future:
        return workflow.start_activity(
            "load_broadcast_page",
            self._page_input(after_contact_id),
            result_type=BroadcastPage,
            start_to_close_timeout=DB_TIMEOUT * 4,
            retry_policy=DB_RETRY,
        )

    async def _send_batch(self, recipients: list[Recipient]) -> bool:
        """One page by one activity; False when the channel cannot send any
        more (the broadcast fails, the rest of the segment is not sent)."""
        if not recipients:
            return True
        try:
            result: BroadcastBatchResult = await workflow.execute_activity(
                "send_broadcast_batch",
                BroadcastBatchInput(
                    channel_id=self._state.channel_id,
                    text=self._state.text,
                    key_prefix=workflow.info().workflow_id,
                    recipients=recipients,
                    quick_replies=self._state.quick_replies,
                    buttons=self._state.buttons,
                ),
                result_type=BroadcastBatchResult,
                start_to_close_timeout=BATCH_TIMEOUT,
                heartbeat_timeout=BATCH_HEARTBEAT,
                retry_policy=SEND_RETRY,
            )
        except ActivityError as err:
            if isinstance(err.__cause__, CancelledError):
                raise asyncio.CancelledError() from None
            # Not expected (its errors are retried or reported in the result):
            # the page's outcome is unknown, so it is not counted.
            workflow.logger.warning("broadcast stopped: %s", root_message(err))
            self._status = "failed"
            return False
        self._state.sent += result.sent
        self._state.failed += result.failed
        for reason, count in result.skipped.items():
            self._state.skipped[reason] = self._state.skipped.get(reason, 0) + count
        if result.stopped:
            workflow.logger.warning("broadcast stopped: %s", result.stopped)
            self._status = "failed"
            return False
        return True

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
                    if send_skipped(err):
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
