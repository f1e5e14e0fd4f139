"""The 24-hour messaging window: automated sends outside it are skipped with
a reason, teammates' replies use the HUMAN_AGENT tag within 7 days."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

from sqlmodel import Session

from core.db import Contact

from helpers import (
    connect_instagram,
    create_automation,
    create_tenant,
    new_sender,
    sandbox_messages,
    send_dm,
    text_of,
    wait_for,
    wait_for_messages,
)


def last_wrote(stack, contact_id: str, ago: timedelta) -> None:
    with Session(stack.deps.engine) as db:
        contact = db.get(Contact, contact_id)
        contact.last_inbound_at = datetime.now(UTC) - ago
        db.add(contact)
        db.commit()


async def setup(stack):
    tenant = await create_tenant(stack)
    channel, account_id, _ = await connect_instagram(stack, tenant)
    automation = await create_automation(
        stack, tenant, channel["id"], {"type": "api"},
        [{"id": "nudge", "type": "send_message", "text": "Still interested?"},
         {"id": "tag", "type": "add_tag", "tag": "nudged"}],
    )
    person = new_sender()
    await send_dm(stack, account_id, person, "hello")

    async def created():
        return (await stack.api.get("/v1/contacts", headers=tenant.headers)).json()["data"]

    contact = (await wait_for(created))[0]
    return tenant, account_id, automation, person, contact


async def run_to_end(stack, tenant, automation, contact):
    r = await stack.api.post(f"/v1/automations/{automation['id']}/runs", json={"contact_id": contact["id"]},
                             headers=tenant.headers)
    assert r.status_code == 202, r.text

    async def finished():
        body = (await stack.api.get(f"/v1/runs/{r.json()['id']}", headers=tenant.headers)).json()
        return body.get("status") == "completed" and body

    return await wait_for(finished)


async def test_automated_send_outside_24h_is_skipped_with_a_visible_reason(stack):
    tenant, _, automation, person, contact = await setup(stack)
    last_wrote(stack, contact["id"], timedelta(hours=30))
    run = await run_to_end(stack, tenant, automation, contact)
    assert run, "the run did not complete"
    steps = [(t["step_id"], t["status"]) for t in run["trail"]]
    assert steps == [("nudge", "skipped"), ("tag", "done")]
    assert "24-hour messaging window" in run["trail"][0]["detail"] and "30 h ago" in run["trail"][0]["detail"]
    assert await sandbox_messages(stack, person) == []  # not attempted at the platform


async def test_platform_window_error_is_classified_and_skipped(stack):
    tenant, account_id, automation, person, contact = await setup(stack)
    await stack.sandbox.post("/_sandbox/faults", json={
        "service": "instagram", "path_contains": f"/{account_id}/messages", "kind": "meta_outside_window", "times": 1,
    })
    run = await run_to_end(stack, tenant, automation, contact)
    assert run and run["trail"][0]["status"] == "skipped"
    assert "outside" in run["trail"][0]["detail"].lower()
    attempts = (await stack.sandbox.get("/_sandbox/calls", params={"path_contains": f"/{account_id}/messages"})).json()
    assert [c["status"] for c in attempts["calls"]] == [400]  # no retry of a window error


async def test_teammate_reply_uses_human_agent_tag_within_7_days_and_409_after(stack):
    tenant, _, _, person, contact = await setup(stack)
    last_wrote(stack, contact["id"], timedelta(days=3))
    r = await stack.api.post(f"/v1/contacts/{contact['id']}/messages", json={"text": "Hi, Maria from support here."},
                             headers=tenant.headers)
    assert r.status_code == 201, r.text
    calls = await wait_for_messages(stack, person, 1)
    assert text_of(calls[0]) == "Hi, Maria from support here."
    assert calls[0]["json"]["messaging_type"] == "MESSAGE_TAG" and calls[0]["json"]["tag"] == "HUMAN_AGENT"
    log = (await stack.api.get(f"/v1/contacts/{contact['id']}/messages", headers=tenant.headers)).json()
    assert log["data"][0]["direction"] == "out" and log["data"][0]["text"] == "Hi, Maria from support here."

    last_wrote(stack, contact["id"], timedelta(days=8))
    r = await stack.api.post(f"/v1/contacts/{contact['id']}/messages", json={"text": "Are you there?"},
                             headers=tenant.headers)
    assert r.status_code == 409 and "7-day human-agent" in r.json()["detail"]
    assert len(await sandbox_messages(stack, person)) == 1
    r = await stack.api.post(f"/v1/contacts/{contact['id']}/messages", json={"text": ""}, headers=tenant.headers)
    assert r.status_code == 422
