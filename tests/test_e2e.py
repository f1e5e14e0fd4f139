"""End to end: real Temporal dev server + API + worker + sandbox."""

from __future__ import annotations

import asyncio

from temporalio.api.enums.v1 import EventType

from core.contracts import conversation_workflow_id
from sandbox import payloads

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

PRICE_FLOW = {
    "trigger": {"type": "dm_keyword", "keywords": ["price", "cost"], "match": "contains"},
    "steps": [
        {"id": "ask", "type": "send_message", "text": "Hi {{contact.first_name | there}}! Reply with your email.",
         "quick_replies": ["Not now"]},
        {"id": "email", "type": "wait_for_reply", "timeout_seconds": 86400, "validate": "email",
         "save_to_field": "email", "retry_prompt": "That does not look like an email. Try again?",
         "on_timeout": "bye"},
        {"id": "tag", "type": "add_tag", "tag": "lead"},
        {"id": "thanks", "type": "send_message", "text": "Thanks! It is on its way to {{contact.fields.email}}.",
         "next": "end"},
        {"id": "bye", "type": "send_message", "text": "No worries, ask any time."},
    ],
}


async def test_keyword_dm_gets_reply_then_wait_for_reply_validates(stack):
    tenant = await create_tenant(stack)
    channel, account_id, _ = await connect_instagram(stack, tenant)
    await create_automation(stack, tenant, channel["id"], PRICE_FLOW["trigger"], PRICE_FLOW["steps"])
    person = new_sender()
    await stack.sandbox.post("/_sandbox/profiles", json={"user_id": person, "name": "Ana Lima", "username": "ana.l"})

    await send_dm(stack, account_id, person, "What's the PRICE of this?")
    calls = await wait_for_messages(stack, person, 1)
    assert len(calls) == 1
    first = calls[0]
    assert first["service"] == "instagram"
    assert first["path"].endswith(f"/{account_id}/messages")
    assert first["json"]["recipient"] == {"id": person}
    assert text_of(first) == "Hi Ana! Reply with your email."
    assert [q["title"] for q in first["json"]["message"]["quick_replies"]] == ["Not now"]

    await send_dm(stack, account_id, person, "not an email")
    calls = await wait_for_messages(stack, person, 2)
    assert text_of(calls[1]) == "That does not look like an email. Try again?"

    await send_dm(stack, account_id, person, "Ana@Example.com")
    calls = await wait_for_messages(stack, person, 3)
    assert text_of(calls[2]) == "Thanks! It is on its way to Ana@example.com."

    contacts = (await stack.api.get("/v1/contacts", params={"channel_id": channel["id"]}, headers=tenant.headers)).json()
    contact = next(c for c in contacts["data"] if c["external_id"] == person)
    assert contact["fields"]["email"] == "Ana@example.com"
    assert contact["tags"] == ["lead"]
    assert (contact["first_name"], contact["username"]) == ("Ana", "ana.l")
    lookups = [c for c in (await stack.sandbox.get("/_sandbox/calls", params={"path_contains": person})).json()["calls"]
               if c["method"] == "GET"]
    assert len(lookups) == 1 and lookups[0]["seq"] < first["seq"]  # looked up once, before the greeting

    runs = (await stack.api.get("/v1/runs", params={"contact_id": contact["id"]}, headers=tenant.headers)).json()
    assert runs["count"] == 1
    run = await stack.api.get(f"/v1/runs/{runs['data'][0]['id']}", headers=tenant.headers)
    assert run.status_code == 200, run.text
    detail = run.json()
    assert detail["status"] == "completed"
    assert [(t["step_id"], t["status"]) for t in detail["trail"] if t["status"] != "waiting"] == [
        ("ask", "done"), ("email", "invalid"), ("email", "done"), ("tag", "done"), ("thanks", "done"),
    ]

    messages = (await stack.api.get(f"/v1/contacts/{contact['id']}/messages", headers=tenant.headers)).json()
    assert [m["direction"] for m in reversed(messages["data"])] == ["in", "out", "in", "out", "in", "out"]


