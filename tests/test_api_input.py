"""Bad input gets a clear error with the right status, and nothing stored is lost."""

from __future__ import annotations

import asyncio
import json
import secrets

from sqlmodel import Session

from api.routes.webhooks import WebhookAck
from core.crypto import meta_signature
from core.db import Workspace
from sandbox import payloads

from conftest import ADMIN_TOKEN, APP_SECRET, VERIFY_TOKEN
from helpers import (
    connect_instagram,
    contact_id_of,
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


async def test_meta_verification_handshake(stack):
    ok = await stack.api.get(
        "/webhooks/meta", params={"hub.mode": "subscribe", "hub.verify_token": VERIFY_TOKEN, "hub.challenge": "1158201444"}
    )
    assert ok.status_code == 200 and ok.text == "1158201444"
    bad = await stack.api.get(
        "/webhooks/meta", params={"hub.mode": "subscribe", "hub.verify_token": "nope", "hub.challenge": "1"}
    )
    assert bad.status_code == 403


async def test_malformed_json_is_400_and_malformed_shape_is_400(stack):
    body = b'{"object": "instagram", "entry": ['
    headers = {"X-Hub-Signature-256": meta_signature(APP_SECRET, body)}
    r = await stack.api.post("/webhooks/meta", content=body, headers=headers)
    assert r.status_code == 400 and "malformed JSON" in r.json()["detail"]
    r = await post_meta(stack, {"object": "instagram", "entry": "nope"})
    assert r.status_code == 400


async def test_unknown_account_and_unknown_fields_are_acknowledged_and_ignored(stack):
    payload = payloads.instagram_webhook({"999999": [payloads.instagram_dm("999999", new_sender(), "price")]})
    payload["entry"][0]["unexpected"] = {"x": 1}
    r = await post_meta(stack, payload)
    assert r.status_code == 200
    assert r.json() == {"received": 1, "dispatched": 0, "ignored": 1}
    r = await post_meta(stack, {"object": "whatsapp_business_account", "entry": []})
    assert r.status_code == 200 and r.json()["dispatched"] == 0


async def test_oversized_body_is_413(stack):
    big = b"{" + b" " * (stack.settings.max_webhook_body_bytes + 10) + b"}"
    r = await stack.api.post("/webhooks/meta", content=big, headers={"X-Hub-Signature-256": "sha256=00"})
    assert r.status_code == 413


async def test_echoes_never_trigger(stack):
    tenant = await create_tenant(stack)
    channel, account_id, _ = await connect_instagram(stack, tenant)
    await create_automation(
        stack, tenant, channel["id"], {"type": "any_message"},
        [{"id": "a", "type": "send_message", "text": "auto"}],
    )
    person = new_sender()
    echo = payloads.instagram_dm(account_id, person, "price", is_echo=True)
    r = await post_meta(stack, payloads.instagram_webhook({account_id: [echo]}))
    assert r.status_code == 200 and r.json()["dispatched"] == 0
    await send_dm(stack, account_id, person, "hello")
    await wait_for_messages(stack, person, 1)
    await asyncio.sleep(0.5)
    assert len(await sandbox_messages(stack, person)) == 1


async def test_broken_automation_definitions_get_precise_422_and_keep_the_stored_one(stack):
    tenant = await create_tenant(stack)
    channel, _, _ = await connect_instagram(stack, tenant)
    good = await create_automation(
        stack, tenant, channel["id"], {"type": "dm_keyword", "keywords": ["a"]},
        [{"id": "s", "type": "send_message", "text": "hi"}],
    )
    cases = [
        ([{"id": "s", "type": "teleport"}], "teleport"),
        ([{"id": "s", "type": "send_message", "text": "hi", "next": "nowhere"}], "nowhere"),
        ([{"id": "s", "type": "send_message"}], "text"),
        ([{"id": "w", "type": "wait_for_reply", "validate": "regex"}], "pattern"),
    ]
    for steps, needle in cases:
        r = await stack.api.post(
            "/v1/automations",
            json={"name": "bad", "channel_id": channel["id"], "trigger": {"type": "api"}, "steps": steps},
            headers=tenant.headers,
        )
        assert r.status_code == 422, r.text
        assert needle in r.text, (needle, r.text)
        r = await stack.api.patch(f"/v1/automations/{good['id']}", json={"steps": steps}, headers=tenant.headers)
        assert r.status_code == 422, r.text
    r = await stack.api.post("/v1/automations", content=b"{oops", headers={**tenant.headers, "Content-Type": "application/json"})
    assert r.status_code == 422
    stored = (await stack.api.get(f"/v1/automations/{good['id']}", headers=tenant.headers)).json()
    assert stored["version"] == 1 and stored["steps"] == good["steps"]


async def test_openapi_has_stable_operation_ids(stack):
    spec = (await stack.api.get("/openapi.json")).json()
    ids = {op["operationId"] for path in spec["paths"].values() for op in path.values()}
    for expected in ("create_workspace", "connect_channel", "disconnect_channel", "create_automation",
                     "start_run", "get_run", "signal_run", "list_contacts", "meta_webhook_receive"):
        assert expected in ids


async def test_webhook_answers_match_their_documented_body(stack):
    spec = (await stack.api.get("/openapi.json")).json()
    for path in ("/webhooks/meta", "/webhooks/telegram/{channel_id}"):
        answer = spec["paths"][path]["post"]["responses"]["200"]["content"]["application/json"]["schema"]
        assert answer == {"$ref": "#/components/schemas/WebhookAck"}
    payload = payloads.instagram_webhook({"999999": [payloads.instagram_dm("999999", new_sender(), "price")]})
    r = await post_meta(stack, payload)
    assert r.headers["content-type"] == "application/json"
    assert WebhookAck.model_validate_json(r.content) == WebhookAck(received=1, dispatched=0, ignored=1)


async def test_webhooks_follow_connect_and_disconnect_at_once(stack):
    """The API caches connected channels for its webhooks: an account is
    routed the moment it is connected, and not after this API disconnected it."""
    tenant = await create_tenant(stack)
    account_id = str(17841400000000000 + secrets.randbelow(10**9))
    dm = payloads.instagram_webhook({account_id: [payloads.instagram_dm(account_id, new_sender(), "hi")]})
    assert (await post_meta(stack, dm)).json()["dispatched"] == 0
    channel, _, _ = await connect_instagram(stack, tenant, account_id)
    dm = payloads.instagram_webhook({account_id: [payloads.instagram_dm(account_id, new_sender(), "hi")]})
    assert (await post_meta(stack, dm)).json()["dispatched"] == 1
    r = await stack.api.delete(f"/v1/channels/{channel['id']}", headers=tenant.headers)
    assert r.status_code == 200 and r.json()["status"] == "disconnected"
    dm = payloads.instagram_webhook({account_id: [payloads.instagram_dm(account_id, new_sender(), "hi")]})
    assert (await post_meta(stack, dm)).json() == {"received": 1, "dispatched": 0, "ignored": 1}


async def test_bodies_that_would_break_storage_are_refused_before_anything_is_stored(stack):
    """NUL characters (PostgreSQL text cannot hold them: the send went out,
    its record failed, and each retry sent it again), NaN, JSON nested past
    any use, oversized bodies and absurd offsets: a 4xx, nothing stored,
    nothing sent."""
    tenant = await create_tenant(stack)
    channel, account_id, _ = await connect_instagram(stack, tenant)
    person = new_sender()
    await send_dm(stack, account_id, person, "hello")
    contacts = []

    async def contact_named():  # recorded, and looked up after its DM
        contacts[:] = (await stack.api.get("/v1/contacts", headers=tenant.headers)).json()["data"]
        return bool(contacts) and bool(contacts[0]["first_name"])

    assert await wait_for(contact_named, timeout=15)
    contact_id, name = contacts[0]["id"], contacts[0]["first_name"]
    json_headers = {**tenant.headers, "Content-Type": "application/json"}
    refused = [
        ("post", f"/v1/contacts/{contact_id}/messages", b'{"text": "hello\\u0000there"}', 422),
        ("post", "/v1/automations", b'{"name": "x", "channel_id": "%s", "trigger": {"type": "api"}, '
                                     b'"steps": [{"id": "a", "type": "send_message", "text": "a\\u0000b"}]}'
                                     % channel["id"].encode(), 422),
        ("patch", f"/v1/contacts/{contact_id}", b'{"first_name": "Ann\\u0000"}', 422),
        ("patch", f"/v1/contacts/{contact_id}", b'{"fields": {"d": ' + b"[" * 300 + b"]" * 300 + b"}}", 422),
        ("patch", f"/v1/contacts/{contact_id}", b'{"fields": {"score": NaN}}', 422),
        ("patch", "/v1/workspace", b'{"retention_days": Infinity}', 422),
        ("post", "/v1/broadcasts", b'{"channel_id": "%s", "text": "x", "segment": {"fields": {"a": "%s"}}}'
                                   % (channel["id"].encode(), b"x" * 2_000_000), 413),
        ("get", "/v1/channels/ch%00x", None, 422),
        ("get", "/v1/automations?channel_id=a%00b", None, 422),
        ("get", f"/v1/contacts/{contact_id}/messages?offset=9223372036854775808", None, 422),
        ("post", "/v1/channels", b'{"platform": "telegram", "access_token": "1:AA", "nmae": "typo"}', 422),
    ]
    for method, url, body, expected in refused:
        r = await stack.api.request(method, url, content=body, headers=json_headers)
        assert r.status_code == expected, (method, url, r.status_code, r.text[:300])
        assert isinstance(r.json()["detail"], list | str)
    # Nothing stored, nothing sent, everything still readable.
    contact = (await stack.api.get(f"/v1/contacts/{contact_id}", headers=tenant.headers)).json()
    assert (contact["first_name"], contact["fields"]) == (name, {})
    assert (await stack.api.get("/v1/contacts", headers=tenant.headers)).status_code == 200
    assert (await stack.api.get("/v1/automations", headers=tenant.headers)).json()["count"] == 0
    assert (await stack.api.get("/v1/broadcasts", headers=tenant.headers)).json()["count"] == 0
    assert [c["id"] for c in (await stack.api.get("/v1/channels", headers=tenant.headers)).json()["data"]] == [
        channel["id"]]
    await asyncio.sleep(1.0)
    assert await sandbox_messages(stack, person) == []


async def test_a_nul_character_from_the_platform_is_dropped_and_the_message_answered_once(stack):
    tenant = await create_tenant(stack)
    channel, account_id, _ = await connect_instagram(stack, tenant)
    await create_automation(stack, tenant, channel["id"], {"type": "dm_keyword", "keywords": ["price"]},
                            [{"id": "a", "type": "send_message", "text": "It is 10 EUR"}])
    person = new_sender()
    await send_dm(stack, account_id, person, "price\u0000 please")
    await wait_for_messages(stack, person, 1)
    await asyncio.sleep(1.0)
    assert len(await sandbox_messages(stack, person)) == 1
    contact = (await stack.api.get("/v1/contacts", headers=tenant.headers)).json()["data"][0]
    log = (await stack.api.get(f"/v1/contacts/{contact['id']}/messages", headers=tenant.headers)).json()["data"]
    assert "price please" in [m["text"] for m in log]


async def test_an_automation_can_be_deleted_and_concurrent_updates_each_make_a_version(stack):
    tenant = await create_tenant(stack)
    other = await create_tenant(stack, "Other")
    channel, _, _ = await connect_instagram(stack, tenant)
    steps = [{"id": "s", "type": "send_message", "text": "v1"}]
    automation = await create_automation(stack, tenant, channel["id"], {"type": "api"}, steps)
    url = f"/v1/automations/{automation['id']}"
    updates = await asyncio.gather(*(
        stack.api.patch(url, json={"steps": [{"id": "s", "type": "send_message", "text": f"v{i + 2}"}]},
                        headers=tenant.headers)
        for i in range(8)
    ))
    assert [r.status_code for r in updates] == [200] * 8, [r.text for r in updates if r.status_code != 200]
    assert sorted(r.json()["version"] for r in updates) == list(range(2, 10))
    assert (await stack.api.get(url, headers=tenant.headers)).json()["version"] == 9
    assert (await stack.api.delete(url, headers=other.headers)).status_code == 404
    r = await stack.api.delete(url, headers=tenant.headers)
    assert r.status_code == 204, r.text
    assert (await stack.api.get(url, headers=tenant.headers)).status_code == 404
    assert (await stack.api.get("/v1/automations", headers=tenant.headers)).json()["count"] == 0


async def test_an_event_the_database_cannot_take_as_sent_is_cleaned_and_the_conversation_goes_on(stack):
    """A timestamp that is no time (year 3170843) or a lone surrogate in the
    text used to fail the recording at every retry: the person's
    conversation was stuck and their later messages were never answered."""
    tenant = await create_tenant(stack)
    channel, account_id, _ = await connect_instagram(stack, tenant)
    await create_automation(stack, tenant, channel["id"], {"type": "any_message"},
                            [{"id": "a", "type": "send_message", "text": "Hi"}])
    far_future, surrogate = new_sender(), new_sender()
    items = [payloads.instagram_dm(account_id, far_future, "hi", timestamp_ms=10**17)]
    assert (await post_meta(stack, payloads.instagram_webhook({account_id: items}))).status_code == 200
    body = payloads.instagram_webhook({account_id: [payloads.instagram_dm(account_id, surrogate, "LONE")]})
    raw = json.dumps(body).replace("LONE", "hi \\ud83d").encode()
    r = await stack.api.post("/webhooks/meta", content=raw,
                             headers={"X-Hub-Signature-256": meta_signature(APP_SECRET, raw)})
    assert r.status_code == 200, r.text
    for person in (far_future, surrogate):
        assert len(await wait_for_messages(stack, person, 1, timeout=20)) == 1
        await send_dm(stack, account_id, person, "hello again")
        assert len(await wait_for_messages(stack, person, 2, timeout=20)) == 2


async def test_webhook_bodies_that_are_not_json_values_are_400(stack):
    nested = b"[" * 100_000 + b"]" * 100_000
    infinite = (b'{"object":"instagram","entry":[{"id":"1","time":1,"messaging":[{"sender":{"id":"5"},'
                b'"recipient":{"id":"1"},"timestamp":Infinity,"message":{"mid":"m","text":"hi"}}]}]}')
    for raw in (nested, infinite):
        r = await stack.api.post("/webhooks/meta", content=raw,
                                 headers={"X-Hub-Signature-256": meta_signature(APP_SECRET, raw)})
        assert r.status_code == 400, r.text
    tenant = await create_tenant(stack)
    channel, _, _ = await connect_instagram(stack, tenant)
    raw = (b'{"name": "x", "channel_id": "%s", "trigger": {"type": "api"}, '
           b'"steps": [{"id": "a", "type": "send_message", "text": "a\\ud800b"}]}' % channel["id"].encode())
    r = await stack.api.post("/v1/automations", content=raw, headers={**tenant.headers, "Content-Type": "application/json"})
    assert r.status_code == 422 and "surrogate" in r.text


async def test_openapi_documents_the_error_answers_the_routes_give(stack):
    spec = (await stack.api.get("/openapi.json")).json()
    ops = {}
    for path, operations in spec["paths"].items():
        for method, op in operations.items():
            ops[op["operationId"]] = op
            if not path.startswith("/v1/"):
                continue
            codes = set(op["responses"])
            assert {"401", "413", "422"} <= codes, (path, method, codes)
            if "{" in path:
                assert "404" in codes, (path, method)
            if method in ("post", "put", "patch") and op["operationId"] != "create_workspace":
                assert "409" in codes, (path, method)
    for op_id, code in (("send_human_message", "502"), ("start_run", "409")):
        assert code in ops[op_id]["responses"], (op_id, code)
    # 503 on exactly the routes that call Temporal (found from their dependencies).
    v1 = {op["operationId"]: op for path, operations in spec["paths"].items() if path.startswith("/v1/")
          for op in operations.values()}
    assert {op_id for op_id, op in v1.items() if "503" in op["responses"]} == {
        "create_broadcast", "get_broadcast", "cancel_broadcast", "connect_channel", "disconnect_channel",
        "update_contact", "send_human_message", "resume_contact", "erase_contact", "erase_workspace",
        "start_run", "signal_run", "get_run",
    }


async def test_lists_page_with_totals_and_a_workspace_being_erased_takes_no_writes(stack):
    tenant = await create_tenant(stack)
    channel, _, _ = await connect_instagram(stack, tenant)
    automation = await create_automation(stack, tenant, channel["id"], {"type": "api"},
                                         [{"id": "a", "type": "send_message", "text": "v1"}])
    for i in range(3):
        r = await stack.api.patch(f"/v1/automations/{automation['id']}", json={"name": f"n{i}"},
                                  headers=tenant.headers)
        assert r.status_code == 200
    everything = (await stack.api.get("/v1/audit", headers=tenant.headers)).json()
    page = (await stack.api.get("/v1/audit?limit=1&offset=1", headers=tenant.headers)).json()
    assert page["count"] == everything["count"] >= 2 and page["data"] == everything["data"][1:2]
    runs = (await stack.api.get("/v1/runs?limit=1&offset=5", headers=tenant.headers)).json()
    assert (runs["count"], runs["data"]) == (0, [])
    blank = await stack.api.post("/v1/workspaces", json={"name": "   ", "business_use_attestation": True},
                                 headers={"Authorization": f"Bearer {ADMIN_TOKEN}"})
    assert blank.status_code == 422

    r = await stack.api.delete(f"/v1/channels/{channel['id']}", headers=tenant.headers)
    assert r.status_code in (200, 202), r.text

    async def disconnected():
        got = await stack.api.get(f"/v1/channels/{channel['id']}", headers=tenant.headers)
        return got.json()["status"] == "disconnected"

    assert await wait_for(disconnected, timeout=20)
    r = await stack.api.post("/v1/automations", headers=tenant.headers, json={
        "name": "late", "channel_id": channel["id"], "trigger": {"type": "api"},
        "steps": [{"id": "a", "type": "send_message", "text": "x"}]})
    assert r.status_code == 409 and "disconnected" in r.text

    with Session(stack.deps.engine) as db:  # the erasure has begun (its workflow is not needed here)
        workspace = db.get(Workspace, tenant.workspace_id)
        workspace.status = "erasing"
        db.add(workspace)
        db.commit()
    r = await stack.api.post("/v1/channels", json={"platform": "telegram", "access_token": "1:AA"},
                             headers=tenant.headers)
    assert r.status_code == 409 and "erased" in r.text
    assert (await stack.api.get("/v1/automations", headers=tenant.headers)).status_code == 200


async def test_an_event_the_database_refuses_is_skipped_and_the_conversation_goes_on(stack, monkeypatch):
    """Whatever else the database may refuse in an event's content (no retry
    fixes that): the event is skipped and counted, and the person's next
    message is answered by the same conversation. Before, the recording's
    retries ran out, the conversation failed and the messages queued behind
    the event were lost."""
    from sqlalchemy.exc import DataError
    from temporalio.client import WorkflowExecutionStatus

    from activities import messaging
    from core.contracts import conversation_workflow_id
    from core.observability import EVENTS_UNRECORDABLE

    tenant = await create_tenant(stack)
    channel, account_id, _ = await connect_instagram(stack, tenant)
    await create_automation(stack, tenant, channel["id"], {"type": "dm_keyword", "keywords": ["hello"]},
                            [{"id": "a", "type": "send_message", "text": "Hi"}])
    real = messaging.record_inbound_event

    def refusing(engine, input, *args, **kwargs):
        if input.event.text == "refused":
            raise DataError("INSERT INTO message ...", {}, ValueError("value out of range"))
        return real(engine, input, *args, **kwargs)

    monkeypatch.setattr(messaging, "record_inbound_event", refusing)
    skipped = EVENTS_UNRECORDABLE._value.get()
    person = new_sender()
    await send_dm(stack, account_id, person, "refused")
    await send_dm(stack, account_id, person, "hello")
    assert [text_of(c) for c in await wait_for_messages(stack, person, 1, timeout=20)] == ["Hi"]
    assert EVENTS_UNRECORDABLE._value.get() == skipped + 1
    conversation = conversation_workflow_id(tenant.workspace_id, channel["id"], contact_id_of(stack, channel["id"], person))
    description = await stack.client.get_workflow_handle(conversation).describe()
    assert description.status == WorkflowExecutionStatus.RUNNING
