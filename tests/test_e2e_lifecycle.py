"""End to end: channels lifecycle, Telegram, AI, handoff, API-started runs,
secrets never stored or recorded in plaintext."""

from __future__ import annotations

import asyncio
import json
import logging
import secrets

from sqlalchemy import inspect, text
from sqlmodel import Session

from sandbox import payloads

from helpers import (
    connect_instagram,
    connect_telegram,
    create_automation,
    create_tenant,
    new_sender,
    post_meta,
    sandbox_messages,
    send_dm,
    text_of,
    wait_for,
    wait_for_messages,
)


async def test_telegram_bot_keyword_and_button_postback(stack):
    tenant = await create_tenant(stack)
    channel, bot_id, token = await connect_telegram(stack, tenant)
    hooks = (await stack.sandbox.get("/_sandbox/telegram/webhooks")).json()
    hook = hooks[bot_id]
    assert hook["url"] == f"{stack.api_url}/webhooks/telegram/{channel['id']}"
    assert len(hook["secret_token"]) >= 32
    await create_automation(
        stack, tenant, channel["id"], {"type": "dm_keyword", "keywords": ["start"]},
        [{"id": "hi", "type": "send_message", "text": "Hello {{contact.first_name}}! Pick one.",
          "buttons": [{"title": "Prices", "payload": "PRICES"}]}],
    )
    await create_automation(
        stack, tenant, channel["id"], {"type": "postback", "payloads": ["PRICES"]},
        [{"id": "p", "type": "send_message", "text": "Our prices start at 10 EUR."}],
    )
    chat = "424242"
    update = payloads.telegram_message_update(1001, int(chat), "/start", first_name="Mia")
    url = f"/webhooks/telegram/{channel['id']}"
    r = await stack.api.post(url, json=update, headers={"X-Telegram-Bot-Api-Secret-Token": hook["secret_token"]})
    assert r.status_code == 200, r.text
    calls = await wait_for_messages(stack, chat, 1)
    assert text_of(calls[0]) == "Hello Mia! Pick one."
    assert calls[0]["json"]["reply_markup"]["inline_keyboard"] == [[{"text": "Prices", "callback_data": "PRICES"}]]

    press = payloads.telegram_callback_update(1002, int(chat), "PRICES", first_name="Mia")
    r = await stack.api.post(url, json=press, headers={"X-Telegram-Bot-Api-Secret-Token": hook["secret_token"]})
    assert r.status_code == 200
    calls = await wait_for_messages(stack, chat, 2)
    assert text_of(calls[1]) == "Our prices start at 10 EUR."

    async def acked():
        calls = (await stack.sandbox.get("/_sandbox/calls", params={"path_contains": "answerCallbackQuery"})).json()
        return calls["calls"]

    assert await wait_for(acked)
    # A forged secret is refused and starts nothing; a repeated update_id runs nothing twice.
    forged = await stack.api.post(url, json=payloads.telegram_message_update(1003, int(chat), "/start"),
                                  headers={"X-Telegram-Bot-Api-Secret-Token": "guess"})
    assert forged.status_code == 403
    again = await stack.api.post(url, json=update, headers={"X-Telegram-Bot-Api-Secret-Token": hook["secret_token"]})
    assert again.status_code == 200
    await asyncio.sleep(1.0)
    assert len(await sandbox_messages(stack, chat)) == 2
    bad = await stack.api.post(url, content=b"{not json", headers={"X-Telegram-Bot-Api-Secret-Token": hook["secret_token"]})
    assert bad.status_code == 400


