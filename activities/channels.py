"""Channel lifecycle activities: verify, subscribe, revoke, purge, stop."""

from __future__ import annotations

import asyncio
import secrets
from datetime import datetime, timedelta

from sqlalchemy import Engine, text
from sqlmodel import Session, select
from temporalio import activity
from temporalio.client import Client
from temporalio.exceptions import ApplicationError
from temporalio.service import RPCError, RPCStatusCode

from activities.common import (
    load_credentials,
    set_channel_status,
    to_application_error,
)
from core.audit import audit, audit_now
from core.contracts import (
    ChannelRef,
    ChannelStatusInput,
    ChannelVerified,
    ConnectChannelInput,
    ErrorType,
    PurgeDataInput,
    RefreshTokensInput,
    RefreshTokensResult,
    RevokeResult,
    StopWorkflowsResult,
    conversation_workflow_id,
)
from core.crypto import TokenVault, token_context, webhook_secret_context
from core.db import Channel, Contact, Run, utcnow
from core.platforms import GraphClient, PlatformError, TelegramClient, UnsafeValue

# The webhook fields each platform needs for the features we run; nothing more
# (minimum data: DESIGN.md privacy promises).
INSTAGRAM_FIELDS = [
    "messages", "messaging_postbacks", "messaging_referral", "messaging_seen", "message_reactions", "comments",
]
MESSENGER_FIELDS = [
    "messages", "messaging_postbacks", "messaging_referrals", "message_reads", "message_reactions", "feed",
]
TELEGRAM_UPDATES = ["message", "callback_query"]
INSTAGRAM_TOKEN_LIFETIME = timedelta(days=60)