async def menu_shop(stack, name: str, username: str):
    """A shop whose "menu" keyword answers with one message (no name in it),
    and a new person with this Instagram profile."""
    tenant = await create_tenant(stack)
    channel, account_id, _ = await connect_instagram(stack, tenant)
    await create_automation(
        stack, tenant, channel["id"], {"type": "dm_keyword", "keywords": ["menu"]},
        [{"id": "menu", "type": "send_message", "text": "Here is the menu"}],
    )
    person = new_sender()
    await stack.sandbox.post("/_sandbox/profiles", json={"user_id": person, "name": name, "username": username})
    return tenant, channel, account_id, person


async def test_a_new_contact_gets_the_reply_first_and_their_name_right_after(stack):
    """The reply does not use the name, so it does not wait for the profile:
    a profile lookup that takes 2 s (looked up while the event is recorded,
    by the same activity) answers after the reply, and then the contact's
    name is in the CRM."""
    tenant, channel, account_id, person = await menu_shop(stack, "Bruno Costa", "bruno.c")
    await stack.sandbox.post("/_sandbox/faults", json={
        "kind": "timeout", "delay_seconds": 2, "service": "instagram", "method": "GET", "path_contains": person,
    })

    await send_dm(stack, account_id, person, "menu please")
    [reply] = await wait_for_messages(stack, person, 1)
    assert text_of(reply) == "Here is the menu"
    calls = (await stack.sandbox.get("/_sandbox/calls", params={"path_contains": person})).json()["calls"]
    assert [c for c in calls if c["method"] == "GET"] == []  # the lookup has not answered yet

    async def named_contact():
        r = await stack.api.get("/v1/contacts", params={"channel_id": channel["id"]}, headers=tenant.headers)
        found = [c for c in r.json()["data"] if c["external_id"] == person and c["first_name"]]
        return found[0] if found else None

    contact = await wait_for(named_contact)
    assert contact is not None, "the profile never reached the contact"
    assert (contact["first_name"], contact["username"]) == ("Bruno", "bruno.c")
    calls = (await stack.sandbox.get("/_sandbox/calls", params={"path_contains": person})).json()["calls"]
    lookups = [c for c in calls if c["method"] == "GET"]
    assert len(lookups) == 1 and lookups[0]["seq"] > reply["seq"]


def history_order(history) -> list[str]:
    """A conversation's history as an operator reads it: local activities
    and patches (markers), and the activities it scheduled."""
    order = []
    for e in history.events:
        if e.event_type == EventType.EVENT_TYPE_MARKER_RECORDED:
            order.append(e.marker_recorded_event_attributes.marker_name)
        elif e.event_type == EventType.EVENT_TYPE_ACTIVITY_TASK_SCHEDULED:
            order.append(f"scheduled:{e.activity_task_scheduled_event_attributes.activity_type.name}")
    return order


