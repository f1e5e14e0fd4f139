"""The API's own worker, for the conversations it starts eagerly.

A new contact's first message normally reaches its conversation by
signal-with-start: Temporal writes the new execution, hands the workflow
task to a worker process through its matching service and records the
task's start, two writes and a hop before any of our code runs. Eager
workflow start skips the hop: the start's answer carries the first workflow
task to a worker in the process that asked. Only a worker sharing the API's
client can take it, so with ``api_conversation_slots`` > 0 (2 by default;
bench/README.md has what it buys and costs) the API runs one:

- the API starts a contact's conversation eagerly (the message in the
  workflow's input, ``ConversationInput.first_events``) when the contact has
  no conversation it knows of, one of ``api_conversation_slots`` is free, no
  other webhook waits on Temporal and webhooks come slowly
  (``api/routes/webhooks.py``): a burst goes to the worker processes as
  before;
- the worker takes only those tasks and the later tasks of the
  conversations it started (their sticky queue): ``IngressSlots`` never
  grants a slot to a poll of the shared task queue, so it takes no other
  work and runs no activities but the conversation's local ones;
- a conversation it started stays with it while it stays in its cache or
  comes back from its history (Temporal's sticky execution). When the API
  stops, Temporal hands those conversations to the worker processes (the
  SDK tells it at shutdown; after a crash, after ``STICKY_TIMEOUT``).

A contact the API did not know of whose conversation runs (after a restart
of the API, or another API replica started it) costs one refused start
before the signal-with-start (``WorkflowAlreadyStartedError``).

With ``api_conversation_slots=0`` the API runs no workflow code and every
event is a signal-with-start.
"""

from __future__ import annotations

import asyncio
import logging
import os
import socket
import threading
from collections import OrderedDict
from collections.abc import Awaitable, Callable
from datetime import timedelta
from typing import Any

from temporalio.client import Client
from temporalio.worker import (
    CustomSlotSupplier,
    FixedSizeSlotSupplier,
    PollerBehaviorSimpleMaximum,
    SlotMarkUsedContext,
    SlotPermit,
    SlotReleaseContext,
    SlotReserveContext,
    Worker,
    WorkerTuner,
)

from core.settings import Settings

# Builds the API's worker around the API's client, engine, vault and keys
# with the given Worker options; returns it and what closes its resources.
# The process that serves the API passes one in (workers/apiserver.py).
WorkerFactory = Callable[..., tuple[Worker, Callable[[], Awaitable[None]]]]

log = logging.getLogger("vectory.ingress")


def api_identity() -> str:
    """The API's Temporal identity, ``pid@host/api``: a workflow task it ran
    (an eager start) shows it in the history."""
    return f"{os.getpid()}@{socket.gethostname()}/api"


# Local activities (record_inbound and its send) the API runs at once.
LOCAL_ACTIVITY_SLOTS = 20
# How long a task of a conversation this API serves waits for it before
# Temporal hands it to the worker processes (the API crashed or is stuck).
STICKY_TIMEOUT = timedelta(seconds=2)
# Conversations the API remembers having dispatched to (a signal for them
# needs no refused start first).
KNOWN_CONVERSATIONS = 20_000


class _Sticky(SlotPermit):
    """A slot for a poll of this worker's own (sticky) queue."""