async def test_ai_reply_uses_history_and_records_usage_with_fallback_on_failure(stack):
    tenant = await create_tenant(stack)
    channel, account_id, _ = await connect_instagram(stack, tenant)
    await create_automation(
        stack, tenant, channel["id"], {"type": "dm_keyword", "keywords": ["help"]},
        [{"id": "ai", "type": "ai_reply", "instructions": "We sell shoes. Be brief.",
          "fallback_text": "A teammate will answer soon."}],
    )
    person = new_sender()
    await send_dm(stack, account_id, person, "help with sizes")
    calls = await wait_for_messages(stack, person, 1)
    assert text_of(calls[0]) == "[sandbox-ai] help with sizes"
    ai_calls = (await stack.sandbox.get("/_sandbox/calls", params={"service": "openai"})).json()["calls"]
    prompt = ai_calls[-1]["json"]["messages"]
    assert prompt[0]["role"] == "system" and "We sell shoes" in prompt[0]["content"]
    assert prompt[-1] == {"role": "user", "content": "help with sizes"}
    from core.db import AiUsage

    with Session(stack.deps.engine) as db:
        usage = db.exec(text("select sum(prompt_tokens), sum(completion_tokens) from aiusage where workspace_id = :w"),
                        params={"w": tenant.workspace_id}).one()
    assert usage[0] > 0 and usage[1] > 0
    assert AiUsage.__tablename__ == "aiusage"

    await stack.sandbox.post("/_sandbox/faults", json={"service": "openai", "kind": "server_error", "times": 5})
    await send_dm(stack, account_id, person, "help again")
    calls = await wait_for_messages(stack, person, 2, timeout=30)
    assert text_of(calls[1]) == "A teammate will answer soon."
    await stack.sandbox.delete("/_sandbox/faults")


async def test_handoff_pauses_automations_until_resumed(stack):
    tenant = await create_tenant(stack)
    channel, account_id, _ = await connect_instagram(stack, tenant)
    await create_automation(
        stack, tenant, channel["id"], {"type": "dm_keyword", "keywords": ["human"]},
        [{"id": "h", "type": "handoff", "message": "Connecting you with a person."}],
    )
    await create_automation(
        stack, tenant, channel["id"], {"type": "dm_keyword", "keywords": ["menu"]},
        [{"id": "m", "type": "send_message", "text": "menu!"}],
    )
    person = new_sender()
    await send_dm(stack, account_id, person, "human please")
    await wait_for_messages(stack, person, 1)
    contacts = (await stack.api.get("/v1/contacts", headers=tenant.headers)).json()["data"]
    contact = contacts[0]

    async def taken_over():
        c = (await stack.api.get(f"/v1/contacts/{contact['id']}", headers=tenant.headers)).json()
        return c["human_takeover"]

    assert await wait_for(taken_over)
    await send_dm(stack, account_id, person, "menu")
    # Nor does an API call start one while the person is with a human.
    api_flow = await create_automation(stack, tenant, channel["id"], {"type": "api"},
                                       [{"id": "p", "type": "send_message", "text": "Promo"}])
    r = await stack.api.post(f"/v1/automations/{api_flow['id']}/runs", json={"contact_id": contact["id"]},
                             headers=tenant.headers)
    assert r.status_code == 409 and "human" in r.json()["detail"]
    await asyncio.sleep(1.0)
    assert [text_of(c) for c in await sandbox_messages(stack, person)] == ["Connecting you with a person."]
    r = await stack.api.post(f"/v1/contacts/{contact['id']}/resume", headers=tenant.headers)
    assert r.status_code == 202 and r.json()["human_takeover"] is False
    await send_dm(stack, account_id, person, "menu")
    calls = await wait_for_messages(stack, person, 2)
    assert text_of(calls[1]) == "menu!"