async def test_a_new_contact_whose_first_dm_starts_nothing_is_named_shortly_after(stack):
    """A CRM user expects names: a new Instagram contact whose DM starts
    nothing is looked up once their conversation has routed it (an activity
    nobody waits on), so the CRM shows their name shortly after, their next
    DM (which starts a flow) brings no second lookup, and a later broadcast
    greets them by name. A new contact whose first DM starts a flow is
    answered by the reply path as before: no profile activity in their
    conversation's history, before the reply or after it."""
    tenant, channel, account_id, person = await menu_shop(stack, "Elisa Moura", "elisa")
    contact_id = contact_id_of(stack, channel["id"], person)

    async def lookups(who: str) -> int:
        calls = (await stack.sandbox.get("/_sandbox/calls", params={"path_contains": who})).json()["calls"]
        return [c["method"] for c in calls].count("GET")

    async def named():
        r = await stack.api.get(f"/v1/contacts/{contact_id}", headers=tenant.headers)
        return r.json() if r.status_code == 200 and r.json()["first_name"] else None

    await send_dm(stack, account_id, person, "hello there")
    contact = await wait_for(named)
    assert contact is not None, "the contact stayed nameless"
    assert (contact["first_name"], contact["username"]) == ("Elisa", "elisa")
    assert await sandbox_messages(stack, person) == []  # nothing started: no reply
    conversation = stack.client.get_workflow_handle(
        conversation_workflow_id(tenant.workspace_id, channel["id"], contact_id)
    )
    order = history_order(await conversation.fetch_history())
    assert order.index("scheduled:fetch_profile") > order.index("core_local_activity")  # after recording

    await send_dm(stack, account_id, person, "the menu?")
    [reply] = await wait_for_messages(stack, person, 1)
    assert text_of(reply) == "Here is the menu"
    assert await lookups(person) == 1

    other = new_sender()
    await stack.sandbox.post("/_sandbox/profiles", json={"user_id": other, "name": "Fabio Nunes"})
    await send_dm(stack, account_id, other, "menu")
    [answer] = await wait_for_messages(stack, other, 1)
    assert text_of(answer) == "Here is the menu"
    other_conversation = stack.client.get_workflow_handle(
        conversation_workflow_id(tenant.workspace_id, channel["id"], contact_id_of(stack, channel["id"], other))
    )
    order = history_order(await other_conversation.fetch_history())
    assert "core_local_activity" in order and "scheduled:fetch_profile" not in order
    assert await lookups(other) == 1  # by the reply path, while the event was recorded

    r = await stack.api.post(
        "/v1/broadcasts", headers=tenant.headers,
        json={"channel_id": channel["id"], "text": "Hi {{contact.first_name | there}}! New lamps today."},
    )
    assert r.status_code == 202, r.text
    for who, name in ((person, "Elisa"), (other, "Fabio")):
        messages = await wait_for_messages(stack, who, 2)
        assert text_of(messages[-1]) == f"Hi {name}! New lamps today."


async def test_a_failing_profile_lookup_is_retried_once_and_the_reply_falls_back(stack):
    """The reply uses the name, so the profile is looked up first: a lookup
    that fails once is retried; one that keeps failing leaves the fallback
    text. Each person gets exactly one reply."""
    tenant = await create_tenant(stack)
    channel, account_id, _ = await connect_instagram(stack, tenant)
    await create_automation(
        stack, tenant, channel["id"], {"type": "dm_keyword", "keywords": ["menu"]},
        [{"id": "menu", "type": "send_message", "text": "Hi {{contact.first_name | there}}, here is the menu"}],
    )
    person, other = new_sender(), new_sender()
    for who, name in ((person, "Carla Dias"), (other, "Davi Reis")):
        await stack.sandbox.post("/_sandbox/profiles", json={"user_id": who, "name": name})
    # person: the first lookup fails (then succeeds); other: every lookup fails.
    await stack.sandbox.post("/_sandbox/faults", json={
        "service": "instagram", "method": "GET", "path_contains": person, "kind": "server_error", "times": 1,
    })
    await stack.sandbox.post("/_sandbox/faults", json={
        "service": "instagram", "method": "GET", "path_contains": other, "kind": "server_error", "times": -1,
    })
    try:
        await send_dm(stack, account_id, person, "menu")
        await send_dm(stack, account_id, other, "menu")
        [to_person] = await wait_for_messages(stack, person, 1)
        [to_other] = await wait_for_messages(stack, other, 1)
        await asyncio.sleep(0.5)  # nothing else follows
        assert text_of(to_person) == "Hi Carla, here is the menu"
        assert text_of(to_other) == "Hi there, here is the menu"
        for who, reply in ((person, to_person), (other, to_other)):
            assert len(await sandbox_messages(stack, who)) == 1
            calls = (await stack.sandbox.get("/_sandbox/calls", params={"path_contains": who})).json()["calls"]
            lookups = [c["seq"] for c in calls if c["method"] == "GET"]
            assert len(lookups) == 2 and max(lookups) < reply["seq"]
        r = await stack.api.get("/v1/contacts", params={"channel_id": channel["id"]}, headers=tenant.headers)
        names = {c["external_id"]: c["first_name"] for c in r.json()["data"]}
        assert names[person] == "Carla" and names[other] == ""
    finally:
        await stack.sandbox.delete("/_sandbox/faults")


