"""Broadcasts: segment, skips with reasons, progress, cancel, continue-as-new."""

from __future__ import annotations

import secrets
from datetime import UTC, datetime, timedelta

from sqlmodel import Session, select
from temporalio.client import WorkflowExecutionStatus

from core.db import Contact
from sandbox import payloads

from helpers import (
    connect_instagram,
    contact_id_of,
    create_automation,
    create_tenant,
    post_meta,
    sandbox_messages,
    text_of,
    wait_for,
    wait_for_messages,
)


def add_contacts(stack, tenant, channel_id, n, *, tags=(), ago=timedelta(hours=1), **flags) -> list[str]:
    ids = []
    with Session(stack.deps.engine) as db:
        for _ in range(n):
            external = str(10**15 + secrets.randbelow(10**15))
            db.add(Contact(id=contact_id_of(stack, channel_id, external), workspace_id=tenant.workspace_id,
                           channel_id=channel_id, external_id=external, tags=list(tags),
                           last_inbound_at=datetime.now(UTC) - ago, **flags))
            ids.append(external)
        db.commit()
    return ids


async def finished(stack, tenant, broadcast_id, timeout=60):
    async def done():
        b = (await stack.api.get(f"/v1/broadcasts/{broadcast_id}", headers=tenant.headers)).json()
        return b["status"] in ("completed", "cancelled", "failed") and b
    return await wait_for(done, timeout=timeout, interval=0.3)


async def test_broadcast_reaches_the_segment_and_counts_skips_with_reasons(stack):
    tenant = await create_tenant(stack)
    channel, _, _ = await connect_instagram(stack, tenant)
    vips = add_contacts(stack, tenant, channel["id"], 3, tags=["VIP"])
    restricted = add_contacts(stack, tenant, channel["id"], 1, tags=["vip"], processing_restricted=True)
    stale = add_contacts(stack, tenant, channel["id"], 1, tags=["vip"], ago=timedelta(hours=30))
    others = add_contacts(stack, tenant, channel["id"], 2, tags=["regular"])
    r = await stack.api.post("/v1/broadcasts", headers=tenant.headers, json={
        "channel_id": channel["id"], "name": "VIP drop", "text": "New collection is live!",
        "segment": {"tags_any": ["vip"]},
    })
    assert r.status_code == 202, r.text
    b = await finished(stack, tenant, r.json()["id"])
    assert b and b["status"] == "completed"
    assert (b["sent"], b["failed"], b["skipped"]) == (3, 0, {"restricted": 1, "outside_window": 1})
    for person in vips:
        calls = await sandbox_messages(stack, person)
        assert [text_of(c) for c in calls] == ["New collection is live!"]
    for person in restricted + stale + others:
        assert await sandbox_messages(stack, person) == []
    listing = (await stack.api.get("/v1/broadcasts", headers=tenant.headers)).json()
    assert listing["count"] == 1 and listing["data"][0]["name"] == "VIP drop"


async def test_broadcast_bad_input_and_tenancy(stack):
    tenant = await create_tenant(stack)
    other = await create_tenant(stack, "Other")
    channel, _, _ = await connect_instagram(stack, tenant)
    ch = channel["id"]
    bad = {
        "empty text": {"channel_id": ch, "text": ""},
        "blank text": {"channel_id": ch, "text": "   "},
        "unknown segment filter": {"channel_id": ch, "text": "x", "segment": {"tags_sometimes": ["a"]}},
        "unknown channel": {"channel_id": "ch_nope", "text": "x"},
        "unknown placeholder": {"channel_id": ch, "text": "Hi {{contact.nickname}}"},
        "context placeholder": {"channel_id": ch, "text": "Hi {{context.order}}"},
        "quick replies and buttons": {"channel_id": ch, "text": "x", "quick_replies": ["a"],
                                      "buttons": [{"title": "b", "payload": "B"}]},
        "14 quick replies": {"channel_id": ch, "text": "x", "quick_replies": [f"q{i}" for i in range(14)]},
        "quick reply too long": {"channel_id": ch, "text": "x", "quick_replies": ["x" * 21]},
        "button without payload or url": {"channel_id": ch, "text": "x", "buttons": [{"title": "b"}]},
        "button url not http": {"channel_id": ch, "text": "x", "buttons": [{"title": "b", "url": "javascript:x"}]},
    }
    for what, body in bad.items():
        r = await stack.api.post("/v1/broadcasts", json=body, headers=tenant.headers)
        assert r.status_code == 422, (what, r.status_code, r.text)
    r = await stack.api.post("/v1/broadcasts", json=bad["context placeholder"], headers=tenant.headers)
    assert "contact.first_name" in r.text  # says what a broadcast can read
    assert (await stack.api.get("/v1/broadcasts", headers=tenant.headers)).json()["count"] == 0
    r = await stack.api.post("/v1/broadcasts", json={"channel_id": channel["id"], "text": "x"}, headers=other.headers)
    assert r.status_code == 422
    r = await stack.api.post("/v1/broadcasts", json={"channel_id": channel["id"], "text": "hi"}, headers=tenant.headers)
    assert (await stack.api.get(f"/v1/broadcasts/{r.json()['id']}", headers=other.headers)).status_code == 404
    assert (await stack.api.post(f"/v1/broadcasts/{r.json()['id']}/cancel", headers=other.headers)).status_code == 404