class ChannelActivities:
    def __init__(
        self,
        engine: Engine,
        vault: TokenVault,
        graph: GraphClient,
        instagram: GraphClient,
        telegram: TelegramClient,
        public_url: str,
        temporal: Client | None = None,
    ):
        self.engine = engine
        self.vault = vault
        self.graph = graph
        self.instagram = instagram
        self.telegram = telegram
        self.public_url = public_url.rstrip("/")
        self.temporal = temporal

    def _meta(self, platform: str) -> GraphClient:
        return self.instagram if platform == "instagram" else self.graph

    @activity.defn(name="verify_channel")
    async def verify_channel(self, input: ConnectChannelInput) -> ChannelVerified:
        """Check the token against the platform and record the account id."""
        creds = await asyncio.to_thread(
            load_credentials, self.engine, self.vault, input.channel_id, allow_statuses={"connecting"}
        )
        try:
            if creds.platform == "telegram":
                me = await self.telegram.get_me(creds.token)
                external_id, name = str(me["id"]), me.get("username") or me.get("first_name", "")
            else:
                me = await self._meta(creds.platform).get_me(creds.token)
                external_id, name = str(me["id"]), me.get("username") or me.get("name", "")
        except PlatformError as err:
            raise to_application_error(err) from None
        await asyncio.to_thread(self._claim_account, input, external_id, name)
        await asyncio.to_thread(audit_now, self.engine, input.workspace_id, "worker", "token.use", input.channel_id, "verify")
        return ChannelVerified(external_id=external_id, name=name)

    def _claim_account(self, input: ConnectChannelInput, external_id: str, name: str) -> None:
        with Session(self.engine) as db:
            clash = db.exec(
                select(Channel).where(
                    Channel.platform == input.platform,
                    Channel.external_id == external_id,
                    Channel.id != input.channel_id,
                    Channel.status.in_(["active", "connecting", "needs_reconnect"]),  # type: ignore[attr-defined]
                )
            ).first()
            if clash is not None:
                raise ApplicationError(
                    "this account is already connected to a channel", type=ErrorType.ACCOUNT_ALREADY_CONNECTED, non_retryable=True
                )
            channel = db.get(Channel, input.channel_id)
            if channel is None:
                raise ApplicationError("channel was deleted", type=ErrorType.CHANNEL_UNAVAILABLE, non_retryable=True)
            channel.external_id = external_id
            if not channel.name:
                channel.name = name
            if channel.platform == "instagram":
                # Instagram Login long-lived tokens live 60 days; the daily
                # RefreshTokens schedule renews them well before.
                channel.token_expires_at = utcnow() + INSTAGRAM_TOKEN_LIFETIME
            channel.updated_at = utcnow()
            db.add(channel)
            db.commit()

    @activity.defn(name="subscribe_webhooks")
    async def subscribe_webhooks(self, input: ConnectChannelInput) -> None:
        """Meta: subscribe the app to the account's webhook fields. Telegram:
        setWebhook with a fresh random secret token (stored encrypted)."""
        creds = await asyncio.to_thread(
            load_credentials, self.engine, self.vault, input.channel_id, allow_statuses={"connecting"}
        )
        try:
            if creds.platform == "telegram":
                secret = secrets.token_urlsafe(32)
                await asyncio.to_thread(self._store_webhook_secret, input.channel_id, secret)
                await self.telegram.set_webhook(
                    creds.token,
                    f"{self.public_url}/webhooks/telegram/{input.channel_id}",
                    secret,
                    TELEGRAM_UPDATES,
                )
            else:
                fields = INSTAGRAM_FIELDS if creds.platform == "instagram" else MESSENGER_FIELDS
                await self._meta(creds.platform).subscribe_app(creds.external_id, creds.token, fields)
        except PlatformError as err:
            raise to_application_error(err) from None

    def _store_webhook_secret(self, channel_id: str, secret: str) -> None:
        with Session(self.engine) as db:
            channel = db.get(Channel, channel_id)
            if channel is None:
                raise ApplicationError("channel was deleted", type=ErrorType.CHANNEL_UNAVAILABLE, non_retryable=True)
            channel.webhook_secret_ciphertext = self.vault.encrypt(secret, webhook_secret_context(channel_id))
            db.add(channel)
            db.commit()

    @activity.defn(name="set_channel_status")
    def set_channel_status(self, input: ChannelStatusInput) -> None:
        set_channel_status(self.engine, input.channel_id, input.status, input.detail)

    @activity.defn(name="revoke_token")
    async def revoke_token(self, input: ChannelRef) -> RevokeResult:
        """Revoke our access at the platform: Meta ``DELETE /{user}/permissions``,
        Telegram ``deleteWebhook``. A token the platform already rejects counts
        as revoked; a stored value that cannot be put into the call's URL
        (``UnsafeValue``) does not: nothing was sent, and the result says so
        (the token is deleted all the same, ``purge_data``)."""
        try:
            creds = await asyncio.to_thread(
                load_credentials,
                self.engine,
                self.vault,
                input.channel_id,
                allow_statuses={"connecting", "active", "needs_reconnect", "failed", "disconnecting"},
            )
        except ApplicationError as err:
            return RevokeResult(revoked=False, detail=str(err))
        try:
            if creds.platform == "telegram":
                await self.telegram.delete_webhook(creds.token)
            else:
                await self._meta(creds.platform).revoke(creds.platform_user_id, creds.token)
        except UnsafeValue as err:
            return RevokeResult(revoked=False, detail=err.message)
        except PlatformError as err:
            if err.kind == "token_invalid":
                return RevokeResult(revoked=True, detail="the platform had already invalidated the token")
            raise to_application_error(err) from None
        await asyncio.to_thread(
            audit_now, self.engine, creds.workspace_id, "worker", "token.revoke", input.channel_id, creds.platform
        )
        return RevokeResult(revoked=True)

    @activity.defn(name="purge_data")
    def purge_data(self, input: PurgeDataInput) -> None:
        """Delete data for a scope. ``channel_tokens``: the channel's token and
        webhook secret are deleted in the same transaction that marks it
        disconnected (SQLite runs with secure_delete, and the WAL is
        checkpointed so no old page keeps the ciphertext)."""
        if input.scope != "channel_tokens":
            raise ApplicationError(f"unknown purge scope {input.scope!r}", type="BadPurgeScope", non_retryable=True)
        with Session(self.engine) as db:
            channel = db.get(Channel, input.channel_id)
            if channel is None:
                return
            channel.token_ciphertext = None
            channel.webhook_secret_ciphertext = None
            channel.status = "disconnected"
            channel.updated_at = utcnow()
            db.add(channel)
            db.commit()
            if self.engine.dialect.name == "sqlite":
                db.exec(text("PRAGMA wal_checkpoint(TRUNCATE)"))  # type: ignore[call-overload]

    @activity.defn(name="refresh_expiring_tokens")
    async def refresh_expiring_tokens(self, input: RefreshTokensInput) -> RefreshTokensResult:
        """Renew Instagram long-lived tokens that expire within the horizon.
        A token the platform rejects marks its channel ``needs_reconnect``."""
        now = datetime.fromisoformat(input.now_iso) if input.now_iso else utcnow()
        ids = await asyncio.to_thread(self._expiring, now + timedelta(days=input.within_days))
        result = RefreshTokensResult()
        for channel_id in ids:
            activity.heartbeat(result.refreshed)
            try:
                creds = await asyncio.to_thread(
                    load_credentials, self.engine, self.vault, channel_id, allow_statuses={"active"}
                )
                token, expires_in = await self.instagram.refresh_long_lived_token(creds.token)
            except PlatformError as err:
                to_application_error(err, engine=self.engine, channel_id=channel_id)  # marks needs_reconnect on 190
                result.failed.append(channel_id)
                continue
            except ApplicationError:
                result.failed.append(channel_id)
                continue
            await asyncio.to_thread(self._store_refreshed, creds.workspace_id, channel_id, token, expires_in)
            result.refreshed += 1
        return result

    def _expiring(self, horizon: datetime) -> list[str]:
        with Session(self.engine) as db:
            rows = db.exec(
                select(Channel.id).where(
                    Channel.platform == "instagram",
                    Channel.status == "active",
                    Channel.token_expires_at.is_not(None),  # type: ignore[union-attr]
                    Channel.token_expires_at < horizon,  # type: ignore[operator]
                )
            ).all()
            return list(rows)

    def _store_refreshed(self, workspace_id: str, channel_id: str, token: str, expires_in: int) -> None:
        with Session(self.engine) as db:
            channel = db.get(Channel, channel_id)
            if channel is None:
                return
            channel.token_ciphertext = self.vault.encrypt(token, token_context(channel_id))
            channel.token_expires_at = utcnow() + (
                timedelta(seconds=expires_in) if expires_in else INSTAGRAM_TOKEN_LIFETIME
            )
            channel.updated_at = utcnow()
            db.add(channel)
            audit(db, workspace_id, "worker", "token.refresh", channel_id)
            db.commit()

    @activity.defn(name="stop_channel_workflows")
    async def stop_channel_workflows(self, input: ChannelRef) -> StopWorkflowsResult:
        """Terminate the channel's conversations and running automation runs."""
        if self.temporal is None:
            raise ApplicationError("no Temporal client configured", type="Misconfigured", non_retryable=True)
        ids = await asyncio.to_thread(self._channel_workflow_ids, input.channel_id)
        stopped = 0
        for workflow_id in ids:
            activity.heartbeat(stopped)
            try:
                await self.temporal.get_workflow_handle(workflow_id).terminate(reason="channel disconnected")
                stopped += 1
            except RPCError as err:
                if err.status != RPCStatusCode.NOT_FOUND:
                    raise
        await asyncio.to_thread(self._mark_runs_cancelled, input.channel_id)
        return StopWorkflowsResult(stopped=stopped)

    def _channel_workflow_ids(self, channel_id: str) -> list[str]:
        with Session(self.engine) as db:
            contacts = db.exec(select(Contact).where(Contact.channel_id == channel_id)).all()
            runs = db.exec(select(Run).where(Run.channel_id == channel_id, Run.status.in_(["running", "waiting"]))).all()  # type: ignore[attr-defined]
            return [r.id for r in runs] + [
                conversation_workflow_id(c.workspace_id, c.channel_id, c.id) for c in contacts
            ]

    def _mark_runs_cancelled(self, channel_id: str) -> None:
        with Session(self.engine) as db:
            runs = db.exec(select(Run).where(Run.channel_id == channel_id, Run.status.in_(["running", "waiting"]))).all()  # type: ignore[attr-defined]
            for run in runs:
                run.status = "cancelled"
                run.ended_at = utcnow()
                db.add(run)
            db.commit()