async def test_batch_of_50_events_in_one_post_all_run(stack):
    tenant = await create_tenant(stack)
    channel, account_id, _ = await connect_instagram(stack, tenant)
    await create_automation(
        stack, tenant, channel["id"], {"type": "dm_keyword", "keywords": ["hello"]},
        [{"id": "hi", "type": "send_message", "text": "Hello back"}],
    )
    people = [new_sender() for _ in range(50)]
    items = [payloads.instagram_dm(account_id, p, "hello there") for p in people]
    r = await post_meta(stack, payloads.instagram_webhook({account_id: items}))
    assert r.status_code == 200
    assert r.json()["dispatched"] == 50

    async def all_answered():
        calls = (await stack.sandbox.get("/_sandbox/calls", params={"path_contains": "/messages"})).json()["calls"]
        answered = {c["json"]["recipient"].get("id") for c in calls if c["status"] < 400}
        return set(people) <= answered

    assert await wait_for(all_answered, timeout=60)
    for p in people[:5]:
        assert len(await sandbox_messages(stack, p)) == 1


async def test_twenty_redeliveries_of_one_mid_send_exactly_one_message(stack):
    tenant = await create_tenant(stack)
    channel, account_id, _ = await connect_instagram(stack, tenant)
    await create_automation(
        stack, tenant, channel["id"], {"type": "dm_keyword", "keywords": ["menu"]},
        [{"id": "m", "type": "send_message", "text": "Here is the menu"}],
    )
    person = new_sender()
    item = payloads.instagram_dm(account_id, person, "menu please")
    body = payloads.instagram_webhook({account_id: [item]})
    results = await asyncio.gather(*(post_meta(stack, body) for _ in range(20)))
    assert all(r.status_code == 200 for r in results)
    await wait_for_messages(stack, person, 1)
    await asyncio.sleep(1.5)  # give any duplicate time to show up
    assert len(await sandbox_messages(stack, person)) == 1


async def test_forged_signature_starts_nothing(stack):
    tenant = await create_tenant(stack)
    channel, account_id, _ = await connect_instagram(stack, tenant)
    await create_automation(
        stack, tenant, channel["id"], {"type": "dm_keyword", "keywords": ["menu"]},
        [{"id": "m", "type": "send_message", "text": "Here is the menu"}],
    )
    person = new_sender()
    payload = payloads.instagram_webhook({account_id: [payloads.instagram_dm(account_id, person, "menu")]})
    r = await post_meta(stack, payload, secret="not-the-app-secret")
    assert r.status_code == 401
    body, headers = payloads.encode_and_sign(payload, "x")
    del headers["X-Hub-Signature-256"]
    assert (await stack.api.post("/webhooks/meta", content=body, headers=headers)).status_code == 401
    await asyncio.sleep(1.0)
    assert await sandbox_messages(stack, person) == []
    contacts = (await stack.api.get("/v1/contacts", headers=tenant.headers)).json()
    assert contacts["count"] == 0


async def test_worker_crash_between_steps_does_not_resend_first_message(stack):
    tenant = await create_tenant(stack)
    channel, account_id, _ = await connect_instagram(stack, tenant)
    await create_automation(
        stack, tenant, channel["id"], {"type": "dm_keyword", "keywords": ["crash"]},
        [
            {"id": "one", "type": "send_message", "text": "first"},
            {"id": "pause", "type": "delay", "seconds": 2},
            {"id": "two", "type": "send_message", "text": "second"},
        ],
    )
    person = new_sender()
    await send_dm(stack, account_id, person, "crash test")
    calls = await wait_for_messages(stack, person, 1)
    assert [text_of(c) for c in calls] == ["first"]
    await stack.stop_worker()  # the run is inside its delay step
    await asyncio.sleep(2.5)
    assert [text_of(c) for c in await sandbox_messages(stack, person)] == ["first"]
    await stack.start_worker()
    calls = await wait_for_messages(stack, person, 2, timeout=20)
    await asyncio.sleep(0.5)
    assert [text_of(c) for c in await sandbox_messages(stack, person)] == ["first", "second"]


