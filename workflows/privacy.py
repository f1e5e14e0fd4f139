"""Erasure and retention workflows.

Erasure order: revoke platform access and delete tokens (channels and
workspaces), stop the subject's workflows, delete its rows, and for a
workspace destroy its payload keys. Every step is an idempotent activity,
so a crash anywhere resumes the erasure, and the job's status tells the
requester where it stands.
"""

from __future__ import annotations

from datetime import timedelta

from temporalio import workflow
from temporalio.common import RetryPolicy
from temporalio.exceptions import ActivityError

with workflow.unsafe.imports_passed_through():
    from core.contracts import (
        ERASE_CHANNELS_WORKFLOW,
        ERASE_CONTACT_WORKFLOW,
        ERASE_WORKSPACE_WORKFLOW,
        RETENTION_SWEEP_WORKFLOW,
        ChannelRef,
        EraseInput,
        EraseStepInput,
        JobStatusInput,
        PurgeDataInput,
        RetentionInput,
        RetentionResult,
        RetentionSweepInput,
        RevokeResult,
        StopWorkflowsResult,
    )
    from workflows.common import DB_TIMEOUT, PLATFORM_RETRY, PLATFORM_TIMEOUT, root_type

# Erasure must finish: database steps retry until they succeed.
ERASE_RETRY = RetryPolicy(initial_interval=timedelta(seconds=1), maximum_interval=timedelta(minutes=1))


async def _erase(input: EraseInput) -> str:
    step = EraseStepInput(
        job_id=input.job_id,
        workspace_id=input.workspace_id,
        scope=input.scope,
        contact_id=input.contact_id,
        channel_ids=list(input.channel_ids),
    )
    await _status(input.job_id, "running")
    notes: list[str] = []
    if input.scope in ("channels", "workspace"):
        channel_ids: list[str] = await workflow.execute_activity(
            "list_erasure_channels", step, result_type=list[str], start_to_close_timeout=DB_TIMEOUT,
            retry_policy=ERASE_RETRY,
        )
        step.channel_ids = channel_ids
        for channel_id in channel_ids:
            try:
                revoke: RevokeResult = await workflow.execute_activity(
                    "revoke_token", ChannelRef(channel_id=channel_id), result_type=RevokeResult,
                    start_to_close_timeout=PLATFORM_TIMEOUT, retry_policy=PLATFORM_RETRY,
                )
                if not revoke.revoked:
                    notes.append(f"{channel_id}: {revoke.detail}")
            except ActivityError as err:
                # The error's type only: the job outlives the erasure, and a
                # platform's message can name the user ("Object with ID ...").
                notes.append(f"{channel_id}: revoke failed ({root_type(err) or 'error'}); token deleted regardless")
            await workflow.execute_activity(
                "purge_data", PurgeDataInput(scope="channel_tokens", channel_id=channel_id),
                start_to_close_timeout=DB_TIMEOUT, retry_policy=ERASE_RETRY,
            )
    stopped: StopWorkflowsResult = await workflow.execute_activity(
        "stop_subject_workflows", step, result_type=StopWorkflowsResult,
        start_to_close_timeout=PLATFORM_TIMEOUT * 20, heartbeat_timeout=PLATFORM_TIMEOUT, retry_policy=ERASE_RETRY,
    )
    counts: dict[str, int] = await workflow.execute_activity(
        "purge_subject", step, result_type=dict[str, int], start_to_close_timeout=DB_TIMEOUT * 8,
        retry_policy=ERASE_RETRY,
    )
    if input.scope == "workspace":
        await workflow.execute_activity(
            "destroy_workspace_keys", step, result_type=int, start_to_close_timeout=DB_TIMEOUT,
            retry_policy=ERASE_RETRY,
        )
    summary = ", ".join(f"{k}={v}" for k, v in sorted(counts.items()) if v)
    detail = f"stopped {stopped.stopped} workflows; deleted {summary or 'nothing'}"
    if stopped.histories_deleted:
        detail += f"; {stopped.histories_deleted} workflow histories deleted from Temporal"
    if notes:
        detail += "; " + "; ".join(notes)
    await _status(input.job_id, "completed", detail)
    return detail


async def _status(job_id: str, status: str, detail: str = "") -> None:
    await workflow.execute_activity(
        "set_erasure_status", JobStatusInput(job_id=job_id, status=status, detail=detail),
        start_to_close_timeout=DB_TIMEOUT, retry_policy=ERASE_RETRY,
    )


@workflow.defn(name=ERASE_CONTACT_WORKFLOW)
class EraseContactWorkflow:
    @workflow.run
    async def run(self, input: EraseInput) -> str:
        return await _erase(input)


@workflow.defn(name=ERASE_CHANNELS_WORKFLOW)
class EraseChannelsWorkflow:
    @workflow.run
    async def run(self, input: EraseInput) -> str:
        return await _erase(input)


@workflow.defn(name=ERASE_WORKSPACE_WORKFLOW)
class EraseWorkspaceWorkflow:
    @workflow.run
    async def run(self, input: EraseInput) -> str:
        return await _erase(input)


# Workflow histories are swept too (patch): conversations older than the
# period continue as new and closed executions older than it are deleted.
HISTORIES_PATCH = "retention-histories"
# Rounds of ``expire_histories``: the first asks conversations to continue as
# new, the next ones (ROUND_PAUSE later) delete the runs they closed.
EXPIRE_ROUNDS = 4
ROUND_PAUSE = timedelta(seconds=5)


@workflow.defn(name=RETENTION_SWEEP_WORKFLOW)
class RetentionSweepWorkflow:
    """Started daily by the ``retention-sweep`` schedule: the database's
    messaging log, then the Temporal histories that hold messages older than
    each workspace's period."""

    @workflow.run
    async def run(self, input: RetentionSweepInput) -> RetentionResult:
        now = RetentionInput(now_iso=input.now_iso or workflow.now().isoformat())
        result: RetentionResult = await workflow.execute_activity(
            "retention_sweep",
            now,
            result_type=RetentionResult,
            start_to_close_timeout=timedelta(minutes=30),
            retry_policy=RetryPolicy(maximum_attempts=5),
        )
        if not workflow.patched(HISTORIES_PATCH):
            return result
        for round_ in range(EXPIRE_ROUNDS):
            if round_:
                await workflow.sleep(ROUND_PAUSE)
            histories: RetentionResult = await workflow.execute_activity(
                "expire_histories",
                now,
                result_type=RetentionResult,
                start_to_close_timeout=timedelta(hours=2),
                heartbeat_timeout=timedelta(minutes=2),
                retry_policy=RetryPolicy(maximum_attempts=5),
            )
            result.conversations_rotated += histories.conversations_rotated
            result.histories_deleted += histories.histories_deleted
            result.running_past_period = histories.running_past_period
            if not histories.conversations_rotated:
                break
        return result