async def test_broadcast_can_be_cancelled_midway(stack):
    tenant = await create_tenant(stack)
    channel, account_id, _ = await connect_instagram(stack, tenant)
    add_contacts(stack, tenant, channel["id"], 60, tags=["all"])
    await stack.sandbox.post("/_sandbox/faults", json={
        "service": "instagram", "path_contains": f"/{account_id}/messages", "kind": "timeout",
        "delay_seconds": 0.5, "times": -1,
    })
    try:
        r = await stack.api.post("/v1/broadcasts", headers=tenant.headers,
                                 json={"channel_id": channel["id"], "text": "slow news"})
        bid = r.json()["id"]

        async def started():
            b = (await stack.api.get(f"/v1/broadcasts/{bid}", headers=tenant.headers)).json()
            return b["sent"] > 0
        await wait_for(started, timeout=30)
        r = await stack.api.post(f"/v1/broadcasts/{bid}/cancel", headers=tenant.headers)
        assert r.status_code == 202
        b = await finished(stack, tenant, bid)
        assert b and b["status"] == "cancelled" and 0 < b["sent"] < 60
    finally:
        await stack.sandbox.delete("/_sandbox/faults")


async def test_large_broadcast_continues_as_new_and_sends_each_contact_once(stack):
    tenant = await create_tenant(stack)
    channel, _, _ = await connect_instagram(stack, tenant)
    people = add_contacts(stack, tenant, channel["id"], 1100, tags=["all"])
    r = await stack.api.post("/v1/broadcasts", headers=tenant.headers,
                             json={"channel_id": channel["id"], "text": "Big news"})
    bid = r.json()["id"]
    b = await finished(stack, tenant, bid, timeout=180)
    assert b and (b["status"], b["sent"], b["failed"]) == ("completed", 1100, 0)
    wf_id = f"{tenant.workspace_id}/broadcast/{bid}"
    runs = [wf async for wf in stack.client.list_workflows(f"WorkflowId = '{wf_id}'")]
    assert len(runs) >= 2  # continued as new at least once
    assert any(w.status == WorkflowExecutionStatus.CONTINUED_AS_NEW for w in runs)
    for person in people[:20] + people[-20:]:
        assert len(await sandbox_messages(stack, person)) == 1


async def test_a_retried_batch_resumes_from_its_heartbeat_and_counts_each_send_once(stack):
    """The batch activity after a crash: it starts from the heartbeated
    index; a message the lost attempt sent after its last heartbeat is found
    recorded (not sent again) and counted once; a person the platform refuses
    is counted failed and the batch goes on."""
    from dataclasses import replace as dc_replace

    from temporalio.testing import ActivityEnvironment

    from core.contracts import BroadcastBatchInput, BroadcastBatchResult, Recipient
    from workers.main import activities_for

    tenant = await create_tenant(stack)
    channel, account_id, _ = await connect_instagram(stack, tenant)
    people = add_contacts(stack, tenant, channel["id"], 5)
    recipients = [Recipient(contact_id=contact_id_of(stack, channel["id"], p), external_id=p) for p in people]
    batch = next(a for a in activities_for(stack.settings, stack.deps, stack.client)
                 if getattr(a, "__name__", "") == "send_broadcast_batch")
    prefix = f"{tenant.workspace_id}/broadcast/bc_resume"
    env = ActivityEnvironment()
    # The lost attempt: heartbeated after 2 recipients, then sent the third.
    first = await env.run(batch, BroadcastBatchInput(channel["id"], "hello", prefix, recipients[:3]))
    assert first.sent == 3
    # The platform refuses the next message (people[3]: the first sent after the resume).
    await stack.sandbox.post("/_sandbox/faults", json={
        "service": "instagram", "path_contains": f"/{account_id}/messages", "kind": "custom", "times": 1,
        "status": 400, "body": {"error": {"message": "(#100) No matching user found", "type": "OAuthException",
                                          "code": 100, "fbtrace_id": "AbCdEf"}},
    })
    try:
        env.info = dc_replace(env.info, heartbeat_details=[2, 2, 0, {}])
        beats: list = []
        env.on_heartbeat = lambda *details: beats.append(details)
        result: BroadcastBatchResult = await env.run(batch, BroadcastBatchInput(channel["id"], "hello", prefix, recipients))
    finally:
        await stack.sandbox.delete("/_sandbox/faults")
    assert (result.sent, result.failed, result.stopped) == (4, 1, "")
    assert beats[-1][:3] == (5, 4, 1)
    for person in (people[0], people[1], people[2], people[4]):
        assert [text_of(c) for c in await sandbox_messages(stack, person)] == ["hello"]  # once each
    assert await sandbox_messages(stack, people[3]) == []