async def test_send_retried_after_platform_throttling_sends_once(stack):
    tenant = await create_tenant(stack)
    channel, account_id, _ = await connect_instagram(stack, tenant)
    await create_automation(
        stack, tenant, channel["id"], {"type": "dm_keyword", "keywords": ["busy"]},
        [{"id": "one", "type": "send_message", "text": "worth the wait"}],
    )
    await stack.sandbox.post(
        "/_sandbox/faults",
        json={"service": "instagram", "path_contains": f"/{account_id}/messages", "kind": "meta_throttle",
              "retry_after": 1, "times": 2},
    )
    person = new_sender()
    await send_dm(stack, account_id, person, "busy?")
    calls = await wait_for_messages(stack, person, 1, timeout=20)
    assert [text_of(c) for c in calls] == ["worth the wait"]
    attempts = (await stack.sandbox.get("/_sandbox/calls", params={"path_contains": f"/{account_id}/messages"})).json()
    assert [c["status"] for c in attempts["calls"]] == [400, 400, 200]


async def test_second_workspace_gets_404_for_every_object_of_the_first(stack):
    owner = await create_tenant(stack, "Owner")
    other = await create_tenant(stack, "Other")
    channel, account_id, _ = await connect_instagram(stack, owner)
    automation = await create_automation(
        stack, owner, channel["id"], {"type": "dm_keyword", "keywords": ["iso"]},
        [{"id": "one", "type": "send_message", "text": "mine"}],
    )
    person = new_sender()
    await send_dm(stack, account_id, person, "iso")
    await wait_for_messages(stack, person, 1)
    contact = (await stack.api.get("/v1/contacts", headers=owner.headers)).json()["data"][0]

    async def one_run():
        data = (await stack.api.get("/v1/runs", headers=owner.headers)).json()["data"]
        return data and data[0]["status"] == "completed" and data[0]

    run = await wait_for(one_run)
    assert run
    h = other.headers
    checks = [
        ("GET", f"/v1/channels/{channel['id']}", None),
        ("DELETE", f"/v1/channels/{channel['id']}", None),
        ("GET", f"/v1/automations/{automation['id']}", None),
        ("PATCH", f"/v1/automations/{automation['id']}", {"name": "stolen"}),
        ("DELETE", f"/v1/automations/{automation['id']}", None),
        ("POST", f"/v1/automations/{automation['id']}/runs", {"contact_id": contact["id"]}),
        ("GET", f"/v1/contacts/{contact['id']}", None),
        ("PATCH", f"/v1/contacts/{contact['id']}", {"first_name": "x"}),
        ("GET", f"/v1/contacts/{contact['id']}/messages", None),
        ("POST", f"/v1/contacts/{contact['id']}/resume", None),
        ("GET", f"/v1/runs/{run['id']}", None),
        ("POST", f"/v1/runs/{run['id']}/signals/paid", {"payload": {}}),
    ]
    for method, path, body in checks:
        r = await stack.api.request(method, path, json=body, headers=h)
        assert r.status_code == 404, (method, path, r.status_code, r.text)
    for path in ("/v1/channels", "/v1/automations", "/v1/contacts", "/v1/runs"):
        assert (await stack.api.get(path, headers=h)).json()["count"] == 0
    # The other tenant cannot use the owner's channel in an automation either.
    r = await stack.api.post(
        "/v1/automations",
        json={"name": "x", "channel_id": channel["id"], "trigger": {"type": "api"},
              "steps": [{"id": "a", "type": "send_message", "text": "x"}]},
        headers=h,
    )
    assert r.status_code == 422
    # And the owner's data is intact.
    assert (await stack.api.get(f"/v1/automations/{automation['id']}", headers=owner.headers)).json()["name"] == "flow"


async def test_wrong_or_missing_api_key_is_401(stack):
    assert (await stack.api.get("/v1/contacts")).status_code == 401
    r = await stack.api.get("/v1/contacts", headers={"Authorization": "Bearer vk_wrong"})
    assert r.status_code == 401
    assert r.headers["www-authenticate"] == "Bearer"
    r = await stack.api.post("/v1/workspaces", json={"name": "x"}, headers={"Authorization": "Bearer vk_wrong"})
    assert r.status_code == 401
