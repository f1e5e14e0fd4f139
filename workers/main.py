"""Worker entry point: ``python -m workers.main``.

Registers every workflow and the bound activity methods on one task queue.
Synchronous (database) activities run on a thread pool; async activities
(platform calls, AI) on the event loop.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import logging
import signal
from dataclasses import dataclass
from datetime import timedelta

import openai
from sqlalchemy import Engine
from temporalio.client import (
    Client,
    Schedule,
    ScheduleActionStartWorkflow,
    ScheduleAlreadyRunningError,
    ScheduleIntervalSpec,
    ScheduleOverlapPolicy,
    SchedulePolicy,
    ScheduleSpec,
)
from temporalio.worker import PollerBehaviorSimpleMaximum, UnsandboxedWorkflowRunner, Worker, WorkflowRunner
from temporalio.worker.workflow_sandbox import SandboxRestrictions

from activities.ai import AiActivities
from activities.broadcasts import BroadcastActivities
from activities.channels import ChannelActivities
from activities.crm import CrmActivities, ProfileActivities
from activities.messaging import MessagingActivities
from activities.privacy import PrivacyActivities
from core import aio
from core.codec import KeyStore, data_converter
from core.contracts import (
    REFRESH_TOKENS_WORKFLOW,
    RETENTION_SWEEP_WORKFLOW,
    RefreshTokensInput,
    RetentionSweepInput,
)
from core.crypto import TokenVault
from core.db import DatabaseNotMigrated, engine_for
from core.http import AiohttpClient
from core.observability import configure_logging, freeze_startup_heap, serve_metrics, start_worker_metrics
from core.platforms import GraphClient, TelegramClient
from core.settings import Settings, get_settings
from core.temporal import connect
from workers.sandbox import LeanSandboxedWorkflowRunner
from workflows.automation_run import AutomationRunWorkflow
from workflows.broadcast import BroadcastWorkflow
from workflows.channel import ConnectChannelWorkflow, DisconnectChannelWorkflow, RefreshTokensWorkflow
from workflows.conversation import ConversationWorkflow
from workflows.privacy import (
    EraseChannelsWorkflow,
    EraseContactWorkflow,
    EraseWorkspaceWorkflow,
    RetentionSweepWorkflow,
)

WORKFLOWS = [
    ConversationWorkflow,
    AutomationRunWorkflow,
    ConnectChannelWorkflow,
    DisconnectChannelWorkflow,
    EraseContactWorkflow,
    EraseChannelsWorkflow,
    EraseWorkspaceWorkflow,
    RetentionSweepWorkflow,
    BroadcastWorkflow,
    RefreshTokensWorkflow,
]

RETENTION_SCHEDULE_ID = "retention-sweep"
TOKEN_REFRESH_SCHEDULE_ID = "token-refresh"

log = logging.getLogger("vectory.worker")


@dataclass
class WorkerDeps:
    engine: Engine
    vault: TokenVault
    keys: KeyStore
    http: AiohttpClient
    ai: openai.AsyncOpenAI


def build_deps(settings: Settings) -> WorkerDeps:
    engine = engine_for(settings.database_url)
    vault = TokenVault(settings.keyring())
    return worker_deps(settings, engine, vault, KeyStore(engine, vault))


def worker_deps(settings: Settings, engine: Engine, vault: TokenVault, keys: KeyStore) -> WorkerDeps:
    """A worker's dependencies around an existing database engine and keys
    (the API's own worker shares the API's: api/ingress.py)."""
    return WorkerDeps(
        engine=engine,
        vault=vault,
        keys=keys,
        # Keep-alive for as many connections as sends can be in flight (a
        # pool of 20 opened and closed a TCP, in production TLS, connection
        # per request beyond 20 concurrent calls).
        http=AiohttpClient(settings.http_timeout_seconds, max_connections=100),
        # base_url / api_key come from OPENAI_BASE_URL / OPENAI_API_KEY.
        ai=openai.AsyncOpenAI(max_retries=0, timeout=settings.http_timeout_seconds * 3),
    )


def activities_for(settings: Settings, deps: WorkerDeps, client: Client) -> list:
    graph = GraphClient(deps.http, settings.graph_api_url, settings.graph_api_version)
    instagram = GraphClient(deps.http, settings.instagram_api_url, settings.graph_api_version)
    telegram = TelegramClient(deps.http, settings.telegram_api_url)
    crm = CrmActivities(deps.engine)
    profiles = ProfileActivities(deps.engine, deps.vault, graph, instagram)
    messaging = MessagingActivities(deps.engine, deps.vault, graph, instagram, telegram, settings)
    ai = AiActivities(deps.engine, deps.ai, settings.ai_model, settings.ai_history_messages)
    channels = ChannelActivities(
        deps.engine, deps.vault, graph, instagram, telegram, settings.public_url, temporal=client
    )
    privacy = PrivacyActivities(deps.engine, deps.keys, temporal=client)
    broadcasts = BroadcastActivities(deps.engine)
    return [
        broadcasts.load_broadcast_page,
        broadcasts.record_broadcast_progress,
        privacy.set_erasure_status,
        privacy.list_erasure_channels,
        privacy.stop_subject_workflows,
        privacy.purge_subject,
        privacy.destroy_workspace_keys,
        privacy.retention_sweep,
        privacy.expire_histories,
        messaging.record_inbound,
        crm.load_contact,
        crm.load_match_context,
        crm.update_contact,
        crm.record_run,
        profiles.fetch_profile,
        messaging.send_message,
        messaging.send_broadcast_batch,
        messaging.acknowledge_callback,
        messaging.reply_to_comment,
        ai.generate_reply,
        channels.verify_channel,
        channels.subscribe_webhooks,
        channels.set_channel_status,
        channels.revoke_token,
        channels.purge_data,
        channels.stop_channel_workflows,
        channels.refresh_expiring_tokens,
    ]


def workflow_runner(mode: str = "passthrough") -> WorkflowRunner:
    """The workflow sandbox, shared by the worker, the replayer and the CLI.

    ``strict`` re-imports the workflow modules for each new workflow instance,
    so their ``datetime``, ``time``, ``random`` are the sandbox's restricted
    proxies: a clock, random or I/O call in workflow code fails the task. The
    test suite, the replay test and ``vectory runs replay`` use it.
    ``passthrough`` (the worker's default) imports every module once and
    shares it across instances (~0.1 ms instead of ~5 ms per new workflow):
    workflow modules then hold the real modules, so of the runtime checks
    only restricted builtins (``open()``) remain; determinism is guarded by
    the strict suite, ``tests/test_determinism.py`` and the replay test.
    ``off`` runs workflows without the sandbox: a measured knob, not a
    recommendation. Both sandboxed modes enter the sandbox through
    ``workers.sandbox.LeanSandboxedWorkflowRunner`` (no per-payload toll)."""
    if mode == "off":
        return UnsandboxedWorkflowRunner()
    restrictions = SandboxRestrictions.default
    if mode == "strict":
        restrictions = restrictions.with_passthrough_modules("core", "workflows.common")
    else:
        restrictions = restrictions.with_passthrough_all_modules()
    return LeanSandboxedWorkflowRunner(restrictions=restrictions)


async def ensure_schedules(client: Client, settings: Settings) -> None:
    """Create the daily schedules once (idempotent): retention sweep and
    long-lived token refresh."""
    for schedule_id, workflow_name, arg in (
        (RETENTION_SCHEDULE_ID, RETENTION_SWEEP_WORKFLOW, RetentionSweepInput()),
        (TOKEN_REFRESH_SCHEDULE_ID, REFRESH_TOKENS_WORKFLOW, RefreshTokensInput()),
    ):
        schedule = Schedule(
            action=ScheduleActionStartWorkflow(
                workflow_name, arg, id=f"{schedule_id}-run", task_queue=settings.task_queue
            ),
            spec=ScheduleSpec(intervals=[ScheduleIntervalSpec(every=timedelta(days=1))]),
            policy=SchedulePolicy(overlap=ScheduleOverlapPolicy.SKIP),
        )
        try:
            await client.create_schedule(schedule_id, schedule)
            log.info("created the daily schedule %r", schedule_id)
        except ScheduleAlreadyRunningError:
            pass


def build_worker(client: Client, settings: Settings, deps: WorkerDeps, *, task_queue: str | None = None, **kwargs) -> Worker:
    return Worker(
        client,
        task_queue=task_queue or settings.task_queue,
        workflows=WORKFLOWS,
        activities=activities_for(settings, deps, client),
        activity_executor=concurrent.futures.ThreadPoolExecutor(max_workers=settings.worker_max_concurrent_activities),
        **{
            "workflow_runner": workflow_runner(settings.worker_sandbox),
            "max_cached_workflows": settings.worker_max_cached_workflows,
            "workflow_task_poller_behavior": PollerBehaviorSimpleMaximum(settings.worker_workflow_pollers),
            "activity_task_poller_behavior": PollerBehaviorSimpleMaximum(settings.worker_activity_pollers),
            "max_concurrent_activities": settings.worker_max_concurrent_activities,
            **kwargs,
        },
    )


async def amain() -> None:
    settings = get_settings()
    configure_logging("worker", settings.log_level)
    if settings.worker_metrics_port:
        serve_metrics(settings.worker_metrics_port, settings.metrics_host)
    runtime = (
        start_worker_metrics(settings.sdk_metrics_port, settings.metrics_host) if settings.sdk_metrics_port else None
    )
    deps = build_deps(settings)
    client = await connect(settings, data_converter(deps.keys), runtime=runtime)
    worker = build_worker(client, settings, deps)
    await ensure_schedules(client, settings)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    log.info("worker polling task queue %r at %s", settings.task_queue, settings.temporal_address)
    freeze_startup_heap()
    async with worker:
        await stop.wait()
        log.info("shutting down: finishing in-flight tasks")
    await deps.http.aclose()


def main() -> None:
    try:
        aio.run(amain())
    except DatabaseNotMigrated as exc:
        log.error("refusing to start: %s", exc)
        raise SystemExit(1) from None


if __name__ == "__main__":
    main()
