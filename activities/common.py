"""Helpers shared by activities: token loading and platform error mapping."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import timedelta
from typing import Any

from sqlalchemy import Engine, select
from sqlmodel import Session
from temporalio.exceptions import ApplicationError

from core.audit import audit
from core.contracts import ErrorType
from core.crypto import TokenVault, token_context
from core.db import Channel, utcnow
from core.platforms import PlatformError

CHANNELS = Channel.__table__


@dataclass
class ChannelCredentials:
    channel_id: str
    workspace_id: str
    platform: str
    external_id: str
    platform_user_id: str
    status: str
    token: str


def load_credentials(engine: Engine, vault: TokenVault, channel_id: str, *, allow_statuses: set[str]) -> ChannelCredentials:
    """Load a channel and decrypt its token inside the activity.

    Raises a non-retryable ``ChannelUnavailable`` when the channel is gone,
    has no token, or is in a status the caller does not allow.
    """
    with engine.connect() as conn:
        channel = conn.execute(select(CHANNELS).where(CHANNELS.c.id == channel_id)).first()
    return credentials_of(channel, vault, channel_id, allow_statuses=allow_statuses)


def credentials_in(db: Session, vault: TokenVault, channel_id: str, *, allow_statuses: set[str]) -> ChannelCredentials:
    """``load_credentials`` within the caller's session."""
    return credentials_of(db.get(Channel, channel_id), vault, channel_id, allow_statuses=allow_statuses)


def credentials_of(channel: Any, vault: TokenVault, channel_id: str, *, allow_statuses: set[str]) -> ChannelCredentials:
    """The credentials of a channel row (an ORM object or a Core row; None:
    the channel does not exist)."""
    if channel is None:
        raise ApplicationError(f"channel {channel_id} does not exist", type=ErrorType.CHANNEL_UNAVAILABLE, non_retryable=True)
    if channel.status not in allow_statuses:
        raise ApplicationError(
            f"channel {channel_id} is {channel.status}", type=ErrorType.CHANNEL_UNAVAILABLE, non_retryable=True
        )
    if not channel.token_ciphertext:
        raise ApplicationError(f"channel {channel_id} has no token", type=ErrorType.CHANNEL_UNAVAILABLE, non_retryable=True)
    token = vault.decrypt(channel.token_ciphertext, token_context(channel_id))
    return ChannelCredentials(
        channel_id=channel.id,
        workspace_id=channel.workspace_id,
        platform=channel.platform,
        external_id=channel.external_id,
        platform_user_id=channel.platform_user_id,
        status=channel.status,
        token=token,
    )


def set_channel_status(engine: Engine, channel_id: str, status: str, detail: str = "") -> None:
    with Session(engine) as db:
        channel = db.get(Channel, channel_id)
        if channel is None:
            return
        changed = channel.status != status
        channel.status = status
        channel.status_detail = detail
        channel.updated_at = utcnow()
        db.add(channel)
        if changed and status == "needs_reconnect":
            # The business sees why its automations paused (GET /v1/audit, channel status).
            audit(db, channel.workspace_id, "worker", "channel.needs_reconnect", channel.id, detail)
        db.commit()


def to_application_error(err: PlatformError, *, engine: Engine | None = None, channel_id: str = "") -> ApplicationError:
    """Classify a platform error for Temporal's retry machinery.

    throttled -> retryable after the advised delay; unavailable -> retryable
    with the policy's backoff; token_invalid -> non-retryable and the channel
    is marked ``needs_reconnect``; outside_window / rejected -> non-retryable
    (retrying a rejected call can duplicate visible side effects).
    """
    message = str(err)
    if err.kind == "throttled":
        delay = timedelta(seconds=err.retry_after) if err.retry_after else None
        return ApplicationError(message, type=ErrorType.PLATFORM_THROTTLED, next_retry_delay=delay)
    if err.kind == "unavailable":
        return ApplicationError(message, type=ErrorType.PLATFORM_UNAVAILABLE)
    if err.kind == "token_invalid":
        if engine is not None and channel_id:
            set_channel_status(engine, channel_id, "needs_reconnect", "the platform rejected the access token (190)")
        return ApplicationError(message, type=ErrorType.TOKEN_INVALID, non_retryable=True)
    if err.kind == "outside_window":
        return ApplicationError(message, type=ErrorType.OUTSIDE_WINDOW, non_retryable=True)
    return ApplicationError(message, type=ErrorType.PLATFORM_REJECTED, non_retryable=True)