async def test_api_started_run_waits_for_external_event_and_keeps_its_version(stack):
    tenant = await create_tenant(stack)
    channel, account_id, _ = await connect_instagram(stack, tenant)
    automation = await create_automation(
        stack, tenant, channel["id"], {"type": "api"},
        [
            {"id": "ask", "type": "send_message", "text": "Your order {{context.order}} is ready to pay."},
            {"id": "paid", "type": "wait_for_event", "event": "payment_received", "timeout_seconds": 3600,
             "save_to_field": "last_payment"},
            {"id": "thanks", "type": "send_message", "text": "Payment received, thank you!"},
        ],
    )
    person = new_sender()
    await send_dm(stack, account_id, person, "hi")  # creates the contact; no trigger matches

    async def created():
        return (await stack.api.get("/v1/contacts", headers=tenant.headers)).json()["data"]

    contact = (await wait_for(created))[0]
    r = await stack.api.post(
        f"/v1/automations/{automation['id']}/runs",
        json={"contact_id": contact["id"], "context": {"order": "#123"}},
        headers=tenant.headers,
    )
    assert r.status_code == 202, r.text
    run_id = r.json()["id"]
    calls = await wait_for_messages(stack, person, 1)
    assert text_of(calls[0]) == "Your order #123 is ready to pay."

    # Edit the automation while the run waits: the run keeps version 1.
    r = await stack.api.patch(
        f"/v1/automations/{automation['id']}",
        json={"steps": [{"id": "only", "type": "send_message", "text": "v2"}]},
        headers=tenant.headers,
    )
    assert r.status_code == 200 and r.json()["version"] == 2

    async def waiting():
        body = (await stack.api.get(f"/v1/runs/{run_id}", headers=tenant.headers)).json()
        return body.get("status") == "waiting" and body

    status = await wait_for(waiting)
    assert status and status["current_step"] == "paid" and status["version"] == 1
    r = await stack.api.post(
        f"/v1/runs/{run_id}/signals/payment_received", json={"payload": {"amount": 42}}, headers=tenant.headers
    )
    assert r.status_code == 202, r.text
    calls = await wait_for_messages(stack, person, 2)
    assert text_of(calls[1]) == "Payment received, thank you!"
    c = (await stack.api.get(f"/v1/contacts/{contact['id']}", headers=tenant.headers)).json()
    assert c["fields"]["last_payment"] == {"amount": 42}


async def test_disconnect_revokes_deletes_token_and_stops_workflows(stack):
    tenant = await create_tenant(stack)
    channel, account_id, token = await connect_instagram(stack, tenant)
    await create_automation(
        stack, tenant, channel["id"], {"type": "dm_keyword", "keywords": ["email"]},
        [{"id": "ask", "type": "send_message", "text": "Your email?"},
         {"id": "wait", "type": "wait_for_reply", "validate": "email"}],
    )
    person = new_sender()
    await send_dm(stack, account_id, person, "email me")
    await wait_for_messages(stack, person, 1)
    r = await stack.api.delete(f"/v1/channels/{channel['id']}", headers=tenant.headers)
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["status"] == "disconnected" and body["revoked"] is True and body["stopped_workflows"] >= 2
    revokes = (await stack.sandbox.get("/_sandbox/calls", params={"path_contains": "/permissions"})).json()["calls"]
    assert any(c["method"] == "DELETE" and c["status"] == 200 for c in revokes)
    from core.db import Channel

    with Session(stack.deps.engine) as db:
        row = db.get(Channel, channel["id"])
        assert row.status == "disconnected"
        assert row.token_ciphertext is None
    runs = (await stack.api.get("/v1/runs", headers=tenant.headers)).json()["data"]
    assert runs and all(r["status"] in ("cancelled", "terminated", "completed") for r in runs)
    # Events for a disconnected account are acknowledged and ignored.
    await send_dm(stack, account_id, person, "a@b.co")
    await asyncio.sleep(0.5)
    assert len(await sandbox_messages(stack, person)) == 1
    # Disconnecting again is idempotent.
    again = await stack.api.delete(f"/v1/channels/{channel['id']}", headers=tenant.headers)
    assert again.status_code == 200 and again.json()["status"] == "disconnected"


async def test_rejected_token_is_400_and_nothing_kept(stack):
    tenant = await create_tenant(stack)
    r = await stack.api.post(
        "/v1/channels", json={"platform": "instagram", "access_token": "IGAA-not-registered"}, headers=tenant.headers
    )
    assert r.status_code == 400
    assert "190" in r.json()["detail"] or "token" in r.json()["detail"].lower()
    assert "IGAA-not-registered" not in r.text
    assert (await stack.api.get("/v1/channels", headers=tenant.headers)).json()["count"] == 0


