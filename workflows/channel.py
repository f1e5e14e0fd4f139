"""Channel lifecycle: ConnectChannel and DisconnectChannel."""

from __future__ import annotations

from temporalio import workflow
from temporalio.exceptions import ActivityError

with workflow.unsafe.imports_passed_through():
    from core.contracts import (
        CONNECT_CHANNEL_WORKFLOW,
        DISCONNECT_CHANNEL_WORKFLOW,
        REFRESH_TOKENS_WORKFLOW,
        ChannelRef,
        ChannelStatusInput,
        ChannelVerified,
        ConnectChannelInput,
        ConnectResult,
        DisconnectResult,
        PurgeDataInput,
        RefreshTokensInput,
        RefreshTokensResult,
        RevokeResult,
        StopWorkflowsResult,
    )
    from workflows.common import DB_RETRY, DB_TIMEOUT, PLATFORM_RETRY, PLATFORM_TIMEOUT, root_message


@workflow.defn(name=CONNECT_CHANNEL_WORKFLOW)
class ConnectChannelWorkflow:
    """Verify the token with the platform, subscribe webhooks, activate.

    A token the platform rejects fails the connection and its token is
    deleted at once: we keep no credential we cannot use.
    """

    @workflow.run
    async def run(self, input: ConnectChannelInput) -> ConnectResult:
        try:
            verified: ChannelVerified = await workflow.execute_activity(
                "verify_channel",
                input,
                result_type=ChannelVerified,
                start_to_close_timeout=PLATFORM_TIMEOUT,
                retry_policy=PLATFORM_RETRY,
            )
            await workflow.execute_activity(
                "subscribe_webhooks", input, start_to_close_timeout=PLATFORM_TIMEOUT, retry_policy=PLATFORM_RETRY
            )
        except ActivityError as err:
            detail = root_message(err)
            await workflow.execute_activity(
                "purge_data",
                PurgeDataInput(scope="channel_tokens", channel_id=input.channel_id),
                start_to_close_timeout=DB_TIMEOUT,
                retry_policy=DB_RETRY,
            )
            await workflow.execute_activity(
                "set_channel_status",
                ChannelStatusInput(channel_id=input.channel_id, status="failed", detail=detail),
                start_to_close_timeout=DB_TIMEOUT,
                retry_policy=DB_RETRY,
            )
            return ConnectResult(status="failed", detail=detail)
        await workflow.execute_activity(
            "set_channel_status",
            ChannelStatusInput(channel_id=input.channel_id, status="active"),
            start_to_close_timeout=DB_TIMEOUT,
            retry_policy=DB_RETRY,
        )
        return ConnectResult(status="active", external_id=verified.external_id)


@workflow.defn(name=DISCONNECT_CHANNEL_WORKFLOW)
class DisconnectChannelWorkflow:
    """Revoke platform access, delete the token, stop the channel's workflows.

    The local token is deleted even when the platform revoke keeps failing;
    the failure is reported in the result (and the channel's status detail).
    """

    @workflow.run
    async def run(self, input: ChannelRef) -> DisconnectResult:
        await workflow.execute_activity(
            "set_channel_status",
            ChannelStatusInput(channel_id=input.channel_id, status="disconnecting"),
            start_to_close_timeout=DB_TIMEOUT,
            retry_policy=DB_RETRY,
        )
        try:
            revoke: RevokeResult = await workflow.execute_activity(
                "revoke_token",
                input,
                result_type=RevokeResult,
                start_to_close_timeout=PLATFORM_TIMEOUT,
                retry_policy=PLATFORM_RETRY,
            )
        except ActivityError as err:
            revoke = RevokeResult(revoked=False, detail=f"revoke failed at the platform: {root_message(err)}")
        await workflow.execute_activity(
            "purge_data",
            PurgeDataInput(scope="channel_tokens", channel_id=input.channel_id),
            start_to_close_timeout=DB_TIMEOUT,
            retry_policy=DB_RETRY,
        )
        if not revoke.revoked:
            await workflow.execute_activity(
                "set_channel_status",
                ChannelStatusInput(channel_id=input.channel_id, status="disconnected", detail=revoke.detail),
                start_to_close_timeout=DB_TIMEOUT,
                retry_policy=DB_RETRY,
            )
        stopped: StopWorkflowsResult = await workflow.execute_activity(
            "stop_channel_workflows",
            input,
            result_type=StopWorkflowsResult,
            start_to_close_timeout=PLATFORM_TIMEOUT * 10,
            heartbeat_timeout=PLATFORM_TIMEOUT,
            retry_policy=DB_RETRY,
        )
        return DisconnectResult(revoked=revoke.revoked, stopped_workflows=stopped.stopped, detail=revoke.detail)


@workflow.defn(name=REFRESH_TOKENS_WORKFLOW)
class RefreshTokensWorkflow:
    """Started daily by the ``token-refresh`` schedule: renews long-lived
    Instagram tokens ten days before they expire."""

    @workflow.run
    async def run(self, input: RefreshTokensInput) -> RefreshTokensResult:
        return await workflow.execute_activity(
            "refresh_expiring_tokens",
            RefreshTokensInput(within_days=input.within_days, now_iso=input.now_iso or workflow.now().isoformat()),
            result_type=RefreshTokensResult,
            start_to_close_timeout=PLATFORM_TIMEOUT * 20,
            heartbeat_timeout=PLATFORM_TIMEOUT * 2,
            retry_policy=DB_RETRY,
        )