class IngressSlots(CustomSlotSupplier):
    """Workflow-task slots of the API's worker.

    - eager starts (``try_reserve_slot``): at most ``slots`` at once;
    - polls of its sticky queue: at most ``slots`` at once;
    - polls of the shared task queue: never (``reserve_slot`` waits until
      the worker shuts down), so no other worker's work comes here.
    """

    def __init__(self, slots: int) -> None:
        self.slots = slots
        self._lock = threading.Lock()
        self._eager = 0
        self._sticky = 0
        self._sticky_free = asyncio.Event()
        self._loop: asyncio.AbstractEventLoop | None = None

    def available(self) -> bool:
        """A slot for an eager start is free now."""
        return self._eager < self.slots

    async def reserve_slot(self, ctx: SlotReserveContext) -> SlotPermit:
        self._loop = asyncio.get_running_loop()
        if not ctx.is_sticky:
            await asyncio.Event().wait()  # cancelled at shutdown
        while True:
            with self._lock:
                if self._sticky < self.slots:
                    self._sticky += 1
                    return _Sticky()
                self._sticky_free.clear()
            await self._sticky_free.wait()

    def try_reserve_slot(self, ctx: SlotReserveContext) -> SlotPermit | None:
        with self._lock:
            if self._eager >= self.slots:
                return None
            self._eager += 1
            return SlotPermit()

    def mark_slot_used(self, ctx: SlotMarkUsedContext) -> None:
        pass

    def release_slot(self, ctx: SlotReleaseContext) -> None:
        with self._lock:
            if isinstance(ctx.permit, _Sticky):
                self._sticky -= 1
                if self._loop is not None:  # called from the SDK's threads too
                    self._loop.call_soon_threadsafe(self._sticky_free.set)
            else:
                self._eager -= 1


class Ingress:
    """The API's worker (``run``/``stop``) and the conversations it knows
    to be running (``known``/``remember``)."""

    def __init__(self, settings: Settings, factory: WorkerFactory | None = None) -> None:
        self.settings = settings
        self.factory = factory
        self.slots = IngressSlots(settings.api_conversation_slots)
        self.worker: Worker | None = None
        self._close: Callable[[], Awaitable[None]] | None = None
        self._known: OrderedDict[str, None] = OrderedDict()

    @property
    def running(self) -> bool:
        return self.worker is not None

    def ready(self) -> bool:
        """The worker runs and can take an eager start now."""
        return self.running and self.slots.available()

    def known(self, workflow_id: str) -> bool:
        return workflow_id in self._known

    def remember(self, workflow_id: str) -> None:
        self._known[workflow_id] = None
        self._known.move_to_end(workflow_id)
        if len(self._known) > KNOWN_CONVERSATIONS:
            self._known.popitem(last=False)

    def _build(self, client: Client, engine, vault, keys) -> Worker:
        """The worker: every workflow (a conversation it serves may start a
        run or continue as new), every activity registered but only local
        ones run here (``no_remote_activities``)."""
        assert self.factory is not None
        options: dict[str, Any] = dict(
            no_remote_activities=True,
            disable_eager_activity_execution=True,
            max_cached_workflows=self.settings.api_max_cached_conversations,
            max_concurrent_activities=None,
            workflow_task_poller_behavior=PollerBehaviorSimpleMaximum(2),
            sticky_queue_schedule_to_start_timeout=STICKY_TIMEOUT,
            tuner=WorkerTuner.create_composite(
                workflow_supplier=self.slots,
                activity_supplier=FixedSizeSlotSupplier(1),
                local_activity_supplier=FixedSizeSlotSupplier(LOCAL_ACTIVITY_SLOTS),
                nexus_supplier=FixedSizeSlotSupplier(1),
            ),
        )
        self.worker, self._close = self.factory(client, self.settings, engine, vault, keys, **options)
        return self.worker

    async def run(self, client: Client, engine, vault, keys) -> None:
        """Build the worker and run it until ``stop``. If it cannot run,
        every event goes by signal-with-start to the worker processes."""
        if self.factory is None:
            log.info("the API runs no worker: new conversations start on the worker processes")
            return
        try:
            worker = self._build(client, engine, vault, keys)
        except Exception:
            log.exception("the API's worker cannot start: new conversations start on the worker processes")
            return
        log.info("the API starts new conversations eagerly (%d slots)", self.slots.slots)
        try:
            await worker.run()
        except Exception:
            log.exception("the API's worker stopped: new conversations start on the worker processes")
        finally:
            self.worker = None
            if self._close is not None:
                await self._close()

    async def stop(self) -> None:
        """Finish the tasks in hand; Temporal then gives this worker's
        conversations to the worker processes."""
        if self.worker is not None:
            await self.worker.shutdown()