async def test_tokens_never_in_database_plaintext_histories_logs_or_api_responses(stack, caplog):
    caplog.set_level(logging.DEBUG)
    tenant = await create_tenant(stack)
    channel, account_id, token = await connect_instagram(stack, tenant)
    tg_channel, bot_id, tg_token = await connect_telegram(stack, tenant)
    await create_automation(
        stack, tenant, channel["id"], {"type": "dm_keyword", "keywords": ["secret"]},
        [{"id": "a", "type": "send_message", "text": "ok"}],
    )
    person = new_sender()
    await stack.sandbox.post("/_sandbox/profiles", json={"user_id": person, "name": "Zelda Quartermaine"})
    await send_dm(stack, account_id, person, "secret recipe for xylophone soup")
    calls = await wait_for_messages(stack, person, 1)
    assert text_of(calls[0]) == "ok"
    listing = await stack.api.get("/v1/channels", headers=tenant.headers)
    assert token not in listing.text and tg_token not in listing.text
    assert "access_token" not in listing.text

    # Database: every row of every table, serialised.
    engine = stack.deps.engine
    with engine.connect() as conn:
        for table in inspect(engine).get_table_names():
            for row in conn.execute(text(f'select * from "{table}"')):
                dumped = json.dumps([str(v) for v in row])
                assert token not in dumped and tg_token not in dumped, table
    url = str(engine.url)
    if url.startswith("sqlite"):
        path = url.split("///", 1)[1]
        import pathlib

        for suffix in ("", "-wal"):
            p = pathlib.Path(path + suffix)
            if p.exists():
                raw = p.read_bytes()
                assert token.encode() not in raw and tg_token.encode() not in raw

    # Workflow histories of this workspace: no token bytes anywhere.
    count = 0
    async for wf in stack.client.list_workflows(f"WorkspaceId = '{tenant.workspace_id}'"):
        history = await stack.client.get_workflow_handle(wf.id, run_id=wf.run_id).fetch_history()
        raw = history.to_json()
        assert token not in raw and tg_token not in raw
        # Message content and names are encrypted by the payload codec.
        assert "xylophone" not in raw and "Zelda" not in raw and person not in raw
        count += 1
    assert count >= 3  # two connects, a conversation and a run
    assert caplog.records, "expected log records to check"
    assert token not in caplog.text and tg_token not in caplog.text


async def test_messenger_page_dm_is_answered_through_the_graph_api(stack):
    tenant = await create_tenant(stack)
    page_id = str(100000000000000 + secrets.randbelow(10**9))
    token = f"EAAB{secrets.token_hex(20)}"
    await stack.sandbox.post(
        "/_sandbox/accounts", json={"platform": "messenger", "account_id": page_id, "token": token, "name": "Acme Page"}
    )
    r = await stack.api.post("/v1/channels", json={"platform": "messenger", "access_token": token}, headers=tenant.headers)
    assert r.status_code == 201, r.text
    channel = r.json()
    assert channel["external_id"] == page_id and channel["name"] == "Acme Page"
    subs = (await stack.sandbox.get("/_sandbox/calls", params={"path_contains": "/subscribed_apps"})).json()["calls"]
    assert any(page_id in c["path"] and c["service"] == "graph" for c in subs)
    await create_automation(
        stack, tenant, channel["id"], {"type": "any_message", "scope": "first_message"},
        [{"id": "w", "type": "send_message", "text": "Welcome to Acme!"}],
    )
    person = new_sender()
    item = payloads.instagram_dm(page_id, person, "hey")
    r = await post_meta(stack, payloads.page_webhook({page_id: [item]}))
    assert r.status_code == 200 and r.json()["dispatched"] == 1
    calls = await wait_for_messages(stack, person, 1)
    assert calls[0]["service"] == "graph" and calls[0]["path"].endswith(f"/{page_id}/messages")
    assert text_of(calls[0]) == "Welcome to Acme!"
    # Only the first message gets the welcome.
    await post_meta(stack, payloads.page_webhook({page_id: [payloads.instagram_dm(page_id, person, "again")]}))
    await asyncio.sleep(1.0)
    assert len(await sandbox_messages(stack, person)) == 1
