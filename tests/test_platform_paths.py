"""No stored value changes the path of a platform call (issue 16, defect 6).

A token or id of another shape than the platforms document is refused at
connect, and one already stored (written to the database past the API) is
never put into a URL: the call is not made, a disconnect still deletes the
token, and the sandbox sees no request at all.
"""

from __future__ import annotations

import asyncio

import pytest
from sqlmodel import Session

from activities.common import token_context
from core.db import Channel
from sandbox import payloads

from helpers import connect_instagram, connect_telegram, create_automation, create_tenant, wait_for

MALICIOUS_TOKENS = [
    "7000000999:x/../../graph/v21.0/me?",
    "7000000999:%2e%2e%2f%2e%2e%2fgraph%2fv21.0%2fme",
    "7000000999:AAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA/../me",
    "7000000999:AAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA#x",
    "7000000999:AAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA x",
]
MALICIOUS_IDS = ["..", "%2e%2e", "1/../../me", "1?fields=x", "1#x", " 1", "1\n"]


def _store(stack, channel_id: str, **values) -> None:
    """Write to the channel's row directly, as a bug or an old version could have."""
    with Session(stack.deps.engine) as db:
        row = db.get(Channel, channel_id)
        if "token" in values:
            row.token_ciphertext = stack.deps.vault.encrypt(values.pop("token"), token_context(channel_id))
        for name, value in values.items():
            setattr(row, name, value)
        db.add(row)
        db.commit()


async def _last_seq(stack) -> int:
    return (await stack.sandbox.get("/_sandbox/calls")).json()["last_seq"]


async def _calls_after(stack, seq: int) -> list[dict]:
    return (await stack.sandbox.get("/_sandbox/calls", params={"after_seq": seq})).json()["calls"]


async def test_connect_refuses_tokens_and_ids_that_could_change_a_path(stack):
    tenant = await create_tenant(stack)
    refused = [({"platform": "telegram", "access_token": t}, "access_token") for t in MALICIOUS_TOKENS]
    refused += [
        ({"platform": "telegram", "access_token": "7000000999:short"}, "access_token"),
        ({"platform": "instagram", "access_token": "IGAA../../me"}, "access_token"),
        ({"platform": "messenger", "access_token": "EAAB%2e%2e"}, "access_token"),
    ]
    refused += [({"platform": "instagram", "access_token": "IGAAok", "platform_user_id": i}, "platform_user_id")
                for i in MALICIOUS_IDS]
    before = await _last_seq(stack)
    for body, field in refused:
        r = await stack.api.post("/v1/channels", json=body, headers=tenant.headers)
        assert r.status_code == 422, (body, r.text)
        [error] = r.json()["detail"]
        assert error["loc"] == ["body", field] and "not a" in error["msg"], (body, error)
        if field == "access_token":
            assert body["access_token"] not in r.text
    assert (await stack.api.get("/v1/channels", headers=tenant.headers)).json()["count"] == 0
    assert await _calls_after(stack, before) == []


@pytest.mark.parametrize("token", MALICIOUS_TOKENS[:2])
async def test_a_stored_malicious_bot_token_sends_nothing_and_disconnect_still_deletes_it(stack, token):
    tenant = await create_tenant(stack)
    channel, _, _ = await connect_telegram(stack, tenant)
    hook = (await stack.sandbox.get("/_sandbox/telegram/webhooks")).json()
    secret = next(h["secret_token"] for h in hook.values() if h["url"].endswith(channel["id"]))
    await create_automation(stack, tenant, channel["id"], {"type": "dm_keyword", "keywords": ["start"]},
                            [{"id": "hi", "type": "send_message", "text": "Hello!"}])
    _store(stack, channel["id"], token=token)
    before = await _last_seq(stack)

    # A DM that would be answered: the reply is not sent anywhere, the channel asks for a reconnection.
    r = await stack.api.post(f"/webhooks/telegram/{channel['id']}",
                             json=payloads.telegram_message_update(1, 4242, "/start"),
                             headers={"X-Telegram-Bot-Api-Secret-Token": secret})
    assert r.status_code == 200 and r.json()["dispatched"] == 1

    async def needs_reconnect():
        return (await stack.api.get(f"/v1/channels/{channel['id']}", headers=tenant.headers)).json()[
            "status"] == "needs_reconnect"

    assert await wait_for(needs_reconnect)

    r = await stack.api.delete(f"/v1/channels/{channel['id']}", headers=tenant.headers)
    assert r.status_code == 200, r.text
    body = r.json()
    assert (body["status"], body["revoked"]) == ("disconnected", False)
    assert "malformed" in body["detail"] and token not in r.text
    with Session(stack.deps.engine) as db:
        assert db.get(Channel, channel["id"]).token_ciphertext is None
    await asyncio.sleep(0.3)
    assert await _calls_after(stack, before) == []


async def test_a_stored_malicious_meta_user_id_revokes_nothing_elsewhere(stack):
    """Before, a ``platform_user_id`` of ``..`` made disconnect send
    ``DELETE /permissions`` at the Graph host's root."""
    for user_id in ("..", "%2e%2e", "1/../.."):
        tenant = await create_tenant(stack)
        channel, _, _ = await connect_instagram(stack, tenant)
        _store(stack, channel["id"], platform_user_id=user_id)
        before = await _last_seq(stack)
        r = await stack.api.delete(f"/v1/channels/{channel['id']}", headers=tenant.headers)
        assert r.status_code == 200, r.text
        body = r.json()
        assert (body["status"], body["revoked"]) == ("disconnected", False)
        assert "Meta id" in body["detail"] and user_id not in body["detail"]
        with Session(stack.deps.engine) as db:
            row = db.get(Channel, channel["id"])
            assert row.token_ciphertext is None and row.status == "disconnected"
        assert await _calls_after(stack, before) == []


async def test_webhook_events_with_ids_of_another_shape_are_ignored(stack):
    tenant = await create_tenant(stack)
    channel, account_id, _ = await connect_instagram(stack, tenant)
    before = await _last_seq(stack)
    for sender in MALICIOUS_IDS:
        body = payloads.instagram_webhook({account_id: [payloads.instagram_dm(account_id, sender, "hi")]})
        raw, headers = payloads.encode_and_sign(body, stack.settings.meta_app_secret)
        r = await stack.api.post("/webhooks/meta", content=raw, headers=headers)
        assert r.status_code == 200 and r.json() == {"received": 1, "dispatched": 0, "ignored": 1}, (sender, r.text)
    assert (await stack.api.get("/v1/contacts", headers=tenant.headers, params={"channel_id": channel["id"]})).json()[
        "count"] == 0
    assert await _calls_after(stack, before) == []