async def test_broadcast_greets_each_recipient_by_name_and_its_button_starts_an_automation(stack):
    """The text is rendered for each recipient when sent (a contact without
    a name gets the fallback); its buttons go out with it, and a tap on one
    arrives as a postback that starts the automation waiting for it."""
    tenant = await create_tenant(stack)
    channel, account_id, _ = await connect_instagram(stack, tenant)
    [ana] = add_contacts(stack, tenant, channel["id"], 1, tags=["vip"], first_name="Ana")
    [nameless] = add_contacts(stack, tenant, channel["id"], 1, tags=["vip"])
    await create_automation(stack, tenant, channel["id"], {"type": "postback", "payloads": ["CLAIM_20"]},
                            [{"id": "code", "type": "send_message", "text": "Your code: VIP20"}])
    r = await stack.api.post("/v1/broadcasts", headers=tenant.headers, json={
        "channel_id": channel["id"], "text": "Hi {{contact.first_name | there}}! 20% off for you today.",
        "buttons": [{"title": "Claim it", "payload": "CLAIM_20"}, {"title": "Shop", "url": "https://shop.example"}],
        "segment": {"tags_any": ["vip"]},
    })
    assert r.status_code == 202, r.text
    created = r.json()
    assert created["text"] == "Hi {{contact.first_name | there}}! 20% off for you today."
    assert created["buttons"] == [{"title": "Claim it", "payload": "CLAIM_20", "url": ""},
                                  {"title": "Shop", "payload": "", "url": "https://shop.example"}]
    b = await finished(stack, tenant, created["id"])
    assert b and (b["status"], b["sent"]) == ("completed", 2)
    [to_ana] = await sandbox_messages(stack, ana)
    [to_nameless] = await sandbox_messages(stack, nameless)
    assert text_of(to_ana) == "Hi Ana! 20% off for you today."
    assert text_of(to_nameless) == "Hi there! 20% off for you today."
    buttons = to_ana["json"]["message"]["attachment"]["payload"]["buttons"]
    assert [(x["type"], x["title"], x.get("payload"), x.get("url")) for x in buttons] == [
        ("postback", "Claim it", "CLAIM_20", None), ("web_url", "Shop", None, "https://shop.example")]
    # The person's log shows what they were sent, their name filled in.
    contact_id = contact_id_of(stack, channel["id"], ana)
    log = (await stack.api.get(f"/v1/contacts/{contact_id}/messages", headers=tenant.headers)).json()
    assert "Hi Ana! 20% off for you today." in [m["text"] for m in log["data"]]
    # Ana taps "Claim it".
    tap = payloads.postback(account_id, ana, "CLAIM_20", "Claim it")
    assert (await post_meta(stack, payloads.instagram_webhook({account_id: [tap]}))).status_code == 200
    calls = await wait_for_messages(stack, ana, 2)
    assert text_of(calls[1]) == "Your code: VIP20"


async def test_a_batch_skips_contacts_deleted_restricted_or_taken_over_since_their_page_was_chosen(stack):
    """The batch reads its page's contacts again before sending: a person
    deleted, restricted or handed to a human meanwhile gets nothing, and is
    counted with the reason."""
    from temporalio.testing import ActivityEnvironment

    from core.contracts import BroadcastBatchInput, Recipient
    from core.db import Message
    from workers.main import activities_for

    tenant = await create_tenant(stack)
    channel, _, _ = await connect_instagram(stack, tenant)
    people = add_contacts(stack, tenant, channel["id"], 4, first_name="Bo")
    ids = [contact_id_of(stack, channel["id"], p) for p in people]
    with Session(stack.deps.engine) as db:
        db.delete(db.get(Contact, ids[1]))
        db.get(Contact, ids[2]).processing_restricted = True
        db.get(Contact, ids[3]).human_takeover = True
        db.commit()
    batch = next(a for a in activities_for(stack.settings, stack.deps, stack.client)
                 if getattr(a, "__name__", "") == "send_broadcast_batch")
    recipients = [Recipient(contact_id=c, external_id=p) for c, p in zip(ids, people, strict=True)]
    result = await ActivityEnvironment().run(batch, BroadcastBatchInput(
        channel["id"], "Hello {{contact.first_name}}", f"{tenant.workspace_id}/broadcast/bc_skips", recipients))
    assert (result.sent, result.failed, result.skipped) == (1, 0, {"deleted": 1, "restricted": 1, "human_takeover": 1})
    assert [text_of(c) for c in await sandbox_messages(stack, people[0])] == ["Hello Bo"]
    for person in people[1:]:
        assert await sandbox_messages(stack, person) == []
    with Session(stack.deps.engine) as db:  # nothing was written for the deleted person
        assert db.exec(select(Message).where(Message.contact_id == ids[1])).all() == []
