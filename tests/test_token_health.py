"""Token health: long-lived Instagram tokens are refreshed before expiry;
a rejected token pauses the channel with a visible reason."""

from __future__ import annotations

import asyncio
import uuid
from datetime import UTC, datetime, timedelta

import httpx
from sqlmodel import Session

from core.contracts import REFRESH_TOKENS_WORKFLOW, RefreshTokensInput, RefreshTokensResult
from core.db import Channel

from helpers import (
    connect_instagram,
    create_automation,
    create_tenant,
    new_sender,
    sandbox_messages,
    send_dm,
    wait_for_messages,
)


def expire_in(stack, channel_id: str, days: float) -> str:
    with Session(stack.deps.engine) as db:
        channel = db.get(Channel, channel_id)
        channel.token_expires_at = datetime.now(UTC) + timedelta(days=days)
        db.add(channel)
        db.commit()
        return channel.token_ciphertext


async def refresh(stack) -> RefreshTokensResult:
    return await stack.client.execute_workflow(
        REFRESH_TOKENS_WORKFLOW, RefreshTokensInput(within_days=10), id=f"refresh-test-{uuid.uuid4().hex[:8]}",
        task_queue=stack.settings.task_queue, result_type=RefreshTokensResult,
    )


async def test_expiring_instagram_token_is_refreshed_and_keeps_sending(stack):
    tenant = await create_tenant(stack)
    channel, account_id, token = await connect_instagram(stack, tenant)
    with Session(stack.deps.engine) as db:
        connected = db.get(Channel, channel["id"])
        assert connected.token_expires_at is not None  # 60 days from the connection
    before = expire_in(stack, channel["id"], 5)
    result = await refresh(stack)
    assert channel["id"] not in result.failed and result.refreshed >= 1
    with Session(stack.deps.engine) as db:
        row = db.get(Channel, channel["id"])
        expires = row.token_expires_at if row.token_expires_at.tzinfo else row.token_expires_at.replace(tzinfo=UTC)
        assert row.token_ciphertext != before
        assert expires - datetime.now(UTC) > timedelta(days=59)
    calls = (await stack.sandbox.get("/_sandbox/calls", params={"path_contains": "refresh_access_token"})).json()
    assert calls["calls"] and all(token not in str(c) for c in calls["calls"])
    # The refreshed token is the one used from now on.
    await create_automation(stack, tenant, channel["id"], {"type": "dm_keyword", "keywords": ["fresh"]},
                            [{"id": "a", "type": "send_message", "text": "still here"}])
    person = new_sender()
    await send_dm(stack, account_id, person, "fresh?")
    assert len(await wait_for_messages(stack, person, 1)) == 1


async def test_rejected_token_marks_the_channel_and_pauses_its_automations(stack):
    tenant = await create_tenant(stack)
    channel, account_id, token = await connect_instagram(stack, tenant)
    await create_automation(stack, tenant, channel["id"], {"type": "dm_keyword", "keywords": ["paused"]},
                            [{"id": "a", "type": "send_message", "text": "should not send"}])
    expire_in(stack, channel["id"], 2)
    # The person revoked our access on Instagram's side.
    async with httpx.AsyncClient(base_url=stack.sandbox_url) as sandbox:
        r = await sandbox.delete("/instagram/v21.0/me/permissions", headers={"Authorization": f"Bearer {token}"})
        assert r.status_code == 200
    result = await refresh(stack)
    assert channel["id"] in result.failed
    ch = (await stack.api.get(f"/v1/channels/{channel['id']}", headers=tenant.headers)).json()
    assert ch["status"] == "needs_reconnect" and "190" in ch["status_detail"]
    audit = (await stack.api.get("/v1/audit", params={"action": "channel.needs_reconnect"},
                                 headers=tenant.headers)).json()
    assert audit["count"] == 1 and audit["data"][0]["target"] == channel["id"]
    person = new_sender()
    await send_dm(stack, account_id, person, "paused?")
    await asyncio.sleep(1.0)
    assert await sandbox_messages(stack, person) == []
